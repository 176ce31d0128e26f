//! A dataset's move away from this node, as a state machine: [`Move::next`] says which IO to do
//! next ([`MoveStep`]), [`Move::observe`] takes its result ([`MoveInput`]), and
//! [`Move::poll_progress`] yields what the API reports. The executor (flock-node's datasets
//! agent) runs one attempt of a move until `Done` or `Failed`; a failed attempt is retried by
//! the datasets core with backoff, and every attempt starts from what Raft recorded.
//!
//! A dataset an app uses moves in two phases. One, while the app runs here: snapshot, record
//! and push (full, then incremental) in rounds while the delta shrinks, at most [`MAX_ROUNDS`].
//! Then the handoff is recorded; the app's agent here stops the app. Two: once the handoff is
//! applied in this node's state, the move takes the dataset's start gate (an app start that
//! re-checks the state under the gate can no longer slip in), and proceeds only on a positive
//! observation that no instance of the dataset's users runs here; a failed listing or an
//! instance in an unknown state is not one. Then a last snapshot and push carry the final delta,
//! and the commit makes the target the primary under epoch + 1. A dataset no app uses moves in
//! one round and a commit.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use flock_scheduler::dataset::DatasetId;
use flock_scheduler::{
    ApplyError, ClusterState, Command, CommandResult, Dataset, NodeId, SnapshotRecord,
};

use crate::Instant;

/// The most copy rounds of a move's first phase.
pub const MAX_ROUNDS: u32 = 8;
/// A delta this small (bytes) goes in the move's last round, with the app stopped.
pub const SMALL_DELTA: u64 = 4 << 20;
/// How long phase two waits for the handoff to apply here and the dataset's users to stop.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the users' instances are listed again while they have not stopped.
pub const STOP_POLL: Duration = Duration::from_millis(10);
/// How often the local state is looked at while waiting for an entry to apply.
pub const APPLY_POLL: Duration = Duration::from_millis(20);
/// How long a committed move waits for the commit to apply here before it reports done: until
/// then the datasets core would see the move pending and start it again.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How far a move is, as the API reports it ([`MovePhase::as_str`] is the one mapping to the
/// strings clients see; [`MovePhase::words`] is what a person reads).
///
/// A move of a dataset an app uses goes: `snapshot`, `full` (the first push), `snapshot` and
/// `incremental` for each further copy round, `handoff` (recording it), `stopping-app` (until
/// this node saw the app stop), `final-delta` (the last snapshot and push), `committing`,
/// `done`. A move of a dataset no app uses: `snapshot`, `full` or `incremental`,
/// `committing`, `done`. A failed attempt ends in `retrying` (the core starts another) or
/// `failed` (given up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MovePhase {
    /// Taking and recording a snapshot (or connecting, before the first).
    Snapshot,
    /// Streaming a full snapshot.
    Full,
    /// Streaming an incremental one.
    Incremental,
    /// Recording the handoff.
    Handoff,
    /// Handed off: waiting for the handoff to apply here and the dataset's apps to stop.
    StoppingApp,
    /// The apps stopped: the last snapshot and its push.
    FinalDelta,
    /// Proposing the commit.
    Committing,
    Done,
    /// Ended without a commit (cancelled, no space, finished elsewhere).
    Failed,
    /// The attempt failed and will be tried again.
    Retrying,
}

impl MovePhase {
    /// Every phase, in the order a move goes through them.
    pub const ALL: [MovePhase; 10] = [
        MovePhase::Snapshot,
        MovePhase::Full,
        MovePhase::Incremental,
        MovePhase::Handoff,
        MovePhase::StoppingApp,
        MovePhase::FinalDelta,
        MovePhase::Committing,
        MovePhase::Done,
        MovePhase::Failed,
        MovePhase::Retrying,
    ];

    /// The name clients see (`flockctl dataset ls`, the API's `phase`). Names are part of the
    /// wire: never change one, only add.
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::Snapshot => "snapshot",
            MovePhase::Full => "full",
            MovePhase::Incremental => "incremental",
            MovePhase::Handoff => "handoff",
            MovePhase::StoppingApp => "stopping-app",
            MovePhase::FinalDelta => "final-delta",
            MovePhase::Committing => "committing",
            MovePhase::Done => "done",
            MovePhase::Failed => "failed",
            MovePhase::Retrying => "retrying",
        }
    }

    /// What a person reads for the phase (flockctl's progress line).
    pub fn words(self) -> &'static str {
        match self {
            MovePhase::Snapshot => "snapshot",
            MovePhase::Full => "full copy",
            MovePhase::Incremental => "copy round",
            MovePhase::Handoff => "handing off",
            MovePhase::StoppingApp => "waiting for the app to stop",
            MovePhase::FinalDelta => "final delta",
            MovePhase::Committing => "commit",
            MovePhase::Done => "done",
            MovePhase::Failed => "failed",
            MovePhase::Retrying => "retrying",
        }
    }

    /// The phase a name from [`MovePhase::as_str`] stands for (a push reports its stream's
    /// kind by name).
    pub fn from_name(name: &str) -> Option<MovePhase> {
        MovePhase::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// The phase to show while a push of a move in phase `self` streams, `stream` being the
    /// stream's kind by name ("full" or "incremental"): the final delta stays the final delta;
    /// otherwise the stream's kind (full when unknown: the larger, the safer guess).
    pub fn streaming(self, stream: &str) -> MovePhase {
        match (self, MovePhase::from_name(stream)) {
            (MovePhase::FinalDelta, _) => MovePhase::FinalDelta,
            (_, Some(MovePhase::Incremental)) => MovePhase::Incremental,
            _ => MovePhase::Full,
        }
    }

    /// Whether a transfer in this phase is still under way (an ended one is shown for a while
    /// only).
    pub fn is_active(self) -> bool {
        !self.has_ended()
    }

    /// Whether the attempt that reported this phase is over: done, given up, or failed and
    /// waiting to be tried again. Its byte count and rate are no longer current.
    pub fn has_ended(self) -> bool {
        matches!(
            self,
            MovePhase::Done | MovePhase::Failed | MovePhase::Retrying
        )
    }
}

impl fmt::Display for MovePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of what the API reports about a move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub phase: MovePhase,
    /// `Some`: the byte count to show from now on; `None` keeps the count.
    pub bytes: Option<u64>,
    /// The error to show, if any (kept until another replaces it).
    pub error: Option<String>,
}

/// Which driver runs an app (one type for every decision).
pub use crate::apps::DriverKind as Driver;

/// Whether an instance runs, as a driver reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunSeen {
    Running,
    Exited,
    /// The driver could not tell (a failed inspect): it may run.
    Unknown {
        reason: String,
    },
}

/// One instance a driver reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSeen {
    pub app: String,
    pub driver: Driver,
    pub run: RunSeen,
}

/// What the drivers reported on one look.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstancesSeen {
    pub instances: Vec<InstanceSeen>,
    /// Drivers whose listing failed, with why: any of their apps may run.
    pub failed: Vec<(Driver, String)>,
}

/// Ok only on a positive observation that no instance of `users` (apps and their drivers)
/// runs: a failed listing of a driver some user has, or a user's instance running or in an
/// unknown state, is a reason to wait (returned).
pub fn users_stopped(users: &[(String, Driver)], seen: &InstancesSeen) -> Result<(), String> {
    if let Some((driver, why)) = seen
        .failed
        .iter()
        .find(|(d, _)| users.iter().any(|(_, u)| u == d))
    {
        return Err(format!(
            "the {driver} driver could not list its instances: {why}"
        ));
    }
    for i in seen
        .instances
        .iter()
        .filter(|i| users.iter().any(|(a, _)| *a == i.app))
    {
        match &i.run {
            RunSeen::Exited => {}
            RunSeen::Running => return Err(format!("app {} still runs here", i.app)),
            RunSeen::Unknown { reason } => {
                return Err(format!(
                    "app {}'s instance here is in an unknown state: {reason}",
                    i.app
                ))
            }
        }
    }
    Ok(())
}

/// Why a push failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushFailure {
    /// The target has no room: waiting cannot help, the move is given up.
    NoSpace(String),
    /// Anything else (the peer, the network): the attempt is retried.
    Other(String),
}

