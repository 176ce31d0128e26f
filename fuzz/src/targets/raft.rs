//! Raft payloads (`flock_raft::codec::decode` of openraft's requests, as raft/src/server.rs
//! decodes them) and the Propose RPC's command (node/src/api/mod.rs `propose`), then
//! `ClusterState::apply` of every decoded command against a small state.
//!
//! `apply` must not panic and must be deterministic: applied to two copies of the state, a
//! command gives equal results and equal states (every node of a cluster applies it).

use std::collections::{BTreeMap, BTreeSet};

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{
    CommittedLeaderId, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote,
};

use flock_raft::codec::{decode, encode};
use flock_raft::{MemberNode, TypeConfig};
use flock_scheduler::{ClusterState, Command};

use super::{Outcome, Target};
use crate::gen;
use crate::mutate::Rng;

type Append = AppendEntriesRequest<TypeConfig>;
type VoteReq = VoteRequest<u64>;
type Snapshot = InstallSnapshotRequest<TypeConfig>;

const POSTCARD_DICT: &[&[u8]] = &[
    b"\x01",
    b"\x00",
    b"\xff\xff\xff\xff\x0f",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"\x08",
    b"\x02n1",
    b"\x02db",
];

pub fn raft_target() -> Target {
    Target {
        name: "raft",
        about: "Raft RPC payloads: AppendEntries, Vote, InstallSnapshot (first byte picks which), then apply of every command (raft/src/server.rs)",
        run: run_raft,
        seeds: raft_seeds,
        fixup: raft_fixup,
        generate: Some(raft_generate),
        dict: POSTCARD_DICT,
        max_len: 64 << 10,
        known: &[],
    }
}

pub fn propose_target() -> Target {
    Target {
        name: "propose",
        about: "the Propose RPC's Command, then ClusterState::apply against a small state (node/src/api/mod.rs)",
        run: run_propose,
        seeds: propose_seeds,
        fixup: version_fixup,
        generate: Some(propose_generate),
        dict: POSTCARD_DICT,
        max_len: 64 << 10,
        known: &[],
    }
}

thread_local! {
    static STATE: ClusterState = gen::small_state();
}

/// Applies `cmd` to two copies of `state`: no panic, and the same result and state each time.
fn apply_twice(state: &ClusterState, cmd: &Command) -> String {
    let (mut a, mut b) = (state.clone(), state.clone());
    let ra = a.apply(cmd);
    let rb = b.apply(cmd);
    assert_eq!(ra, rb, "apply gave two results for one command");
    assert!(a == b, "apply left two different states for one command");
    // The state must still encode and decode (it is what snapshots carry).
    let bytes = encode(&a);
    let back: ClusterState = decode(&bytes).expect("an applied state decodes");
    assert!(
        back == a,
        "an applied state does not round-trip through the codec"
    );
    let label = format!("{ra:?}");
    super::prefix(&label, 60).to_string()
}

fn apply_small(cmd: &Command) -> String {
    STATE.with(|s| apply_twice(s, cmd))
}

fn run_propose(data: &[u8]) -> Outcome {
    match decode::<Command>(data) {
        Ok(cmd) => Outcome::ok(apply_small(&cmd)),
        Err(e) => Outcome::err(e),
    }
}

fn run_raft(data: &[u8]) -> Outcome {
    let Some((&which, payload)) = data.split_first() else {
        return Outcome::err("empty");
    };
    match which % 3 {
        0 => match decode::<Append>(payload) {
            Ok(req) => {
                let mut last = String::new();
                for e in &req.entries {
                    if let EntryPayload::Normal(cmd) = &e.payload {
                        last = apply_small(cmd);
                    }
                }
                Outcome::ok(format!("append {}", last))
            }
            Err(e) => Outcome::err(format!("append: {e}")),
        },
        1 => match decode::<VoteReq>(payload) {
            Ok(req) => Outcome::ok(format!("vote {}", req.last_log_id.is_some())),
            Err(e) => Outcome::err(format!("vote: {e}")),
        },
        _ => match decode::<Snapshot>(payload) {
            Ok(req) => {
                // What install_snapshot does with the assembled data (raft/src/state_machine.rs).
                match flock_raft::state_machine::decode_cluster(&req.data) {
                    Ok(state) => {
                        let mut last = String::new();
                        for cmd in gen::more_commands().iter().chain(&gen::commands()) {
                            last = apply_twice(&state, cmd);
                        }
                        Outcome::ok(format!("snapshot state {last}"))
                    }
                    Err(e) => Outcome::err(format!("snapshot data: {e}")),
                }
            }
            Err(e) => Outcome::err(format!("snapshot: {e}")),
        },
    }
}

