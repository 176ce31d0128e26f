//! A node's long-lived tasks ("workers", as in Garage): the API server, the apps and datasets
//! agents, the routing mesh, the Docker volume plugin, the capacity report, certificate renewal,
//! the membership worker and the QUIC transfer server. Each is spawned through one [`Workers`]
//! registry, in a [`Phase`], and reports its state through a [`WorkerStatus`] handle;
//! `flockctl status` shows them. Shutdown stops them phase by phase in [`Phase`]'s order, each
//! phase with a deadline: a worker that has not stopped by then is named in the log, aborted and
//! reported as failed.
//!
//! A worker's end is judged fail-closed: one that ends on its own, without saying it finished
//! ([`WorkerStatus::done`]) or failed ([`WorkerStatus::fail`]), and without being asked to stop,
//! is reported as failed, never as stopped.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// When a worker stops, in shutdown order. The node's other teardown steps go between them:
/// Raft after [`Phase::Api`], the QUIC endpoint with [`Phase::Transfer`], the store
/// flush last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// The apps and datasets agents, the capacity report, certificate renewal.
    Agents,
    /// The routing mesh and the Docker volume plugin.
    Edge,
    /// The leader's membership worker, the liveness watch, placement, and the lease renewal.
    Membership,
    /// The gRPC server (the API and Raft's RPCs, the read index leases are renewed by): no new
    /// requests. Last before Raft, so that other nodes renew their leases through a leader
    /// until it stops.
    Api,
    /// The QUIC server receiving snapshot streams.
    Transfer,
}

impl Phase {
    /// Every phase, in shutdown order.
    pub const ALL: [Phase; 5] = [
        Phase::Agents,
        Phase::Edge,
        Phase::Membership,
        Phase::Api,
        Phase::Transfer,
    ];

    /// The name shown by `flockctl status` and in the log.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Api => "api",
            Phase::Agents => "agents",
            Phase::Edge => "edge",
            Phase::Membership => "membership",
            Phase::Transfer => "transfer",
        }
    }

    /// How long the phase's workers get to stop once asked. The API waits for requests in
    /// flight (a forwarded proposal waits up to the request timeout, 5 s by default); the
    /// others only leave a loop.
    pub fn deadline(self) -> Duration {
        match self {
            Phase::Api | Phase::Agents => Duration::from_secs(5),
            Phase::Edge | Phase::Membership | Phase::Transfer => Duration::from_secs(2),
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a worker is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned, not yet polled.
    Starting,
    /// Doing work.
    Running,
    /// Waiting, for the reason given.
    Idle(String),
    /// A job that finished what it was for (the capacity report), with what it did.
    Done(String),
    /// Stopped because the node asked it to.
    Stopped,
    /// Ended with this error, panicked, ended on its own, or did not stop in time.
    Failed(String),
}

impl WorkerState {
    /// The state's name, as `flockctl status` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Running => "running",
            WorkerState::Idle(_) => "idle",
            WorkerState::Done(_) => "done",
            WorkerState::Stopped => "stopped",
            WorkerState::Failed(_) => "failed",
        }
    }

    /// Why it is idle, what it did, or why it failed; empty otherwise.
    pub fn detail(&self) -> &str {
        match self {
            WorkerState::Idle(s) | WorkerState::Done(s) | WorkerState::Failed(s) => s,
            _ => "",
        }
    }

    fn is_final(&self) -> bool {
        matches!(
            self,
            WorkerState::Done(_) | WorkerState::Stopped | WorkerState::Failed(_)
        )
    }
}

/// One worker's record.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    phase: Phase,
    state: WorkerState,
    last_activity: Option<Instant>,
    last_error: Option<(Instant, String)>,
}

/// A copy of one worker's record, taken by [`WorkersView::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    pub name: String,
    pub phase: Phase,
    pub state: WorkerState,
    /// How long ago it last did work.
    pub last_activity: Option<Duration>,
    /// The last error it reported and how long ago.
    pub last_error: Option<(Duration, String)>,
}