/// The next IO a move needs. Steps that produce something are answered with
/// [`Move::observe`]; until then [`Move::next`] returns the same step again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoveStep {
    /// Connect to the target. Answer: [`MoveInput::Connected`].
    Connect {
        to: NodeId,
        name: String,
        addr: String,
    },
    /// Take a snapshot of this node's copy of `dataset` (under its epoch). Answer:
    /// [`MoveInput::Snapshot`].
    TakeSnapshot { dataset: Dataset },
    /// Propose [`Command::RecordSnapshot`]. Answer: [`MoveInput::Proposed`].
    ProposeRecord {
        dataset: DatasetId,
        epoch: u64,
        snapshot: SnapshotRecord,
    },
    /// Push `snapshot` of `dataset` (as recorded so far) to the target. Answer:
    /// [`MoveInput::Pushed`].
    Push { dataset: Dataset, snapshot: String },
    /// Propose [`Command::CancelDatasetMove`]: the target has no room. Answer:
    /// [`MoveInput::Proposed`] (whatever it says, the attempt then fails with `reason`).
    ProposeCancel { dataset: DatasetId, reason: String },
    /// Propose [`Command::HandoffDatasetMove`]. Answer: [`MoveInput::Proposed`].
    ProposeHandoff {
        dataset: DatasetId,
        epoch: u64,
        to: NodeId,
    },
    /// Wait for the local state to change, at most until `until`; then ask again.
    AwaitHandoffApplied { until: Instant },
    /// Take the dataset's start gate and hold it until the attempt ends. Answer:
    /// [`MoveInput::GateHeld`].
    TakeStartGate { dataset: DatasetId },
    /// List the drivers' instances. Answer: [`MoveInput::Users`].
    ObserveUsers { apps: Vec<String> },
    /// Propose [`Command::CommitDatasetMove`]. Answer: [`MoveInput::Proposed`].
    ProposeCommit {
        dataset: DatasetId,
        epoch: u64,
        to: NodeId,
        snapshot: String,
    },
    /// Wait for the local state to reach `epoch` for the dataset, at most until `until`;
    /// then ask again.
    AwaitApplied { epoch: u64, until: Instant },
    /// Wait until then; then ask again.
    Wait(Instant),
    /// The attempt ended: committed, or nothing (left) to do.
    Done,
    /// The attempt failed; the move may be tried again later.
    Failed(String),
}

impl MoveStep {
    /// The command a `Propose*` step proposes.
    pub fn command(&self) -> Option<Command> {
        Some(match self {
            MoveStep::ProposeRecord {
                dataset,
                epoch,
                snapshot,
            } => Command::RecordSnapshot {
                dataset: *dataset,
                epoch: *epoch,
                snapshot: snapshot.clone(),
            },
            MoveStep::ProposeCancel { dataset, .. } => {
                Command::CancelDatasetMove { dataset: *dataset }
            }
            MoveStep::ProposeHandoff { dataset, epoch, to } => Command::HandoffDatasetMove {
                dataset: *dataset,
                epoch: *epoch,
                to: *to,
            },
            MoveStep::ProposeCommit {
                dataset,
                epoch,
                to,
                snapshot,
            } => Command::CommitDatasetMove {
                dataset: *dataset,
                epoch: *epoch,
                to: *to,
                snapshot: snapshot.clone(),
            },
            _ => return None,
        })
    }
}

/// The result of a step's IO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoveInput {
    Connected(Result<(), String>),
    /// The snapshot taken (its record, under the dataset's epoch).
    Snapshot(Result<SnapshotRecord, String>),
    /// What applying the proposed command returned; `Err`: it could not be proposed (no
    /// leader, a timeout: it may or may not have applied).
    Proposed(Result<CommandResult, String>),
    /// The payload bytes the push streamed.
    Pushed(Result<u64, PushFailure>),
    GateHeld,
    Users(InstancesSeen),
}

/// Which round a snapshot belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Round {
    /// Phase one's round n (from 1), while the app runs.
    Copy(u32),
    /// The last one, with the users stopped (or none).
    Final,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Stage {
    Start,
    Connecting,
    /// About to take the round's snapshot.
    Snapshot(Round),
    Snapshotting(Round),
    Recording(Round, SnapshotRecord),
    Pushing(Round, String),
    Cancelling(String),
    HandingOff,
    /// Phase two: until the handoff shows in the local state.
    AwaitHandoff,
    TakingGate,
    /// Gate held: looking at the users' instances until none runs.
    Users {
        /// The users asked about, while an observation is out.
        asked: Option<Vec<(String, Driver)>>,
        /// The last observation's verdict, not yet acted on.
        verdict: Option<Result<(), String>>,
        /// When to look again after a negative verdict.
        again_at: Option<Instant>,
    },
    Committing(String),
    Applied {
        epoch: u64,
        deadline: Option<Instant>,
    },
    Finished(Result<(), String>),
}

/// One attempt of a dataset's move from this node to `to`.
#[derive(Clone, Debug)]
pub struct Move {
    dataset: DatasetId,
    to: NodeId,
    stage: Stage,
    /// The target's name and address, looked up at the start.
    target: (String, String),
    /// The dataset as recorded at the start, plus the snapshots this attempt recorded since.
    ds: Option<Dataset>,
    /// The apps that use the dataset (at the start), with their drivers.
    users: Vec<(String, Driver)>,
    /// Phase one's last round's bytes.
    last_bytes: Option<u64>,
    /// Phase two's end: when the handoff must have applied and the users stopped.
    stop_deadline: Option<Instant>,
    /// Whether this attempt saw the dataset's apps stopped (its last round is then the final
    /// delta).
    app_stopped: bool,
    /// Whether this attempt reported how it ended (a failed one that did not says
    /// [`MovePhase::Retrying`]).
    end_reported: bool,
    progress: VecDeque<Progress>,
}

impl Move {
    /// An attempt of the move of `dataset` to `to` that Raft recorded.
    pub fn new(dataset: DatasetId, to: NodeId) -> Move {
        Move {
            dataset,
            to,
            stage: Stage::Start,
            target: (String::new(), String::new()),
            ds: None,
            users: Vec::new(),
            last_bytes: None,
            stop_deadline: None,
            app_stopped: false,
            end_reported: false,
            progress: VecDeque::new(),
        }
    }

    /// The dataset moving.
    pub fn dataset(&self) -> DatasetId {
        self.dataset
    }

    /// The node it moves to.
    pub fn to(&self) -> NodeId {
        self.to
    }

    /// The next change of what the API reports, oldest first.
    pub fn poll_progress(&mut self) -> Option<Progress> {
        self.progress.pop_front()
    }