fn log_id(term: u64, node: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn membership() -> Membership<u64, MemberNode> {
    let nodes: BTreeMap<u64, MemberNode> = (1..=3)
        .map(|i| {
            (
                i,
                MemberNode {
                    name: format!("n{i}"),
                    addr: format!("127.0.0.1:{}", 7000 + i),
                },
            )
        })
        .collect();
    Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes)
}

fn append(entries: Vec<EntryPayload<TypeConfig>>) -> Vec<u8> {
    let req: Append = AppendEntriesRequest {
        vote: Vote::new_committed(2, 1),
        prev_log_id: Some(log_id(1, 1, 4)),
        entries: entries
            .into_iter()
            .enumerate()
            .map(|(i, payload)| openraft::Entry {
                log_id: log_id(2, 1, 5 + i as u64),
                payload,
            })
            .collect(),
        leader_commit: Some(log_id(1, 1, 4)),
    };
    tagged(0, &req)
}

fn tagged<T: serde::Serialize>(tag: u8, value: &T) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(encode(value));
    out
}

fn snapshot_req(state: &ClusterState) -> Vec<u8> {
    let req: Snapshot = InstallSnapshotRequest {
        vote: Vote::new_committed(2, 1),
        meta: SnapshotMeta {
            last_log_id: Some(log_id(2, 1, 9)),
            last_membership: StoredMembership::new(Some(log_id(1, 1, 1)), membership()),
            snapshot_id: "2-1-9".into(),
        },
        offset: 0,
        data: flock_raft::state_machine::encode_cluster(state),
        done: true,
    };
    tagged(2, &req)
}

fn raft_seeds() -> Vec<Vec<u8>> {
    let mut out = vec![
        append(
            gen::commands()
                .into_iter()
                .chain(gen::more_commands())
                .map(EntryPayload::Normal)
                .collect(),
        ),
        append(vec![
            EntryPayload::Blank,
            EntryPayload::Membership(membership()),
        ]),
        append(vec![]),
        tagged(1, &VoteRequest::new(Vote::new(3, 2), Some(log_id(2, 1, 9)))),
        tagged(1, &VoteReq::new(Vote::new(1, 1), None)),
        snapshot_req(&gen::small_state()),
        snapshot_req(&ClusterState::default()),
    ];
    out.dedup();
    out
}

fn propose_seeds() -> Vec<Vec<u8>> {
    gen::commands()
        .iter()
        .chain(&gen::more_commands())
        .map(encode)
        .collect()
}

#[allow(clippy::ptr_arg)] // the signature of `Target::fixup`
fn version_fixup(data: &mut Vec<u8>, rng: &mut Rng) {
    if !data.is_empty() && !rng.one_in(8) {
        data[0] = flock_raft::codec::RECORD_VERSION;
    }
}

#[allow(clippy::ptr_arg)] // the signature of `Target::fixup`
fn raft_fixup(data: &mut Vec<u8>, rng: &mut Rng) {
    if data.len() > 1 && !rng.one_in(8) {
        data[0] %= 3;
        data[1] = flock_raft::codec::RECORD_VERSION;
    }
}

fn propose_generate(u: &mut arbitrary::Unstructured) -> Vec<u8> {
    encode(&gen::command(u, 0))
}

fn raft_generate(u: &mut arbitrary::Unstructured) -> Vec<u8> {
    match u.int_in_range(0..=2u8).unwrap_or(0) {
        0 => {
            let n = u.int_in_range(0..=6usize).unwrap_or(0);
            let entries = (0..n)
                .map(|_| match u.int_in_range(0..=5u8).unwrap_or(0) {
                    0 => EntryPayload::Blank,
                    1 => EntryPayload::Membership(membership()),
                    _ => EntryPayload::Normal(gen::command(u, 0)),
                })
                .collect();
            append(entries)
        }
        1 => {
            let term = u.arbitrary().unwrap_or(0);
            let node = u.arbitrary().unwrap_or(0);
            let last = if u.arbitrary().unwrap_or(false) {
                Some(log_id(
                    u.arbitrary().unwrap_or(0),
                    u.arbitrary().unwrap_or(0),
                    u.arbitrary().unwrap_or(0),
                ))
            } else {
                None
            };
            tagged(1, &VoteReq::new(Vote::new(term, node), last))
        }
        _ => {
            let mut state = gen::small_state();
            let n = u.int_in_range(0..=4usize).unwrap_or(0);
            for _ in 0..n {
                state.apply(&gen::command(u, 0));
            }
            snapshot_req(&state)
        }
    }
}