impl WorkerInfo {
    /// As the status API sends it.
    pub fn to_proto(&self) -> flock_proto::v1::Worker {
        flock_proto::v1::Worker {
            name: self.name.clone(),
            phase: self.phase.name().into(),
            state: self.state.name().into(),
            detail: self.state.detail().into(),
            last_activity_ms_ago: self.last_activity.map(millis),
            last_error: self
                .last_error
                .as_ref()
                .map(|(_, e)| e.clone())
                .unwrap_or_default(),
            last_error_ms_ago: self.last_error.as_ref().map(|(d, _)| millis(*d)),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A worker's handle on its own record: cheap to clone, never blocks for long (a std mutex held
/// for a field write). Once the worker has ended, further updates are ignored.
#[derive(Clone, Debug)]
pub struct WorkerStatus {
    entry: Arc<Mutex<Entry>>,
}

impl WorkerStatus {
    /// A handle on a record of its own, in no registry: for a task run outside [`Workers`]
    /// (a test, or a caller that has no registry).
    pub fn detached(name: &str) -> WorkerStatus {
        WorkerStatus {
            entry: Arc::new(Mutex::new(Entry {
                name: name.into(),
                phase: Phase::Agents,
                state: WorkerState::Starting,
                last_activity: None,
                last_error: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entry> {
        // A panic while the lock was held leaves a record, not an invariant: keep using it.
        self.entry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, state: WorkerState, activity: bool) {
        let mut e = self.lock();
        if e.state.is_final() {
            return;
        }
        e.state = state;
        if activity {
            e.last_activity = Some(Instant::now());
        }
    }

    /// Doing work now.
    pub fn running(&self) {
        self.set(WorkerState::Running, true);
    }

    /// Waiting, for `why` ("not the leader", "next renewal at ...").
    pub fn idle(&self, why: impl Into<String>) {
        self.set(WorkerState::Idle(why.into()), false);
    }

    /// An error the worker keeps going after (it retries); shown as its last error.
    pub fn error(&self, error: impl std::fmt::Display) {
        let mut e = self.lock();
        e.last_error = Some((Instant::now(), error.to_string()));
    }

    /// A job finished what it was for; its end is then not a failure.
    pub fn done(&self, what: impl Into<String>) {
        self.set(WorkerState::Done(what.into()), true);
    }

    /// The worker gives up with `error`; it should return next.
    pub fn fail(&self, error: impl std::fmt::Display) {
        let error = error.to_string();
        let mut e = self.lock();
        if e.state.is_final() {
            return;
        }
        e.last_error = Some((Instant::now(), error.clone()));
        e.state = WorkerState::Failed(error);
    }

    /// A copy of the record.
    pub fn info(&self) -> WorkerInfo {
        let e = self.lock();
        let now = Instant::now();
        WorkerInfo {
            name: e.name.clone(),
            phase: e.phase,
            state: e.state.clone(),
            last_activity: e.last_activity.map(|t| now.saturating_duration_since(t)),
            last_error: e
                .last_error
                .as_ref()
                .map(|(t, s)| (now.saturating_duration_since(*t), s.clone())),
        }
    }

    /// Records how the task ended, unless it already said.
    fn ended(&self, asked_to_stop: bool, panic: Option<String>) {
        let mut e = self.lock();
        if let Some(p) = panic {
            let why = format!("panicked: {p}");
            e.last_error = Some((Instant::now(), why.clone()));
            e.state = WorkerState::Failed(why);
            return;
        }
        if e.state.is_final() {
            return;
        }
        e.state = if asked_to_stop {
            WorkerState::Stopped
        } else {
            WorkerState::Failed("ended on its own before the node stopped".into())
        };
    }
}

/// Read access to a registry's records, for the status API (it holds no stop signal, so it does
/// not keep the workers alive).
#[derive(Clone, Debug, Default)]
pub struct WorkersView {
    entries: Arc<Mutex<Vec<WorkerStatus>>>,
}

impl WorkersView {
    /// Every worker, in shutdown order (by phase, then in the order they were spawned).
    pub fn list(&self) -> Vec<WorkerInfo> {
        let all: Vec<WorkerStatus> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut infos: Vec<WorkerInfo> = all.iter().map(WorkerStatus::info).collect();
        // Stable: spawn order within a phase.
        infos.sort_by_key(|i| i.phase);
        infos
    }

    /// As the status API sends them.
    pub fn to_proto(&self) -> Vec<flock_proto::v1::Worker> {
        self.list().iter().map(WorkerInfo::to_proto).collect()
    }
}

/// The registry: spawns workers by phase and stops them phase by phase. Dropping it drops every
/// phase's stop signal, which stops the workers too (without waiting for them).
pub struct Workers {
    view: WorkersView,
    stops: BTreeMap<Phase, watch::Sender<bool>>,
    tasks: Mutex<Vec<(Phase, WorkerStatus, JoinHandle<()>)>>,
}

impl Default for Workers {
    fn default() -> Self {
        Self::new()
    }
}

impl Workers {
    /// An empty registry.
    pub fn new() -> Workers {
        Workers {
            view: WorkersView::default(),
            stops: Phase::ALL
                .into_iter()
                .map(|p| (p, watch::channel(false).0))
                .collect(),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// The records, for the status API.
    pub fn view(&self) -> WorkersView {
        self.view.clone()
    }

    /// The signal `phase`'s workers stop on (true, or its sender dropped), for a part of a
    /// worker made before it is spawned (the API server's TLS listener).
    pub fn stop_signal(&self, phase: Phase) -> watch::Receiver<bool> {
        self.stops[&phase].subscribe()
    }

    /// Spawns the worker `name` in `phase`: `task` gets the phase's stop signal and its status
    /// handle. It is "running" once polled; how it ends is recorded (see the module doc).
    pub fn spawn<F, Fut>(&self, phase: Phase, name: &str, task: F) -> WorkerStatus
    where
        F: FnOnce(watch::Receiver<bool>, WorkerStatus) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let status = WorkerStatus {
            entry: Arc::new(Mutex::new(Entry {
                name: name.into(),
                phase,
                state: WorkerState::Starting,
                last_activity: None,
                last_error: None,
            })),
        };
        let stop = self.stop_signal(phase);
        let fut = task(stop.clone(), status.clone());
        let st = status.clone();
        let handle = tokio::spawn(async move {
            st.running();
            let result = AssertUnwindSafe(fut).catch_unwind().await;
            let panic = result.err().map(|p| {
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into())
            });
            // Asked to stop: the signal is set, or the registry is gone.
            let asked = stop.has_changed().is_err() || *stop.borrow();
            if let Some(p) = &panic {
                tracing::error!(worker = %st.lock().name, "worker panicked: {p}");
            } else if !asked {
                let e = st.lock();
                if let WorkerState::Failed(why) = &e.state {
                    tracing::error!(worker = %e.name, "worker failed: {why}");
                } else if !e.state.is_final() {
                    tracing::error!(worker = %e.name, "worker ended on its own before the node stopped");
                }
            }
            st.ended(asked, panic);
        });
        self.view
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(status.clone());
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((phase, status.clone(), handle));
        status
    }

    /// Stops `phase`'s workers: sets their stop signal and waits for them up to the phase's
    /// deadline. A worker still running then is named in the log, aborted and recorded as
    /// failed. Returns the names of those that did not stop in time.
    pub async fn stop(&self, phase: Phase) -> Vec<String> {
        self.stop_within(phase, phase.deadline()).await
    }

    /// As [`stop`](Self::stop), with another deadline.
    pub async fn stop_within(&self, phase: Phase, deadline: Duration) -> Vec<String> {
        let tasks: Vec<(WorkerStatus, JoinHandle<()>)> = {
            let mut all = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, rest) = std::mem::take(&mut *all)
                .into_iter()
                .partition(|(p, _, _)| *p == phase);
            *all = rest;
            mine.into_iter().map(|(_, s, h)| (s, h)).collect()
        };
        let names: Vec<String> = tasks.iter().map(|(s, _)| s.lock().name.clone()).collect();
        tracing::info!("shutdown: stopping {phase} ({})", names.join(", "));
        let _ = self.stops[&phase].send(true);
        let until = tokio::time::Instant::now() + deadline;
        let mut late = Vec::new();
        for (status, mut handle) in tasks {
            if tokio::time::timeout_at(until, &mut handle).await.is_err() {
                let name = status.lock().name.clone();
                tracing::warn!(
                    worker = %name,
                    "shutdown: worker {name} ({phase}) did not stop within {deadline:?}; aborting it"
                );
                handle.abort();
                status.fail(format!("did not stop within {deadline:?}; aborted"));
                late.push(name);
            }
        }
        tracing::info!("shutdown: {phase} stopped");
        late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(w: &Workers, name: &str) -> WorkerState {
        w.view()
            .list()
            .into_iter()
            .find(|i| i.name == name)
            .map(|i| i.state)
            .expect("listed")
    }

    #[tokio::test]
    async fn workers_end_as_they_say_and_stop_by_phase() {
        let w = Workers::new();
        w.spawn(Phase::Membership, "loop", |mut stop, st| async move {
            st.idle("waiting");
            let _ = stop.changed().await;
        });
        w.spawn(
            Phase::Agents,
            "job",
            |_, st| async move { st.done("reported") },
        );
        w.spawn(Phase::Agents, "quitter", |_, _| async move {});
        w.spawn(Phase::Agents, "gives-up", |_, st| async move {
            st.fail("cannot read the certificate")
        });
        w.spawn(Phase::Edge, "panics", |_, _| async move { panic!("boom") });
        // The phase order, whatever the spawn order.
        let phases: Vec<Phase> = w.view().list().iter().map(|i| i.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Agents,
                Phase::Agents,
                Phase::Agents,
                Phase::Edge,
                Phase::Membership
            ]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(state_of(&w, "loop"), WorkerState::Idle("waiting".into()));
        assert_eq!(state_of(&w, "job"), WorkerState::Done("reported".into()));
        // Ending unasked is never "stopped".
        assert!(matches!(state_of(&w, "quitter"), WorkerState::Failed(_)));
        assert_eq!(
            state_of(&w, "gives-up"),
            WorkerState::Failed("cannot read the certificate".into())
        );
        assert!(matches!(state_of(&w, "panics"), WorkerState::Failed(e) if e.contains("boom")));

        // Stopping one phase leaves the others running.
        assert!(w.stop(Phase::Agents).await.is_empty());
        assert_eq!(state_of(&w, "loop"), WorkerState::Idle("waiting".into()));
        assert!(w.stop(Phase::Membership).await.is_empty());
        assert_eq!(state_of(&w, "loop"), WorkerState::Stopped);
    }

    #[tokio::test]
    async fn a_worker_that_ignores_its_stop_is_named_and_aborted() {
        let w = Workers::new();
        w.spawn(Phase::Edge, "deaf", |_, st| async move {
            st.running();
            std::future::pending::<()>().await
        });
        w.spawn(Phase::Edge, "polite", |mut stop, _| async move {
            let _ = stop.changed().await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let late = w.stop_within(Phase::Edge, Duration::from_millis(200)).await;
        assert_eq!(late, ["deaf"]);
        assert!(
            matches!(state_of(&w, "deaf"), WorkerState::Failed(e) if e.contains("did not stop"))
        );
        assert_eq!(state_of(&w, "polite"), WorkerState::Stopped);
    }

    #[tokio::test]
    async fn errors_and_activity_are_reported() {
        let w = Workers::new();
        let st = w.spawn(Phase::Agents, "a", |mut stop, _| async move {
            let _ = stop.changed().await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        st.error("peer unreachable");
        let p = w.view().to_proto();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "a");
        assert_eq!(p[0].phase, "agents");
        assert_eq!(p[0].state, "running");
        assert_eq!(p[0].last_error, "peer unreachable");
        assert!(p[0].last_error_ms_ago.is_some() && p[0].last_activity_ms_ago.is_some());
        // Dropping the registry stops its workers: they end as stopped, not failed.
        let view = w.view();
        drop(w);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(view.list()[0].state, WorkerState::Stopped);
    }
}