    /// The next IO to do, given the state this node applied (`state`), which node this is
    /// (`me`) and the time.
    pub fn next(&mut self, state: &ClusterState, me: NodeId, now: Instant) -> MoveStep {
        loop {
            match &mut self.stage {
                Stage::Start => {
                    let Some(node) = state.nodes.get(&self.to) else {
                        return self.finish(Err(format!("node {} is no longer a member", self.to)));
                    };
                    self.target = (node.name.clone(), node.addr.clone());
                    let Some(ds) = state
                        .datasets
                        .get(&self.dataset)
                        .filter(|d| is_moving(d, me, self.to))
                    else {
                        // Committed, cancelled, or never this node's to carry out.
                        return self.finish(Ok(()));
                    };
                    self.users = state
                        .apps_of_dataset(self.dataset)
                        .map(|(name, app)| (name.clone(), Driver::of(app.spec.image.as_deref())))
                        .collect();
                    self.ds = Some(ds.clone());
                    self.report(MovePhase::Snapshot, Some(0), None);
                    self.stage = Stage::Connecting;
                }
                Stage::Connecting => {
                    return MoveStep::Connect {
                        to: self.to,
                        name: self.target.0.clone(),
                        addr: self.target.1.clone(),
                    }
                }
                Stage::Snapshot(round) => {
                    let round = *round;
                    if !self.still_moving(state, me) {
                        return self.ended_elsewhere();
                    }
                    if round == Round::Final && self.app_stopped {
                        // A new count: the final delta's push.
                        self.report(MovePhase::FinalDelta, Some(0), None);
                    } else {
                        self.report(MovePhase::Snapshot, None, None);
                    }
                    self.stage = Stage::Snapshotting(round);
                }
                Stage::Snapshotting(_) => {
                    return MoveStep::TakeSnapshot {
                        dataset: self.working().clone(),
                    }
                }
                Stage::Recording(_, record) => {
                    return MoveStep::ProposeRecord {
                        dataset: self.dataset,
                        epoch: record.epoch,
                        snapshot: record.clone(),
                    }
                }
                Stage::Pushing(_, snapshot) => {
                    let snapshot = snapshot.clone();
                    return MoveStep::Push {
                        dataset: self.working().clone(),
                        snapshot,
                    };
                }
                Stage::Cancelling(reason) => {
                    return MoveStep::ProposeCancel {
                        dataset: self.dataset,
                        reason: reason.clone(),
                    }
                }
                Stage::HandingOff => {
                    return MoveStep::ProposeHandoff {
                        dataset: self.dataset,
                        epoch: self.working().epoch,
                        to: self.to,
                    }
                }
                Stage::AwaitHandoff => {
                    let deadline = *self.stop_deadline.get_or_insert(now + STOP_TIMEOUT);
                    if !self.still_moving(state, me) {
                        return self.ended_elsewhere();
                    }
                    // Only once the handoff shows here may the gate be taken: an app start
                    // that re-checks the state under the gate then sees it and stays off.
                    let handed_off = state
                        .datasets
                        .get(&self.dataset)
                        .and_then(|d| d.moving.as_ref())
                        .is_some_and(|m| m.handoff);
                    if handed_off || self.users.is_empty() {
                        self.stage = Stage::TakingGate;
                        continue;
                    }
                    if now >= deadline {
                        let name = self.working().name.clone();
                        return self.finish(Err(format!(
                            "the handoff of {name} did not apply on this node within {STOP_TIMEOUT:?}"
                        )));
                    }
                    return MoveStep::AwaitHandoffApplied {
                        until: (now + APPLY_POLL).min(deadline),
                    };
                }
                Stage::TakingGate => {
                    return MoveStep::TakeStartGate {
                        dataset: self.dataset,
                    }
                }
                Stage::Users {
                    asked,
                    verdict,
                    again_at,
                } => {
                    if let Some(apps) = asked {
                        return MoveStep::ObserveUsers {
                            apps: apps.iter().map(|(a, _)| a.clone()).collect(),
                        };
                    }
                    let verdict = verdict.take();
                    let again = *again_at;
                    if !self.still_moving(state, me) {
                        return self.ended_elsewhere();
                    }
                    let deadline = self.stop_deadline.unwrap_or(now);
                    match verdict {
                        Some(Ok(())) => {
                            self.app_stopped = true;
                            self.stage = Stage::Snapshot(Round::Final);
                            continue;
                        }
                        Some(Err(why)) if now >= deadline => {
                            let name = self.working().name.clone();
                            return self.finish(Err(format!(
                                "the app using {name} did not stop here: {why}"
                            )));
                        }
                        Some(Err(_)) => {
                            let at = now + STOP_POLL;
                            self.stage = Stage::Users {
                                asked: None,
                                verdict: None,
                                again_at: Some(at),
                            };
                            return MoveStep::Wait(at);
                        }
                        None => {}
                    }
                    if let Some(at) = again.filter(|at| now < *at) {
                        return MoveStep::Wait(at);
                    }
                    // The users at the start and now (an app removed meanwhile may still run).
                    let mut users = self.users.clone();
                    for (name, app) in state.apps_of_dataset(self.dataset) {
                        let user = (name.clone(), Driver::of(app.spec.image.as_deref()));
                        if !users.contains(&user) {
                            users.push(user);
                        }
                    }
                    if users.is_empty() {
                        self.stage = Stage::Snapshot(Round::Final);
                        continue;
                    }
                    self.stage = Stage::Users {
                        asked: Some(users),
                        verdict: None,
                        again_at: None,
                    };
                }
                Stage::Committing(snapshot) => {
                    let snapshot = snapshot.clone();
                    return MoveStep::ProposeCommit {
                        dataset: self.dataset,
                        epoch: self.working().epoch,
                        to: self.to,
                        snapshot,
                    };
                }
                Stage::Applied { epoch, deadline } => {
                    let epoch = *epoch;
                    let deadline = *deadline.get_or_insert(now + APPLY_TIMEOUT);
                    let applied = state
                        .datasets
                        .get(&self.dataset)
                        .is_none_or(|d| d.epoch >= epoch);
                    if applied || now >= deadline {
                        self.report(MovePhase::Done, None, None);
                        return self.finish(Ok(()));
                    }
                    return MoveStep::AwaitApplied {
                        epoch,
                        until: (now + APPLY_POLL).min(deadline),
                    };
                }
                Stage::Finished(Ok(())) => return MoveStep::Done,
                Stage::Finished(Err(e)) => return MoveStep::Failed(e.clone()),
            }
        }
    }

    /// The result of the step [`Move::next`] returned last. An input that does not answer
    /// that step is ignored.
    pub fn observe(&mut self, input: MoveInput) {
        let stage = std::mem::replace(&mut self.stage, Stage::Start);
        self.stage = match (stage, input) {
            (Stage::Connecting, MoveInput::Connected(Ok(()))) => {
                let handed_off = self.working().moving.as_ref().is_some_and(|m| m.handoff);
                if self.users.is_empty() {
                    Stage::AwaitHandoff
                } else if handed_off {
                    // A resumed move: phase one is over, the app is being stopped.
                    self.report(MovePhase::StoppingApp, None, None);
                    Stage::AwaitHandoff
                } else {
                    Stage::Snapshot(Round::Copy(1))
                }
            }
            (Stage::Connecting, MoveInput::Connected(Err(e))) => Stage::Finished(Err(e)),
            (Stage::Snapshotting(round), MoveInput::Snapshot(Ok(record))) => {
                Stage::Recording(round, record)
            }
            (Stage::Snapshotting(_), MoveInput::Snapshot(Err(e))) => Stage::Finished(Err(e)),
            (Stage::Recording(round, record), MoveInput::Proposed(Ok(r))) => match r {
                CommandResult::Rejected(e) => {
                    Stage::Finished(Err(format!("recording the move's snapshot: {e}")))
                }
                _ => {
                    // Part of the history the push carries from now on.
                    let name = record.name.clone();
                    if let Some(ds) = &mut self.ds {
                        ds.snapshots.push(record);
                    }
                    Stage::Pushing(round, name)
                }
            },
            (Stage::Recording(..), MoveInput::Proposed(Err(e))) => Stage::Finished(Err(e)),
            (Stage::Pushing(round, snapshot), MoveInput::Pushed(Ok(bytes))) => match round {
                Round::Copy(n) => {
                    let shrank = self.last_bytes.is_none_or(|l| bytes < l);
                    if bytes <= SMALL_DELTA || !shrank || n >= MAX_ROUNDS {
                        self.report(MovePhase::Handoff, None, None);
                        Stage::HandingOff
                    } else {
                        self.last_bytes = Some(bytes);
                        Stage::Snapshot(Round::Copy(n + 1))
                    }
                }
                Round::Final => {
                    self.report(MovePhase::Committing, None, None);
                    Stage::Committing(snapshot)
                }
            },
            (Stage::Pushing(..), MoveInput::Pushed(Err(PushFailure::NoSpace(e)))) => {
                // Waiting cannot make room: the move is given up, the dataset stays here.
                self.report(MovePhase::Failed, None, Some(e.clone()));
                Stage::Cancelling(e)
            }
            (Stage::Pushing(..), MoveInput::Pushed(Err(PushFailure::Other(e)))) => {
                self.report(MovePhase::Retrying, None, Some(e.clone()));
                Stage::Finished(Err(e))
            }
            (Stage::Cancelling(reason), MoveInput::Proposed(_)) => Stage::Finished(Err(reason)),
            (Stage::HandingOff, MoveInput::Proposed(Ok(r))) => match r {
                CommandResult::HandedOff => {
                    self.report(MovePhase::StoppingApp, None, None);
                    Stage::AwaitHandoff
                }
                CommandResult::Rejected(
                    e @ (ApplyError::NoSuchMove { .. } | ApplyError::StaleEpoch { .. }),
                ) => {
                    // Cancelled, or someone else finished it: nothing left to do.
                    self.report(MovePhase::Failed, None, Some(e.to_string()));
                    Stage::Finished(Ok(()))
                }
                other => Stage::Finished(Err(format!("recording the handoff: {other:?}"))),
            },
            (Stage::HandingOff, MoveInput::Proposed(Err(e))) => Stage::Finished(Err(e)),
            (Stage::TakingGate, MoveInput::GateHeld) => Stage::Users {
                asked: None,
                verdict: None,
                again_at: None,
            },
            (
                Stage::Users {
                    asked: Some(users), ..
                },
                MoveInput::Users(seen),
            ) => Stage::Users {
                asked: None,
                verdict: Some(users_stopped(&users, &seen)),
                again_at: None,
            },
            (Stage::Committing(_), MoveInput::Proposed(Ok(r))) => match r {
                CommandResult::MoveCommitted { epoch } => Stage::Applied {
                    epoch,
                    deadline: None,
                },
                CommandResult::Rejected(
                    e @ (ApplyError::NoSuchMove { .. } | ApplyError::StaleEpoch { .. }),
                ) => {
                    self.report(MovePhase::Failed, None, Some(e.to_string()));
                    Stage::Finished(Ok(()))
                }
                other => Stage::Finished(Err(format!("committing the move: {other:?}"))),
            },
            (Stage::Committing(_), MoveInput::Proposed(Err(e))) => Stage::Finished(Err(e)),
            (stage, _) => stage,
        };
        self.report_failure();
    }

