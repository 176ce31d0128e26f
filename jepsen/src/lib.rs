//! flock-jepsen: fault injection against a docker-compose flock cluster, with a checked history.
//!
//! - [`runner`]: one run, start to end (cluster up, clients and nemesis, heal, recovery,
//!   convergence, final reads, check, report).
//! - [`workload`]: what clients do and which checkers judge it ([`workload::register`]: read,
//!   write, cas on the key-value namespace; [`workload::dataset`]: datasets created, written,
//!   snapshotted and moved, then read back from every node's disk; [`workload::app`]: apps
//!   deployed and moved while every node is asked what it runs; [`workload::moves`]: a stateful
//!   test app appended to through whichever node runs it while it is moved about).
//! - [`nemesis`]: kill -9, pause, partitions (and leader-targeted variants), seeded schedules.
//! - [`checker`]: WGL linearizability search, the per-key register checker with minimal
//!   failing sub-histories, the dataset checker (every acknowledged snapshot reads back
//!   byte-identical), the app checker (no stateful app runs twice; after the faults every app
//!   runs once on its node), the move checker (no acknowledged append lost, no two copies
//!   taking appends at once), and run figures. Pure: no IO.
//! - [`history`]: the recorded ops and faults, as JSON lines.
//! - [`client`]: the one place connections to nodes are made, and what a failed call means.
//! - [`docker`]: docker, docker-compose, docker exec, nsenter and iptables on the host.
//! - [`report`]: `report.md` and the `timeline.png` of a run.

pub mod checker;
pub mod client;
pub mod docker;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod runner;
pub mod workload;