    /// The dataset as this attempt knows it (set at the start).
    fn working(&self) -> &Dataset {
        self.ds
            .as_ref()
            .expect("the dataset is known past the start")
    }

    /// Whether the state still has this node carry out the move this attempt started on.
    fn still_moving(&self, state: &ClusterState, me: NodeId) -> bool {
        let epoch = self.ds.as_ref().map(|d| d.epoch);
        state
            .datasets
            .get(&self.dataset)
            .is_some_and(|d| is_moving(d, me, self.to) && Some(d.epoch) == epoch)
    }

    /// The move was cancelled or finished by another attempt: nothing left to do.
    fn ended_elsewhere(&mut self) -> MoveStep {
        let name = self
            .ds
            .as_ref()
            .map_or_else(String::new, |d| d.name.clone());
        self.report(
            MovePhase::Failed,
            None,
            Some(format!(
                "the move of {name} to node {} is no longer recorded (cancelled, or finished)",
                self.to
            )),
        );
        self.finish(Ok(()))
    }

    fn finish(&mut self, r: Result<(), String>) -> MoveStep {
        self.stage = Stage::Finished(r);
        self.report_failure();
        match &self.stage {
            Stage::Finished(Err(e)) => MoveStep::Failed(e.clone()),
            _ => MoveStep::Done,
        }
    }

    /// A failed attempt that did not say how it ended says it will be retried (the datasets
    /// core starts another after a backoff), with why: its last phase is no longer current.
    fn report_failure(&mut self) {
        if let (Stage::Finished(Err(e)), false) = (&self.stage, self.end_reported) {
            let e = e.clone();
            self.report(MovePhase::Retrying, None, Some(e));
        }
    }

    fn report(&mut self, phase: MovePhase, bytes: Option<u64>, error: Option<String>) {
        self.end_reported |= phase.has_ended();
        self.progress.push_back(Progress {
            phase,
            bytes,
            error,
        });
    }
}

/// Whether `ds` is moving from `me` (its primary) to `to`.
fn is_moving(ds: &Dataset, me: NodeId, to: NodeId) -> bool {
    ds.primary == me && ds.moving.as_ref().is_some_and(|m| m.to == to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{cluster, deploy, ok, snap};
    use proptest::prelude::*;

    const ME: NodeId = 1;
    const TO: NodeId = 2;
    const MB: u64 = 1 << 20;

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    /// Three nodes; app db (process driver unless `image`) on n1 with dataset 1, moving to n2.
    fn app_moving(image: bool) -> ClusterState {
        let mut s = cluster(3);
        deploy(&mut s, &[("db", image, ME)]);
        ok(
            &mut s,
            Command::MoveApp {
                app: "db".into(),
                to: TO,
            },
        );
        s
    }

    /// Three nodes; dataset 1 (no app uses it) on n1, moving to n2.
    fn dataset_moving() -> ClusterState {
        let mut s = cluster(3);
        ok(
            &mut s,
            Command::CreateDataset {
                name: "files".into(),
                primary: ME,
                size_limit: None,
            },
        );
        ok(&mut s, Command::BeginDatasetMove { dataset: 1, to: TO });
        s
    }

    /// Applies the step's command to `s`: what the executor's proposal returns.
    fn propose(s: &mut ClusterState, step: &MoveStep) -> MoveInput {
        let cmd = step.command().expect("a proposal");
        MoveInput::Proposed(Ok(s.apply(&cmd)))
    }

    fn progress(mv: &mut Move) -> Vec<(MovePhase, Option<u64>, Option<String>)> {
        std::iter::from_fn(|| mv.poll_progress())
            .map(|p| (p.phase, p.bytes, p.error))
            .collect()
    }

    fn stopped() -> InstancesSeen {
        InstancesSeen {
            instances: vec![InstanceSeen {
                app: "db".into(),
                driver: Driver::Process,
                run: RunSeen::Exited,
            }],
            failed: vec![],
        }
    }

    fn seen(run: RunSeen) -> InstancesSeen {
        InstancesSeen {
            instances: vec![InstanceSeen {
                app: "db".into(),
                driver: Driver::Process,
                run,
            }],
            failed: vec![],
        }
    }

    /// Takes, records (against `s`) and pushes one snapshot named `name` of `bytes`, from the
    /// TakeSnapshot step on; returns the step after the push.
    fn round(
        mv: &mut Move,
        s: &mut ClusterState,
        name: &str,
        bytes: u64,
        now: Instant,
    ) -> MoveStep {
        let step = mv.next(s, ME, now);
        let MoveStep::TakeSnapshot { dataset } = &step else {
            panic!("expected a snapshot, got {step:?}");
        };
        let record = snap(name, bytes + 1, dataset.epoch);
        mv.observe(MoveInput::Snapshot(Ok(record.clone())));
        let step = mv.next(s, ME, now);
        assert_eq!(
            step,
            MoveStep::ProposeRecord {
                dataset: 1,
                epoch: dataset.epoch,
                snapshot: record
            }
        );
        let input = propose(s, &step);
        mv.observe(input);
        let step = mv.next(s, ME, now);
        let MoveStep::Push { dataset, snapshot } = &step else {
            panic!("expected a push, got {step:?}");
        };
        assert_eq!(snapshot, name);
        // The push carries the history recorded so far, this snapshot included.
        assert_eq!(dataset.snapshots, s.datasets[&1].snapshots);
        mv.observe(MoveInput::Pushed(Ok(bytes)));
        mv.next(s, ME, now)
    }

    /// Starts `mv` and answers the connect.
    fn connect(mv: &mut Move, s: &ClusterState) {
        assert_eq!(
            mv.next(s, ME, t(0)),
            MoveStep::Connect {
                to: TO,
                name: "n2".into(),
                addr: "h:2".into()
            }
        );
        mv.observe(MoveInput::Connected(Ok(())));
    }

    #[test]
    fn a_dataset_no_app_uses_moves_in_one_round_and_commits() {
        let mut s = dataset_moving();
        let mut mv = Move::new(1, TO);
        connect(&mut mv, &s);
        // No app to stop: no handoff, but the gate still, then the only round.
        assert_eq!(
            mv.next(&s, ME, t(0)),
            MoveStep::TakeStartGate { dataset: 1 }
        );
        mv.observe(MoveInput::GateHeld);
        let step = round(&mut mv, &mut s, "m1", 10 * MB, t(0));
        assert_eq!(
            step,
            MoveStep::ProposeCommit {
                dataset: 1,
                epoch: 1,
                to: TO,
                snapshot: "m1".into()
            }
        );
        let input = propose(&mut s, &step);
        assert_eq!(
            input,
            MoveInput::Proposed(Ok(CommandResult::MoveCommitted { epoch: 2 }))
        );
        mv.observe(input);
        assert_eq!(mv.next(&s, ME, t(0)), MoveStep::Done);
        assert_eq!((s.datasets[&1].primary, s.datasets[&1].epoch), (TO, 2));
        assert_eq!(
            progress(&mut mv),
            vec![
                (MovePhase::Snapshot, Some(0), None),
                (MovePhase::Snapshot, None, None),
                (MovePhase::Committing, None, None),
                (MovePhase::Done, None, None),
            ]
        );
    }

    /// Drives phase one with pushes of `sizes` bytes; the rounds it took until the handoff.
    fn rounds_until_handoff(sizes: &[u64]) -> usize {
        let mut s = app_moving(false);
        let mut mv = Move::new(1, TO);
        connect(&mut mv, &s);
        for (i, &bytes) in sizes.iter().enumerate() {
            let step = round(&mut mv, &mut s, &format!("m{i}"), bytes, t(0));
            if let MoveStep::ProposeHandoff { dataset, epoch, to } = step {
                assert_eq!((dataset, epoch, to), (1, 1, TO));
                return i + 1;
            }
        }
        panic!("no handoff after {sizes:?}");
    }

    #[test]
    fn copy_rounds_go_on_while_the_delta_shrinks() {
        // A small delta goes with the app stopped.
        assert_eq!(rounds_until_handoff(&[SMALL_DELTA]), 1);
        assert_eq!(rounds_until_handoff(&[100 * MB, SMALL_DELTA]), 2);
        // A delta that stops shrinking will not get smaller by waiting.
        assert_eq!(rounds_until_handoff(&[100 * MB, 50 * MB, 50 * MB]), 3);
        assert_eq!(rounds_until_handoff(&[100 * MB, 50 * MB, 60 * MB]), 3);
        // At most MAX_ROUNDS, however it shrinks.
        let shrinking: Vec<u64> = (0..20).map(|i| (100 - i) * MB).collect();
        assert_eq!(rounds_until_handoff(&shrinking), MAX_ROUNDS as usize);
    }

    /// Phase one of the app's move done and the handoff proposed and applied to `s`, whose
    /// copy the caller decides to show to the move or not.
    fn handed_off(s: &mut ClusterState) -> Move {
        let mut mv = Move::new(1, TO);
        connect(&mut mv, s);
        let step = round(&mut mv, s, "m1", MB, t(0));
        assert!(matches!(step, MoveStep::ProposeHandoff { .. }), "{step:?}");
        let input = propose(s, &step);
        assert_eq!(input, MoveInput::Proposed(Ok(CommandResult::HandedOff)));
        mv.observe(input);
        mv
    }

    #[test]
    fn the_gate_is_taken_only_once_the_handoff_shows_here() {
        let mut applied = app_moving(false);
        let mut mv = handed_off(&mut applied);
        // This node has not applied the handoff yet: an observation now proves nothing (an app
        // start may still slip in), and is ignored.
        let mut local = app_moving(false);
        local.datasets.get_mut(&1).unwrap().snapshots = applied.datasets[&1].snapshots.clone();
        for ms in [0, 10, 20] {
            assert_eq!(
                mv.next(&local, ME, t(ms)),
                MoveStep::AwaitHandoffApplied {
                    until: t(ms) + APPLY_POLL
                }
            );
            mv.observe(MoveInput::GateHeld);
            mv.observe(MoveInput::Users(stopped()));
        }
        assert_eq!(
            mv.next(&applied, ME, t(30)),
            MoveStep::TakeStartGate { dataset: 1 }
        );
        mv.observe(MoveInput::Users(stopped()));
        assert_eq!(
            mv.next(&applied, ME, t(30)),
            MoveStep::TakeStartGate { dataset: 1 }
        );
        mv.observe(MoveInput::GateHeld);
        assert_eq!(
            mv.next(&applied, ME, t(30)),
            MoveStep::ObserveUsers {
                apps: vec!["db".into()]
            }
        );
        mv.observe(MoveInput::Users(stopped()));
        let step = mv.next(&applied, ME, t(30));
        assert!(matches!(step, MoveStep::TakeSnapshot { .. }), "{step:?}");
    }

    #[test]
    fn a_handoff_that_never_shows_here_fails_the_attempt() {
        let mut applied = app_moving(false);
        let mut mv = handed_off(&mut applied);
        let local = app_moving(false);
        assert!(matches!(
            mv.next(&local, ME, t(1000)),
            MoveStep::AwaitHandoffApplied { .. }
        ));
        let end = t(1000) + STOP_TIMEOUT;
        assert_eq!(
            mv.next(
                &local,
                ME,
                t(1000) + (STOP_TIMEOUT - Duration::from_millis(5))
            ),
            MoveStep::AwaitHandoffApplied { until: end }
        );
        let step = mv.next(&local, ME, end);
        assert!(
            matches!(&step, MoveStep::Failed(e) if e.contains("did not apply")),
            "{step:?}"
        );
    }

    /// A handed-off move holding the gate, about to observe the users, at time 0.
    fn at_the_stop_check() -> (ClusterState, Move) {
        let mut s = app_moving(false);
        let mut mv = handed_off(&mut s);
        assert_eq!(
            mv.next(&s, ME, t(0)),
            MoveStep::TakeStartGate { dataset: 1 }
        );
        mv.observe(MoveInput::GateHeld);
        progress(&mut mv);
        (s, mv)
    }

    #[test]
    fn running_unknown_or_unlisted_users_keep_it_waiting_then_fail_without_a_snapshot() {
        let (s, mut mv) = at_the_stop_check();
        let waits = [
            seen(RunSeen::Running),
            seen(RunSeen::Unknown {
                reason: "inspect timed out".into(),
            }),
            InstancesSeen {
                instances: vec![],
                failed: vec![(Driver::Process, "ps failed".into())],
            },
            // The listing failed, even though what it found says exited.
            InstancesSeen {
                failed: vec![(Driver::Process, "half a listing".into())],
                ..stopped()
            },
        ];
        let mut now = t(0);
        for (i, w) in waits.iter().cycle().take(40).enumerate() {
            assert_eq!(
                mv.next(&s, ME, now),
                MoveStep::ObserveUsers {
                    apps: vec!["db".into()]
                },
                "look {i}"
            );
            mv.observe(MoveInput::Users(w.clone()));
            assert_eq!(mv.next(&s, ME, now), MoveStep::Wait(now + STOP_POLL));
            // Asked early, it keeps waiting.
            assert_eq!(mv.next(&s, ME, now), MoveStep::Wait(now + STOP_POLL));
            now = now + STOP_POLL;
        }
        // At the deadline, one more negative observation fails the attempt.
        let end = t(0) + STOP_TIMEOUT;
        assert!(matches!(
            mv.next(&s, ME, end),
            MoveStep::ObserveUsers { .. }
        ));
        mv.observe(MoveInput::Users(seen(RunSeen::Unknown {
            reason: "engine gone".into(),
        })));
        let step = mv.next(&s, ME, end);
        assert_eq!(
            step,
            MoveStep::Failed(
                "the app using db did not stop here: app db's instance here is in an unknown state: engine gone"
                    .into()
            )
        );
        assert_eq!(mv.next(&s, ME, end), step);
        // The line shown says the attempt failed and why, not that it still waits.
        let MoveStep::Failed(why) = step else {
            unreachable!()
        };
        assert_eq!(
            progress(&mut mv),
            vec![(MovePhase::Retrying, None, Some(why))]
        );
    }

    #[test]
    fn a_positive_observation_goes_on_to_the_last_round_and_commits() {
        let (mut s, mut mv) = at_the_stop_check();
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Users(seen(RunSeen::Running)));
        assert_eq!(mv.next(&s, ME, t(0)), MoveStep::Wait(t(10)));
        assert!(matches!(
            mv.next(&s, ME, t(10)),
            MoveStep::ObserveUsers { .. }
        ));
        // Stopped, and another driver's listing failed: that driver runs none of the users.
        mv.observe(MoveInput::Users(InstancesSeen {
            failed: vec![(Driver::Docker, "no engine".into())],
            ..stopped()
        }));
        let step = round(&mut mv, &mut s, "m2", 1000, t(10));
        assert_eq!(
            step,
            MoveStep::ProposeCommit {
                dataset: 1,
                epoch: 1,
                to: TO,
                snapshot: "m2".into()
            }
        );
        let input = propose(&mut s, &step);
        mv.observe(input);
        assert_eq!(mv.next(&s, ME, t(10)), MoveStep::Done);
        assert_eq!(s.datasets[&1].primary, TO);
    }

    #[test]
    fn a_move_cancelled_while_it_waits_ends_and_frees_the_gate() {
        let (mut s, mut mv) = at_the_stop_check();
        mv.next(&s, ME, t(0));
        // The app runs again here: its move was cancelled.
        mv.observe(MoveInput::Users(seen(RunSeen::Running)));
        ok(&mut s, Command::CancelDatasetMove { dataset: 1 });
        assert_eq!(mv.next(&s, ME, t(0)), MoveStep::Done);
        let p = progress(&mut mv);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, MovePhase::Failed);
        assert!(
            p[0].2
                .as_deref()
                .is_some_and(|e| e.contains("no longer recorded")),
            "{p:?}"
        );
    }

    #[test]
    fn a_user_removed_meanwhile_is_still_looked_for_and_a_new_one_too() {
        let (mut s, mut mv) = at_the_stop_check();
        let app = s.apps.remove("db").unwrap();
        s.apps.insert("db2".into(), app);
        assert_eq!(
            mv.next(&s, ME, t(0)),
            MoveStep::ObserveUsers {
                apps: vec!["db".into(), "db2".into()]
            }
        );
        mv.observe(MoveInput::Users(InstancesSeen {
            instances: vec![InstanceSeen {
                app: "db2".into(),
                driver: Driver::Process,
                run: RunSeen::Running,
            }],
            failed: vec![],
        }));
        assert_eq!(mv.next(&s, ME, t(0)), MoveStep::Wait(t(10)));
    }

    #[test]
    fn a_resumed_move_past_the_handoff_goes_straight_to_phase_two() {
        let mut s = app_moving(true);
        ok(
            &mut s,
            Command::HandoffDatasetMove {
                dataset: 1,
                epoch: 1,
                to: TO,
            },
        );
        let mut mv = Move::new(1, TO);
        connect(&mut mv, &s);
        assert_eq!(
            mv.next(&s, ME, t(0)),
            MoveStep::TakeStartGate { dataset: 1 }
        );
        mv.observe(MoveInput::GateHeld);
        assert!(matches!(
            mv.next(&s, ME, t(0)),
            MoveStep::ObserveUsers { .. }
        ));
        // A docker app: the docker listing failing is not a positive observation.
        mv.observe(MoveInput::Users(InstancesSeen {
            instances: vec![],
            failed: vec![(Driver::Docker, "engine timeout".into())],
        }));
        assert_eq!(mv.next(&s, ME, t(0)), MoveStep::Wait(t(10)));
    }

    #[test]
    fn no_space_on_the_target_cancels_the_move() {
        let mut s = app_moving(false);
        let mut mv = Move::new(1, TO);
        connect(&mut mv, &s);
        progress(&mut mv);
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Snapshot(Ok(snap("m1", 5, 1))));
        let step = mv.next(&s, ME, t(0));
        let input = propose(&mut s, &step);
        mv.observe(input);
        assert!(matches!(mv.next(&s, ME, t(0)), MoveStep::Push { .. }));
        mv.observe(MoveInput::Pushed(Err(PushFailure::NoSpace(
            "n2 is full".into(),
        ))));
        let step = mv.next(&s, ME, t(0));
        assert_eq!(
            step,
            MoveStep::ProposeCancel {
                dataset: 1,
                reason: "n2 is full".into()
            }
        );
        assert_eq!(
            step.command(),
            Some(Command::CancelDatasetMove { dataset: 1 })
        );
        mv.observe(MoveInput::Proposed(Err("no leader".into())));
        assert_eq!(mv.next(&s, ME, t(0)), MoveStep::Failed("n2 is full".into()));
        assert_eq!(
            progress(&mut mv),
            vec![
                (MovePhase::Snapshot, None, None),
                (MovePhase::Failed, None, Some("n2 is full".into()))
            ]
        );
    }

    #[test]
    fn other_failures_fail_the_attempt_for_a_retry() {
        let s = app_moving(false);
        // The target left the cluster.
        let mut gone = s.clone();
        gone.nodes.remove(&TO);
        let mut mv = Move::new(1, TO);
        assert_eq!(
            mv.next(&gone, ME, t(0)),
            MoveStep::Failed("node 2 is no longer a member".into())
        );
        // Connecting.
        let mut mv = Move::new(1, TO);
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Connected(Err("unreachable".into())));
        assert_eq!(
            mv.next(&s, ME, t(0)),
            MoveStep::Failed("unreachable".into())
        );
        assert_eq!(
            progress(&mut mv),
            vec![
                (MovePhase::Snapshot, Some(0), None),
                (MovePhase::Retrying, None, Some("unreachable".into()))
            ]
        );
        // The snapshot, its record, the push.
        for (input, expect) in [
            (MoveInput::Snapshot(Err("disk".into())), "disk".to_string()),
            (
                MoveInput::Proposed(Ok(CommandResult::Rejected(ApplyError::UnknownDataset {
                    id: 1,
                }))),
                "recording the move's snapshot: ".to_string(),
            ),
            (
                MoveInput::Pushed(Err(PushFailure::Other("reset".into()))),
                "reset".to_string(),
            ),
        ] {
            let mut mv = Move::new(1, TO);
            connect(&mut mv, &s);
            loop {
                let step = mv.next(&s, ME, t(0));
                let answers = match (&step, &input) {
                    (MoveStep::TakeSnapshot { .. }, MoveInput::Snapshot(_))
                    | (MoveStep::ProposeRecord { .. }, MoveInput::Proposed(_))
                    | (MoveStep::Push { .. }, MoveInput::Pushed(_)) => true,
                    (MoveStep::Failed(e), _) => {
                        assert!(e.starts_with(&expect), "{e} for {input:?}");
                        break;
                    }
                    _ => false,
                };
                if answers {
                    mv.observe(input.clone());
                } else {
                    match step {
                        MoveStep::TakeSnapshot { .. } => {
                            mv.observe(MoveInput::Snapshot(Ok(snap("m1", 5, 1))))
                        }
                        MoveStep::ProposeRecord { .. } => {
                            mv.observe(MoveInput::Proposed(Ok(CommandResult::SnapshotRecorded)))
                        }
                        other => panic!("{other:?} for {input:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn a_handoff_or_commit_refused_as_stale_ends_quietly() {
        let stale = ApplyError::StaleEpoch {
            dataset: "db".into(),
            epoch: 1,
            current: 2,
        };
        let mut s = app_moving(false);
        let mut mv = Move::new(1, TO);
        connect(&mut mv, &s);
        let step = round(&mut mv, &mut s, "m1", MB, t(0));
        assert!(matches!(step, MoveStep::ProposeHandoff { .. }));
        progress(&mut mv);
        mv.observe(MoveInput::Proposed(Ok(CommandResult::Rejected(
            stale.clone(),
        ))));
        assert_eq!(mv.next(&s, ME, t(0)), MoveStep::Done);
        assert_eq!(
            progress(&mut mv),
            vec![(MovePhase::Failed, None, Some(stale.to_string()))]
        );
        // Anything else is a failure to retry.
        let mut mv = Move::new(1, TO);
        connect(&mut mv, &s);
        round(&mut mv, &mut s, "m2", MB, t(0));
        mv.observe(MoveInput::Proposed(Ok(CommandResult::NodeReported)));
        assert_eq!(
            mv.next(&s, ME, t(0)),
            MoveStep::Failed("recording the handoff: NodeReported".into())
        );
        // The commit.
        let (mut s, mut mv) = at_the_stop_check();
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Users(stopped()));
        let step = round(&mut mv, &mut s, "m9", MB, t(0));
        assert!(matches!(step, MoveStep::ProposeCommit { .. }));
        mv.observe(MoveInput::Proposed(Ok(CommandResult::Rejected(
            ApplyError::NoSuchMove {
                dataset: "db".into(),
                to: TO,
            },
        ))));
        assert_eq!(mv.next(&s, ME, t(0)), MoveStep::Done);
    }

    #[test]
    fn a_commit_waits_a_while_for_this_node_to_apply_it() {
        let (mut s, mut mv) = at_the_stop_check();
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Users(stopped()));
        let step = round(&mut mv, &mut s, "m9", MB, t(0));
        let before = s.clone();
        let input = propose(&mut s, &step);
        mv.observe(input);
        progress(&mut mv);
        assert_eq!(
            mv.next(&before, ME, t(100)),
            MoveStep::AwaitApplied {
                epoch: 2,
                until: t(100) + APPLY_POLL
            }
        );
        assert_eq!(progress(&mut mv), vec![]);
        assert_eq!(mv.next(&s, ME, t(120)), MoveStep::Done);
        assert_eq!(progress(&mut mv), vec![(MovePhase::Done, None, None)]);
        // Not applied in time: done all the same (the commit is recorded).
        let (mut s, mut mv) = at_the_stop_check();
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Users(stopped()));
        let step = round(&mut mv, &mut s, "m9", MB, t(0));
        let before = s.clone();
        mv.observe(propose(&mut s, &step));
        mv.next(&before, ME, t(100));
        assert_eq!(mv.next(&before, ME, t(100) + APPLY_TIMEOUT), MoveStep::Done);
    }

    #[test]
    fn a_move_not_recorded_for_this_node_does_nothing() {
        let s = app_moving(false);
        for (me, to) in [(TO, TO), (ME, 3)] {
            let mut mv = Move::new(1, to);
            assert_eq!(mv.next(&s, me, t(0)), MoveStep::Done);
            assert_eq!(progress(&mut mv), vec![]);
        }
        let mut mv = Move::new(7, TO);
        assert_eq!(mv.next(&s, ME, t(0)), MoveStep::Done);
    }

    #[test]
    fn users_stopped_needs_a_positive_observation() {
        let users = vec![("db".to_string(), Driver::Process)];
        let other = |run| InstancesSeen {
            instances: vec![InstanceSeen {
                app: "web".into(),
                driver: Driver::Process,
                run,
            }],
            failed: vec![],
        };
        assert_eq!(users_stopped(&users, &InstancesSeen::default()), Ok(()));
        assert_eq!(users_stopped(&users, &stopped()), Ok(()));
        assert_eq!(users_stopped(&users, &other(RunSeen::Running)), Ok(()));
        assert_eq!(
            users_stopped(&users, &seen(RunSeen::Running)),
            Err("app db still runs here".into())
        );
        assert!(users_stopped(&users, &seen(RunSeen::Unknown { reason: "x".into() })).is_err());
        let failed = |d| InstancesSeen {
            instances: vec![],
            failed: vec![(d, "boom".into())],
        };
        assert_eq!(
            users_stopped(&users, &failed(Driver::Process)),
            Err("the process driver could not list its instances: boom".into())
        );
        assert_eq!(users_stopped(&users, &failed(Driver::Docker)), Ok(()));
        // An instance of a user under another driver than its own counts too.
        let docker_instance = InstancesSeen {
            instances: vec![InstanceSeen {
                app: "db".into(),
                driver: Driver::Docker,
                run: RunSeen::Running,
            }],
            failed: vec![],
        };
        assert!(users_stopped(&users, &docker_instance).is_err());
    }

    #[test]
    fn phases_keep_the_names_clients_know() {
        let names: Vec<&str> = [
            MovePhase::Snapshot,
            MovePhase::Full,
            MovePhase::Incremental,
            MovePhase::Handoff,
            MovePhase::Committing,
            MovePhase::Done,
            MovePhase::Failed,
            MovePhase::Retrying,
            MovePhase::StoppingApp,
            MovePhase::FinalDelta,
        ]
        .into_iter()
        .map(|p| {
            assert_eq!(MovePhase::from_name(p.as_str()), Some(p));
            assert_eq!(p.to_string(), p.as_str());
            p.as_str()
        })
        .collect();
        assert_eq!(
            names,
            [
                "snapshot",
                "full",
                "incremental",
                "handoff",
                "committing",
                "done",
                "failed",
                "retrying",
                "stopping-app",
                "final-delta"
            ]
        );
        assert_eq!(MovePhase::from_name("other"), None);
        assert_eq!(MovePhase::ALL.len(), names.len());
    }

    /// Drives `mv` to its end against `s` (which applies every proposal at once), answering
    /// pushes with `sizes` bytes in turn; returns the phases a client sees, in order, without
    /// repeats. A push shows [`MovePhase::streaming`] of the phase before it, its stream being
    /// full for the first push and incremental after (as the executor reports it).
    fn shown_phases(mv: &mut Move, s: &mut ClusterState, sizes: &[u64]) -> Vec<&'static str> {
        let mut shown: Vec<MovePhase> = Vec::new();
        let show = |shown: &mut Vec<MovePhase>, p: MovePhase| {
            if shown.last() != Some(&p) {
                shown.push(p);
            }
        };
        let mut sizes = sizes.iter();
        let mut pushes = 0;
        for _ in 0..100 {
            let step = mv.next(s, ME, t(0));
            while let Some(p) = mv.poll_progress() {
                show(&mut shown, p.phase);
            }
            let input = match &step {
                MoveStep::Connect { .. } => MoveInput::Connected(Ok(())),
                MoveStep::TakeSnapshot { dataset } => {
                    let n = s.datasets[&1].snapshots.len() as u64 + 1;
                    MoveInput::Snapshot(Ok(snap(&format!("m{n}"), n, dataset.epoch)))
                }
                MoveStep::Push { .. } => {
                    let stream = if pushes == 0 { "full" } else { "incremental" };
                    pushes += 1;
                    let last = *shown.last().expect("a phase before the push");
                    show(&mut shown, last.streaming(stream));
                    MoveInput::Pushed(Ok(*sizes.next().expect("a size for every push")))
                }
                MoveStep::TakeStartGate { .. } => MoveInput::GateHeld,
                MoveStep::ObserveUsers { .. } => MoveInput::Users(stopped()),
                MoveStep::Done => return shown.iter().map(|p| p.as_str()).collect(),
                other if other.command().is_some() => propose(s, other),
                other => panic!("unexpected {other:?}"),
            };
            mv.observe(input);
        }
        panic!("the move did not end; shown so far: {shown:?}");
    }

    #[test]
    fn a_move_with_an_app_shows_each_phase_in_order() {
        let mut s = app_moving(false);
        let mut mv = Move::new(1, TO);
        // Two copy rounds (the second delta is small), the handoff, the stop, the last round.
        assert_eq!(
            shown_phases(&mut mv, &mut s, &[100 * MB, MB, 1000]),
            [
                "snapshot",
                "full",
                "snapshot",
                "incremental",
                "handoff",
                "stopping-app",
                "final-delta",
                "committing",
                "done"
            ]
        );
        assert_eq!(s.datasets[&1].primary, TO);
    }

    #[test]
    fn a_resumed_move_shows_the_stop_then_the_final_delta() {
        let mut s = app_moving(false);
        ok(
            &mut s,
            Command::HandoffDatasetMove {
                dataset: 1,
                epoch: 1,
                to: TO,
            },
        );
        let mut mv = Move::new(1, TO);
        assert_eq!(
            shown_phases(&mut mv, &mut s, &[MB]),
            [
                "snapshot",
                "stopping-app",
                "final-delta",
                "committing",
                "done"
            ]
        );
    }

    #[test]
    fn a_dataset_no_app_uses_shows_no_app_phases() {
        let mut s = dataset_moving();
        let mut mv = Move::new(1, TO);
        assert_eq!(
            shown_phases(&mut mv, &mut s, &[10 * MB]),
            ["snapshot", "full", "committing", "done"]
        );
    }

    #[test]
    fn the_final_delta_count_starts_at_zero() {
        let (mut s, mut mv) = at_the_stop_check();
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Users(stopped()));
        round(&mut mv, &mut s, "m9", MB, t(0));
        assert_eq!(
            progress(&mut mv),
            vec![
                (MovePhase::FinalDelta, Some(0), None),
                (MovePhase::Committing, None, None)
            ]
        );
    }

    #[test]
    fn every_failed_attempt_ends_its_line_once() {
        // A handoff that never applies here: the line says retrying, with why.
        let mut applied = app_moving(false);
        let mut mv = handed_off(&mut applied);
        let local = app_moving(false);
        progress(&mut mv);
        mv.next(&local, ME, t(0));
        let step = mv.next(&local, ME, t(0) + STOP_TIMEOUT);
        let MoveStep::Failed(why) = step else {
            panic!("{step:?}")
        };
        assert_eq!(
            progress(&mut mv),
            vec![(MovePhase::Retrying, None, Some(why))]
        );
        // No room: failed, and not retrying as well.
        let mut s = app_moving(false);
        let mut mv = Move::new(1, TO);
        connect(&mut mv, &s);
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Snapshot(Ok(snap("m1", 5, 1))));
        let step = mv.next(&s, ME, t(0));
        mv.observe(propose(&mut s, &step));
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Pushed(Err(PushFailure::NoSpace("full".into()))));
        mv.next(&s, ME, t(0));
        mv.observe(MoveInput::Proposed(Err("no leader".into())));
        mv.next(&s, ME, t(0));
        let ends: Vec<_> = progress(&mut mv)
            .into_iter()
            .filter(|p| p.0.has_ended())
            .collect();
        assert_eq!(ends, vec![(MovePhase::Failed, None, Some("full".into()))]);
    }

    #[test]
    fn a_push_shows_its_stream_unless_it_carries_the_final_delta() {
        for p in [MovePhase::Snapshot, MovePhase::Full, MovePhase::Incremental] {
            assert_eq!(p.streaming("full"), MovePhase::Full);
            assert_eq!(p.streaming("incremental"), MovePhase::Incremental);
            assert_eq!(p.streaming("?"), MovePhase::Full);
        }
        assert_eq!(
            MovePhase::FinalDelta.streaming("incremental"),
            MovePhase::FinalDelta
        );
        for p in MovePhase::ALL {
            assert_eq!(
                p.is_active(),
                !matches!(p, MovePhase::Done | MovePhase::Failed | MovePhase::Retrying),
                "{p}"
            );
        }
    }

    /// One scripted answer of the environment.
    #[derive(Clone, Debug)]
    enum Env {
        /// Answer the pending step well (a push of this many MiB).
        Good(u64),
        /// Answer it with a failure.
        Bad,
        /// Apply the newest command to this node's state (it lags behind the cluster's).
        Apply,
        /// Let this much time pass (ms).
        Tick(u64),
        /// Answer a users' look with this run state of db, or a failed listing.
        Users(Option<RunSeen>),
        /// Feed an input that answers no pending step.
        Stray(u8),
    }

    fn env() -> impl Strategy<Value = Env> {
        prop_oneof![
            4 => (0u64..16).prop_map(Env::Good),
            1 => Just(Env::Bad),
            3 => Just(Env::Apply),
            2 => (0u64..30_000).prop_map(Env::Tick),
            3 => prop_oneof![
                Just(None),
                Just(Some(RunSeen::Running)),
                Just(Some(RunSeen::Exited)),
                Just(Some(RunSeen::Unknown { reason: "?".into() })),
            ]
            .prop_map(Env::Users),
            1 => (0u8..3).prop_map(Env::Stray),
        ]
    }

    proptest! {
        /// Whatever the environment answers, however this node's state lags and however often
        /// an attempt fails and starts again, a move proposes its commit only with a snapshot
        /// taken after it held the gate, which it took after the handoff showed in this node's
        /// state, and after a look that saw no user running.
        #[test]
        fn no_commit_without_a_positive_look_after_the_handoff_showed(
            script in proptest::collection::vec(env(), 1..300)
        ) {
            let users = [("db".to_string(), Driver::Process)];
            let mut cluster_state = app_moving(false);
            let mut local = cluster_state.clone();
            // Commands the cluster applied that this node has not yet.
            let mut lag: VecDeque<Command> = VecDeque::new();
            let mut mv = Move::new(1, TO);
            let mut now = t(0);
            // This attempt's: the gate taken after the handoff showed; the last look's
            // verdict; the snapshot taken after a positive look.
            let (mut gate, mut positive, mut safe_snapshot) = (false, false, None::<String>);
            for e in script {
                let step = mv.next(&local, ME, now);
                match &step {
                    MoveStep::TakeStartGate { .. } => {
                        let shown = local.datasets[&1].moving.as_ref().is_some_and(|m| m.handoff);
                        prop_assert!(shown, "the gate before the handoff showed");
                    }
                    MoveStep::ProposeCommit { snapshot, .. } => {
                        prop_assert!(gate && positive, "a commit without a positive look");
                        prop_assert_eq!(Some(snapshot), safe_snapshot.as_ref());
                    }
                    MoveStep::Done | MoveStep::Failed(_) => {
                        if cluster_state.datasets[&1].moving.is_none() {
                            break;
                        }
                        // The core starts another attempt (after a backoff).
                        mv = Move::new(1, TO);
                        (gate, positive, safe_snapshot) = (false, false, None);
                        continue;
                    }
                    _ => {}
                }
                match e {
                    Env::Tick(ms) => now = now + Duration::from_millis(ms),
                    Env::Apply => {
                        if let Some(cmd) = lag.pop_front() {
                            local.apply(&cmd);
                        }
                    }
                    Env::Stray(i) => {
                        // Stray unless it happens to answer the pending step (as the
                        // executor would).
                        let input = match i {
                            0 => MoveInput::GateHeld,
                            1 => MoveInput::Users(InstancesSeen::default()),
                            _ => MoveInput::Connected(Ok(())),
                        };
                        match (&step, &input) {
                            (MoveStep::TakeStartGate { .. }, MoveInput::GateHeld) => gate = true,
                            (MoveStep::ObserveUsers { .. }, MoveInput::Users(_)) => positive = true,
                            _ => {}
                        }
                        mv.observe(input);
                    }
                    Env::Users(run) => {
                        let seen = match run {
                            None => InstancesSeen {
                                instances: vec![],
                                failed: vec![(Driver::Process, "x".into())],
                            },
                            Some(r) => seen(r),
                        };
                        if matches!(step, MoveStep::ObserveUsers { .. }) {
                            prop_assert!(gate);
                            positive = users_stopped(&users, &seen).is_ok();
                        }
                        mv.observe(MoveInput::Users(seen));
                    }
                    Env::Good(mib) => match &step {
                        MoveStep::Connect { .. } => mv.observe(MoveInput::Connected(Ok(()))),
                        MoveStep::TakeSnapshot { dataset } => {
                            let n = cluster_state.datasets[&1].snapshots.len() + 1;
                            let name = format!("m{n}");
                            if gate && positive {
                                safe_snapshot = Some(name.clone());
                            }
                            let guid = n as u64;
                            mv.observe(MoveInput::Snapshot(Ok(snap(&name, guid, dataset.epoch))));
                        }
                        MoveStep::Push { .. } => mv.observe(MoveInput::Pushed(Ok(mib * MB))),
                        MoveStep::TakeStartGate { .. } => {
                            gate = true;
                            mv.observe(MoveInput::GateHeld);
                        }
                        s => {
                            if let Some(cmd) = s.command() {
                                let r = cluster_state.apply(&cmd);
                                lag.push_back(cmd);
                                mv.observe(MoveInput::Proposed(Ok(r)));
                            }
                        }
                    },
                    Env::Bad => match &step {
                        MoveStep::Connect { .. } => mv.observe(MoveInput::Connected(Err("x".into()))),
                        MoveStep::TakeSnapshot { .. } => mv.observe(MoveInput::Snapshot(Err("x".into()))),
                        MoveStep::Push { .. } => mv.observe(MoveInput::Pushed(Err(PushFailure::Other("x".into())))),
                        s if s.command().is_some() => mv.observe(MoveInput::Proposed(Err("x".into()))),
                        _ => {}
                    },
                }
            }
        }
    }
}
