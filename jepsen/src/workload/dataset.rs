//! The dataset workload: datasets created, written, snapshotted and moved while the nemesis
//! kills, pauses and partitions nodes; after the faults, every snapshot is read back from the
//! disks of the nodes that hold it.
//!
//! Each of `writers` writers owns one dataset at a time (`<prefix><writer>-<generation>`,
//! replaced by a fresh one after `writes_per_dataset` acknowledged writes, so datasets are also
//! created under faults) and runs one round after another:
//!
//! 1. **state**: a linearizable `DatasetList` of its dataset: primary, epoch, move in progress.
//!    While a move runs, the writer does not write (an application would be stopped for the
//!    move's last phase); a move that has not finished after `move_timeout` is cancelled.
//! 2. **write**: a new file `f<k>` (unique name, never modified or deleted; content a seeded
//!    pattern of 1 KiB to `max_file_bytes`, its SHA-256 recorded in the history) into the live
//!    directory of the primary the state read named (the `mount_path` that node reports), with
//!    `docker exec`: into a staging directory on the same file system, then `mv` into place, so
//!    a file is in the dataset whole or not at all. `ok` once `sha256sum` of the file in place
//!    inside the container matches; `fail` when nothing can have happened (docker refused to
//!    exec, or the script stopped before `mv`); otherwise `unknown`.
//! 3. **snapshot**: `DatasetSnapshot` with the tag `s<k>` (sent to a random node; the primary
//!    takes it). `ok` means the primary took it and Raft recorded it.
//! 4. sometimes (`move_probability`) **move**: `DatasetMove` to a random other node. After a
//!    move whose outcome is unknown, the writer goes on with a fresh dataset: that move may
//!    begin at any later time, which leaves the checker no write of the old one it can fence.
//!
//! After the faults end (`finish`): every dataset must take one more write and snapshot
//! within the recovery bound; the holders must then settle (no move in progress, every holder
//! ready with the newest recorded snapshot) within `settle_bound`; the final state of each
//! dataset is read, and every node's disk is read snapshot by snapshot (one `find`/`stat`
//! listing and a `sha256sum` per distinct inode: unchanged files are hard links shared by
//! snapshots). [`crate::checker::dataset`] judges the history.
//!
//! Reading the disk: the `dir` backend keeps dataset `NAME` with id `ID` in
//! `DATA_DIR/storage/datasets/NAME.ID/`, the live tree in `live/` (the mount path the API
//! reports) and each snapshot in `snapshots/SEQ/`, its metadata in `info.json` (name, guid) and
//! its files in `tree/`. That layout is the backend's, not an interface: the harness only reads
//! it, after the run, and checks that the mount paths the API reports lie under it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use flock_proto::v1 as pb;

use super::Done;
use crate::client::{classify, Api, ClientConfig, Failure};
use crate::docker::{self, Node};
use crate::history::{
    file_digest, Call, DiskDataset, DiskSnapshot, DsHolder, DsResult, DsSnap, DsState, NodeDisk,
    Op, Outcome,
};
use crate::runner::{record_call, Conn, Recorder};

/// Where the `dir` backend keeps datasets inside a node's container (`DATA_DIR/storage/datasets`).
pub const DATASETS_ROOT: &str = "/data/storage/datasets";
/// Where a write stages its file before `mv` puts it in place (same file system as the data).
const STAGING: &str = "/data/jepsen-staging";
/// Paths per `sha256sum` call when reading a disk.
const HASH_BATCH: usize = 200;

/// Settings of the dataset workload.
#[derive(Clone, Debug)]
pub struct DatasetOptions {
    /// Datasets are `<prefix><writer>-<generation>`.
    pub prefix: String,
    /// Writers, each with its own dataset at a time.
    pub writers: usize,
    /// Acknowledged writes before a writer moves on to a fresh dataset.
    pub writes_per_dataset: u64,
    /// Chance that a round ends with a move to another node.
    pub move_probability: f64,
    /// A move still in progress after this is cancelled.
    pub move_timeout: Duration,
    /// Time limit of each dataset call and write.
    pub op_timeout: Duration,
    /// The largest file a write makes.
    pub max_file_bytes: u64,
    /// Mean pause between a writer's rounds (drawn between 0 and twice it).
    pub interval: Duration,
    /// After the heal, every dataset must take a write and a snapshot within this.
    pub recovery_bound: Duration,
    /// ... and then every holder must have the newest snapshot, with no move left, within this.
    pub settle_bound: Duration,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions {
            prefix: "jd".into(),
            writers: 3,
            writes_per_dataset: 50,
            move_probability: 0.15,
            move_timeout: Duration::from_secs(20),
            op_timeout: Duration::from_secs(15),
            max_file_bytes: 2 << 20,
            interval: Duration::from_millis(500),
            recovery_bound: Duration::from_secs(60),
            settle_bound: Duration::from_secs(60),
        }
    }
}

/// What happened after the faults ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DatasetPhase {
    pub recovery_bound_s: f64,
    /// Per dataset: seconds after the heal until it took a write and a snapshot.
    pub recovered: BTreeMap<String, Option<f64>>,
    pub settle_bound_s: f64,
    /// Seconds after recovery until every holder had the newest snapshot and no move ran.
    pub settled_after_s: Option<f64>,
    /// What had not settled at the bound.
    pub unsettled: Vec<String>,
    /// Per node: whether its disk could be read.
    pub disks_read: BTreeMap<String, bool>,
    /// Recovered and settled in time, and every disk read.
    pub ok: bool,
}

/// The content of file `k` of `dataset`: a header naming it, then seeded bytes; 1 KiB to
/// `max` bytes (most files small, some large).
pub fn file_content(seed: u64, dataset: &str, k: u64, max: u64) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dataset.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng =
        StdRng::seed_from_u64(seed ^ h.rotate_left(17) ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let max = max.max(2048);
    let roll: f64 = rng.random();
    let len = if roll < 0.70 {
        rng.random_range(1024..=(32 << 10).min(max))
    } else if roll < 0.95 {
        rng.random_range((32 << 10).min(max - 1)..=(512 << 10).min(max))
    } else {
        rng.random_range((512 << 10).min(max - 1)..=max)
    } as usize;
    let header = format!("flock-jepsen {dataset} f{k:05} seed {seed}\n");
    let mut v = vec![0u8; len.max(header.len())];
    v[..header.len()].copy_from_slice(header.as_bytes());
    rng.fill_bytes(&mut v[header.len()..]);
    v
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_name(k: u64) -> String {
    format!("f{k:05}")
}

fn tag_name(k: u64) -> String {
    format!("s{k:05}")
}

/// A dataset a writer uses or used.
#[derive(Clone, Debug)]
pub struct Cursor {
    pub name: String,
    created: bool,
    next_file: u64,
    written: u64,
}

impl Cursor {
    fn new(name: String) -> Cursor {
        Cursor {
            name,
            created: false,
            next_file: 1,
            written: 0,
        }
    }
}

/// What the writers share.
pub(crate) struct Ctx {
    pub rec: Recorder,
    pub nodes: Vec<Node>,
    pub cfg: ClientConfig,
    pub opts: DatasetOptions,
    pub seed: u64,
    /// Datasets writers moved on from.
    retired: Mutex<Vec<Cursor>>,
    /// The live directory each node reported for each dataset.
    mounts: Mutex<HashMap<(String, String), String>>,
}

impl Ctx {
    pub fn new(
        rec: Recorder,
        nodes: Vec<Node>,
        cfg: ClientConfig,
        opts: DatasetOptions,
        seed: u64,
    ) -> Ctx {
        Ctx {
            rec,
            nodes,
            cfg,
            opts,
            seed,
            retired: Mutex::new(Vec::new()),
            mounts: Mutex::new(HashMap::new()),
        }
    }

    fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// How a round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Round {
    /// A write and a snapshot were acknowledged.
    Done,
    /// Something was not: try again after a pause.
    Again,
}

/// One writer: a dataset at a time, one round after another.
struct Writer {
    id: usize,
    process: u64,
    rng: StdRng,
    conns: Vec<Conn>,
    cur: Cursor,
    generation: u64,
    /// Since when the writer has seen a move in progress.
    moving_since: Option<Instant>,
}

fn state_of(d: pb::Dataset) -> DsState {
    DsState {
        id: d.id,
        primary: d.primary_name,
        epoch: d.epoch,
        moving_to: d.moving_to,
        snapshots: d
            .snapshots
            .into_iter()
            .map(|s| DsSnap {
                name: s.name,
                guid: s.guid,
                epoch: s.epoch,
            })
            .collect(),
        holders: d
            .holders
            .into_iter()
            .map(|h| DsHolder {
                node: h.node_name,
                role: h.role,
                state: h.state,
                latest_snapshot: h.latest_snapshot,
                mount_path: h.mount_path,
            })
            .collect(),
    }
}

/// Makes a dataset call of the API and says what its answer means.
async fn invoke(api: &mut Api, call: &Call) -> Result<Done, Failure> {
    let err = |s: tonic::Status| classify(&s);
    match call {
        Call::DsCreate { dataset, primary } => {
            api.dataset_create(pb::DatasetCreateRequest {
                name: dataset.clone(),
                node: primary.clone(),
                size_limit: None,
            })
            .await
            .map_err(err)?;
            Ok(Done::ds(None))
        }
        Call::DsSnapshot { dataset, tag } => {
            let r = api
                .dataset_snapshot(pb::DatasetSnapshotRequest {
                    name: dataset.clone(),
                    tag: tag.clone(),
                })
                .await
                .map_err(err)?
                .into_inner();
            let s = r
                .snapshot
                .ok_or_else(|| Failure::Indefinite("an answer without the snapshot".into()))?;
            Ok(Done::ds(Some(DsResult::Snapshot(DsSnap {
                name: s.name,
                guid: s.guid,
                epoch: s.epoch,
            }))))
        }
        Call::DsMove { dataset, to } => {
            api.dataset_move(pb::DatasetMoveRequest {
                name: dataset.clone(),
                to: to.clone(),
                cancel: false,
            })
            .await
            .map_err(err)?;
            Ok(Done::ds(None))
        }
        Call::DsCancelMove { dataset } => {
            api.dataset_move(pb::DatasetMoveRequest {
                name: dataset.clone(),
                to: String::new(),
                cancel: true,
            })
            .await
            .map_err(err)?;
            Ok(Done::ds(None))
        }
        Call::DsState { dataset, holders } => {
            let r = api
                .dataset_list(pb::DatasetListRequest {
                    name: dataset.clone(),
                    desired_only: !holders,
                })
                .await
                .map_err(err)?
                .into_inner();
            let d = r
                .datasets
                .into_iter()
                .find(|d| &d.name == dataset)
                .ok_or_else(|| Failure::Definite(format!("{dataset} is not listed")))?;
            Ok(Done::ds(Some(DsResult::State(state_of(d)))))
        }
        other => Err(Failure::Definite(format!(
            "{} is not an API call",
            other.f()
        ))),
    }
}

/// Characters a path from the API may have before it goes into a shell command.
fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && p.starts_with('/')
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b':'))
}

/// Writes `data` as `file` into `mount` on `node` (see the module's description for what the
/// outcomes mean).
async fn write_file(
    node: &Node,
    mount: &str,
    file: &str,
    tmp: &str,
    data: &[u8],
    sha256: &str,
    timeout: Duration,
) -> Result<Done, Failure> {
    if !safe_path(mount) {
        return Err(Failure::Definite(format!("unusable mount path {mount:?}")));
    }
    let script = format!(
        "mkdir -p {STAGING} || exit 10; cat > {STAGING}/{tmp} || exit 11; \
         mv {STAGING}/{tmp} {mount}/{file} || exit 12; echo moved; sha256sum {mount}/{file}"
    );
    let out = match docker::exec(node, None, &["sh", "-c", &script], Some(data), timeout).await {
        Ok(out) => out,
        Err(docker::DockerError::Spawn { cmd, source }) => {
            return Err(Failure::Definite(format!("cannot run {cmd}: {source}")))
        }
        Err(e) => return Err(Failure::Indefinite(e.to_string())),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let moved = stdout.lines().any(|l| l == "moved");
    if out.not_run() {
        return Err(Failure::Definite(format!("not run: {}", out.stderr)));
    }
    if !moved && matches!(out.code, Some(10..=12)) {
        return Err(Failure::Definite(format!(
            "the file was not put in place (exit {:?}): {}",
            out.code, out.stderr
        )));
    }
    if out.code == Some(0) {
        let got = stdout
            .lines()
            .find_map(|l| l.split_whitespace().next().filter(|h| h.len() == 64));
        if got == Some(sha256) {
            return Ok(Done::ds(None));
        }
        return Err(Failure::Indefinite(format!(
            "the file in place has SHA-256 {got:?}, not {sha256}"
        )));
    }
    Err(Failure::Indefinite(format!(
        "docker exec ended with {:?} ({}moved): {}",
        out.code,
        if moved { "" } else { "not known to be " },
        out.stderr
    )))
}

impl Writer {
    fn new(ctx: &Ctx, id: usize, cur: Cursor, generation: u64, process: u64) -> Writer {
        Writer {
            id,
            process,
            rng: StdRng::seed_from_u64(
                ctx.seed ^ 0xda7a_5e70_0000_0000 ^ (process.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            ),
            conns: ctx.nodes.iter().map(|n| Conn::new(n, &ctx.cfg)).collect(),
            cur,
            generation,
            moving_since: None,
        }
    }

    /// An API call through a random node, recorded.
    async fn call(&mut self, ctx: &Ctx, call: Call) -> Op {
        let i = self.rng.random_range(0..self.conns.len());
        let conn = &mut self.conns[i];
        let attempt = async {
            let api = conn.api().await?;
            invoke(api, &call).await
        };
        let node = ctx.nodes[i].name.clone();
        let (op, broken) = record_call(
            &ctx.rec,
            &node,
            self.process,
            call.clone(),
            ctx.opts.op_timeout,
            attempt,
        )
        .await;
        if broken {
            self.conns[i].api = None;
        }
        self.after(&op, ctx);
        op
    }

    /// An op that may still be acting leaves its process behind, as in Jepsen.
    fn after(&mut self, op: &Op, ctx: &Ctx) {
        if op.outcome == Outcome::Unknown {
            self.process += ctx.opts.writers.max(1) as u64;
        }
    }

    async fn state(&mut self, ctx: &Ctx, holders: bool) -> Option<DsState> {
        let op = self
            .call(
                ctx,
                Call::DsState {
                    dataset: self.cur.name.clone(),
                    holders,
                },
            )
            .await;
        match op.ds {
            Some(DsResult::State(s)) if op.outcome == Outcome::Ok => Some(s),
            _ => None,
        }
    }

    /// Creates the writer's dataset on a random node; true once it exists.
    async fn ensure_created(&mut self, ctx: &Ctx) -> bool {
        let node = ctx.nodes[self.rng.random_range(0..ctx.nodes.len())]
            .name
            .clone();
        let op = self
            .call(
                ctx,
                Call::DsCreate {
                    dataset: self.cur.name.clone(),
                    primary: node,
                },
            )
            .await;
        if op.outcome == Outcome::Ok {
            self.cur.created = true;
        } else if self.state(ctx, false).await.is_some() {
            // An earlier attempt (or this one, whose answer was lost) created it.
            self.cur.created = true;
        }
        self.cur.created
    }

    /// The live directory of `primary` for the current dataset, as that node reports it.
    async fn mount(&mut self, ctx: &Ctx, st: &DsState) -> Option<String> {
        let key = (self.cur.name.clone(), st.primary.clone());
        if let Some(m) = ctx
            .mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Some(m.clone());
        }
        let fresh = self.state(ctx, true).await?;
        if fresh.primary != st.primary || fresh.epoch != st.epoch || !fresh.moving_to.is_empty() {
            return None;
        }
        let h = fresh
            .holders
            .iter()
            .find(|h| h.node == st.primary && h.state == "ready" && safe_path(&h.mount_path))?;
        ctx.mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, h.mount_path.clone());
        Some(h.mount_path.clone())
    }

    async fn write(&mut self, ctx: &Ctx, st: &DsState, mount: &str, k: u64) -> Op {
        let data = file_content(ctx.seed, &self.cur.name, k, ctx.opts.max_file_bytes);
        let sha = sha256_hex(&data);
        let file = file_name(k);
        let call = Call::DsWrite {
            dataset: self.cur.name.clone(),
            file: file.clone(),
            bytes: data.len() as u64,
            sha256: sha.clone(),
            primary: st.primary.clone(),
            epoch: st.epoch,
        };
        let Some(node) = ctx.node(&st.primary).cloned() else {
            let attempt = async {
                Err(Failure::Definite(format!(
                    "{} is not a node of the compose cluster",
                    st.primary
                )))
            };
            let (op, _) = record_call(
                &ctx.rec,
                &st.primary,
                self.process,
                call,
                ctx.opts.op_timeout,
                attempt,
            )
            .await;
            return op;
        };
        let tmp = format!("{}.{file}", self.cur.name);
        let timeout = ctx.opts.op_timeout;
        let attempt = write_file(&node, mount, &file, &tmp, &data, &sha, timeout);
        // The exec has its own limit; the recorder's is a backstop.
        let (op, _) = record_call(
            &ctx.rec,
            &node.name,
            self.process,
            call,
            timeout + Duration::from_secs(5),
            attempt,
        )
        .await;
        self.after(&op, ctx);
        op
    }

    /// One round: state, write, snapshot, and (unless `last`) maybe a move.
    async fn round(&mut self, ctx: &Ctx, last: bool) -> Round {
        if !self.cur.created && !self.ensure_created(ctx).await {
            return Round::Again;
        }
        let Some(st) = self.state(ctx, false).await else {
            return Round::Again;
        };
        if !st.moving_to.is_empty() {
            let since = *self.moving_since.get_or_insert_with(Instant::now);
            if since.elapsed() > ctx.opts.move_timeout {
                let op = self
                    .call(
                        ctx,
                        Call::DsCancelMove {
                            dataset: self.cur.name.clone(),
                        },
                    )
                    .await;
                if op.outcome == Outcome::Ok {
                    self.moving_since = None;
                }
            }
            return Round::Again;
        }
        self.moving_since = None;
        let Some(mount) = self.mount(ctx, &st).await else {
            return Round::Again;
        };
        let k = self.cur.next_file;
        self.cur.next_file += 1;
        let w = self.write(ctx, &st, &mount, k).await;
        if w.outcome != Outcome::Ok {
            return Round::Again;
        }
        self.cur.written += 1;
        let s = self
            .call(
                ctx,
                Call::DsSnapshot {
                    dataset: self.cur.name.clone(),
                    tag: tag_name(k),
                },
            )
            .await;
        let mut retire = self.cur.written >= ctx.opts.writes_per_dataset;
        if !last
            && self
                .rng
                .random_bool(ctx.opts.move_probability.clamp(0.0, 1.0))
        {
            let others: Vec<String> = ctx
                .nodes
                .iter()
                .filter(|n| n.name != st.primary)
                .map(|n| n.name.clone())
                .collect();
            if !others.is_empty() {
                let to = others[self.rng.random_range(0..others.len())].clone();
                let op = self
                    .call(
                        ctx,
                        Call::DsMove {
                            dataset: self.cur.name.clone(),
                            to,
                        },
                    )
                    .await;
                if op.outcome != Outcome::Fail {
                    self.moving_since = Some(Instant::now());
                }
                // A move of unknown outcome may begin at any later time, so no later write of
                // this dataset could be fenced (see checker::dataset): go on with a fresh one.
                retire |= op.outcome == Outcome::Unknown;
            }
        }
        if !last && retire {
            self.generation += 1;
            let next = Cursor::new(format!(
                "{}{}-{}",
                ctx.opts.prefix, self.id, self.generation
            ));
            let old = std::mem::replace(&mut self.cur, next);
            ctx.retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(old);
            self.moving_since = None;
        }
        if s.outcome == Outcome::Ok {
            Round::Done
        } else {
            Round::Again
        }
    }
}

/// The writers, until `stop`; returns every dataset they used.
pub(crate) async fn run_writers(ctx: Arc<Ctx>, stop: watch::Receiver<bool>) -> Vec<Cursor> {
    let tasks: Vec<_> = (0..ctx.opts.writers.max(1))
        .map(|id| {
            let ctx = ctx.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let cur = Cursor::new(format!("{}{id}-0", ctx.opts.prefix));
                let mut w = Writer::new(&ctx, id, cur, 0, 3_000_000 + id as u64);
                while !*stop.borrow() {
                    w.round(&ctx, false).await;
                    let delay = ctx.opts.interval.mul_f64(w.rng.random_range(0.0..2.0));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => {}
                    }
                }
                w.cur
            })
        })
        .collect();
    let mut all: Vec<Cursor> = ctx
        .retired
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .collect();
    for t in tasks {
        if let Ok(cur) = t.await {
            all.push(cur);
        }
    }
    all.extend(
        ctx.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..),
    );
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// A `DatasetList` of every dataset through any node that answers (not recorded: the settle
/// phase's polling).
async fn list_all(ctx: &Ctx) -> Result<Vec<(String, DsState)>, String> {
    let mut last = String::from("no node answered");
    for n in &ctx.nodes {
        let Ok(mut api) = crate::client::connect(&n.api_addr(), &ctx.cfg).await else {
            last = format!("{} does not answer", n.name);
            continue;
        };
        let list = api.dataset_list(pb::DatasetListRequest {
            name: String::new(),
            desired_only: false,
        });
        match tokio::time::timeout(ctx.opts.op_timeout, list).await {
            Ok(Ok(r)) => {
                return Ok(r
                    .into_inner()
                    .datasets
                    .into_iter()
                    .map(|d| (d.name.clone(), state_of(d)))
                    .collect())
            }
            Ok(Err(s)) => last = format!("{}: {:?}: {}", n.name, s.code(), s.message()),
            Err(_) => last = format!("{}: no answer", n.name),
        }
    }
    Err(last)
}

/// Why `st` has not settled, if it has not.
fn unsettled(st: &DsState) -> Option<String> {
    let latest = st.snapshots.last().map(|s| s.name.as_str()).unwrap_or("");
    let mut why = Vec::new();
    if !st.moving_to.is_empty() {
        why.push(format!("moving to {}", st.moving_to));
    }
    for h in &st.holders {
        if h.state != "ready" {
            why.push(format!("{} ({}) is {}", h.node, h.role, h.state));
        } else if h.latest_snapshot != latest {
            why.push(format!(
                "{} ({}) has {:?}, not {latest:?}",
                h.node, h.role, h.latest_snapshot
            ));
        }
    }
    (!why.is_empty()).then(|| why.join(", "))
}

/// After the heal: a write and a snapshot on every dataset, the holders settle, the final
/// states and every node's disk are read (all recorded in the history).
pub(crate) async fn finish(
    ctx: Arc<Ctx>,
    cursors: Vec<Cursor>,
    healed_at: Instant,
) -> DatasetPhase {
    let opts = ctx.opts.clone();
    let deadline = healed_at + opts.recovery_bound;
    // 1. Recovery: every dataset takes a write and a snapshot.
    let rounds = cursors.into_iter().enumerate().map(|(i, cur)| {
        let ctx = ctx.clone();
        async move {
            let name = cur.name.clone();
            let mut w = Writer::new(&ctx, usize::MAX, cur, 0, 4_000_000 + i as u64);
            let mut at = None;
            while Instant::now() < deadline {
                if w.round(&ctx, true).await == Round::Done {
                    at = Some(healed_at.elapsed().as_secs_f64());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            (name, at)
        }
    });
    let recovered: BTreeMap<String, Option<f64>> = futures::future::join_all(rounds)
        .await
        .into_iter()
        .collect();
    println!(
        "jepsen: datasets after heal: {}",
        recovered
            .iter()
            .map(|(n, t)| match t {
                Some(t) => format!("{n} {t:.1}s"),
                None => format!("{n} NOT within {:?}", opts.recovery_bound),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );

    // 2. Settle: no move left, every holder ready with the newest recorded snapshot.
    let settle_start = Instant::now();
    let mut pending: Vec<String> = Vec::new();
    let mut settled_after_s = None;
    while settle_start.elapsed() < opts.settle_bound {
        pending = match list_all(&ctx).await {
            Ok(all) => all
                .iter()
                .filter(|(name, _)| recovered.contains_key(name))
                .filter_map(|(name, d)| unsettled(d).map(|why| format!("{name}: {why}")))
                .collect(),
            Err(e) => vec![e],
        };
        if pending.is_empty() {
            settled_after_s = Some(settle_start.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "jepsen: dataset holders: {}",
        match settled_after_s {
            Some(t) => format!("all settled after {t:.1}s"),
            None => format!(
                "NOT settled within {:?}: {}",
                opts.settle_bound,
                pending.join("; ")
            ),
        }
    );

    // 3. The final state of every dataset, recorded.
    let mut w = Writer::new(&ctx, usize::MAX, Cursor::new(String::new()), 0, 5_000_000);
    for name in recovered.keys() {
        w.cur = Cursor::new(name.clone());
        let until = Instant::now() + opts.settle_bound;
        while w.state(&ctx, true).await.is_none() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    // 4. Every node's disk, recorded.
    let reads = ctx.nodes.iter().enumerate().map(|(i, n)| {
        let ctx = ctx.clone();
        async move {
            let call = Call::DsRead {
                disk: n.name.clone(),
            };
            let attempt = async {
                read_disk(n, ctx.opts.op_timeout * 4)
                    .await
                    .map(|d| Done::ds(Some(DsResult::Disk(d))))
                    .map_err(Failure::Definite)
            };
            let (op, _) = record_call(
                &ctx.rec,
                &n.name,
                6_000_000 + i as u64,
                call,
                ctx.opts.op_timeout * 8,
                attempt,
            )
            .await;
            if let Some(e) = &op.error {
                println!("jepsen: reading {}'s disk failed: {e}", n.name);
            }
            (n.name.clone(), op.outcome == Outcome::Ok)
        }
    });
    let disks_read: BTreeMap<String, bool> =
        futures::future::join_all(reads).await.into_iter().collect();
    let ok = recovered.values().all(Option::is_some)
        && settled_after_s.is_some()
        && disks_read.values().all(|r| *r);
    DatasetPhase {
        recovery_bound_s: opts.recovery_bound.as_secs_f64(),
        recovered,
        settle_bound_s: opts.settle_bound.as_secs_f64(),
        settled_after_s,
        unsettled: pending,
        disks_read,
        ok,
    }
}

/// Reads every snapshot of every dataset on `node`'s disk: names and guids from `info.json`,
/// each regular file's size and SHA-256 (hashed once per inode).
pub async fn read_disk(node: &Node, timeout: Duration) -> Result<NodeDisk, String> {
    let list = format!(
        "[ -d {DATASETS_ROOT} ] || exit 0; cd {DATASETS_ROOT} || exit 20; \
         for s in */snapshots/*; do [ -d \"$s\" ] || continue; \
         printf 'S %s ' \"$s\"; tr -d '\\n' < \"$s/info.json\"; echo; done; \
         find . -path './*/snapshots/*/tree/*' ! -type d -exec stat -c 'F|%i|%s|%F|%n' {{}} +"
    );
    let out = docker::exec(node, None, &["sh", "-c", &list], None, timeout)
        .await
        .map_err(|e| e.to_string())?;
    if out.code != Some(0) {
        return Err(format!(
            "listing failed ({:?}): {}",
            out.code,
            out.stderr.trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let listing = parse_listing(&text)?;
    // One path per inode to hash.
    let mut by_inode: BTreeMap<u64, String> = BTreeMap::new();
    for f in listing.files.iter().filter(|f| f.regular) {
        by_inode.entry(f.inode).or_insert_with(|| f.path.clone());
    }
    let paths: Vec<&String> = by_inode.values().collect();
    let mut hashes: HashMap<String, String> = HashMap::new();
    for batch in paths.chunks(HASH_BATCH) {
        let mut args: Vec<&str> = vec!["sha256sum"];
        args.extend(batch.iter().map(|p| p.as_str()));
        let out = docker::exec(node, Some(DATASETS_ROOT), &args, None, timeout)
            .await
            .map_err(|e| e.to_string())?;
        if out.code != Some(0) {
            return Err(format!(
                "sha256sum failed ({:?}): {}",
                out.code,
                out.stderr.trim()
            ));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((h, p)) = line.split_once("  ") {
                hashes.insert(p.to_string(), h.to_string());
            }
        }
    }
    let inode_hash: HashMap<u64, String> = by_inode
        .iter()
        .filter_map(|(i, p)| hashes.get(p).map(|h| (*i, h.clone())))
        .collect();
    Ok(listing.into_disk(&inode_hash))
}

/// A listed file in a snapshot's tree.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listed {
    /// `./NAME.ID/snapshots/SEQ/tree/REL`
    path: String,
    dataset: String,
    seq: String,
    rel: String,
    inode: u64,
    size: u64,
    regular: bool,
    kind: String,
}

#[derive(Debug, Default)]
struct Listing {
    /// (dataset, seq) -> (name, guid), or why not.
    snapshots: BTreeMap<(String, String), Result<(String, u64), String>>,
    files: Vec<Listed>,
}

fn parse_listing(text: &str) -> Result<Listing, String> {
    #[derive(serde::Deserialize)]
    struct Info {
        name: String,
        guid: u64,
    }
    let mut l = Listing::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("S ") {
            let (dir, json) = rest.split_once(' ').unwrap_or((rest, ""));
            let mut parts = dir.split('/');
            let (Some(ds), Some("snapshots"), Some(seq)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("unexpected snapshot directory {dir:?}"));
            };
            let info = serde_json::from_str::<Info>(json)
                .map(|i| (i.name, i.guid))
                .map_err(|e| format!("{dir}/info.json: {e}"));
            l.snapshots.insert((ds.to_string(), seq.to_string()), info);
        } else if let Some(rest) = line.strip_prefix("F|") {
            let mut f = rest.splitn(4, '|');
            let (Some(inode), Some(size), Some(kind), Some(path)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return Err(format!("unexpected stat line {line:?}"));
            };
            let mut parts = path.trim_start_matches("./").splitn(5, '/');
            let (Some(ds), Some("snapshots"), Some(seq), Some("tree"), Some(rel)) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                return Err(format!("unexpected path {path:?}"));
            };
            l.files.push(Listed {
                path: path.to_string(),
                dataset: ds.to_string(),
                seq: seq.to_string(),
                rel: rel.to_string(),
                inode: inode
                    .parse()
                    .map_err(|_| format!("bad inode in {line:?}"))?,
                size: size.parse().map_err(|_| format!("bad size in {line:?}"))?,
                regular: kind.starts_with("regular"),
                kind: kind.to_string(),
            });
        } else if !line.trim().is_empty() {
            return Err(format!("unexpected line {line:?}"));
        }
    }
    Ok(l)
}

impl Listing {
    fn into_disk(self, hashes: &HashMap<u64, String>) -> NodeDisk {
        let mut datasets: BTreeMap<String, BTreeMap<String, DiskSnapshot>> = BTreeMap::new();
        for ((ds, seq), info) in &self.snapshots {
            let snap = match info {
                Ok((name, guid)) => DiskSnapshot {
                    name: name.clone(),
                    guid: *guid,
                    ..Default::default()
                },
                Err(e) => DiskSnapshot {
                    name: format!("?{seq}"),
                    problems: vec![e.clone()],
                    ..Default::default()
                },
            };
            datasets
                .entry(ds.clone())
                .or_default()
                .insert(seq.clone(), snap);
        }
        for f in self.files {
            let Some(snap) = datasets.get_mut(&f.dataset).and_then(|d| d.get_mut(&f.seq)) else {
                continue;
            };
            if !f.regular {
                snap.problems.push(format!("{} is a {}", f.rel, f.kind));
                continue;
            }
            match hashes.get(&f.inode) {
                Some(h) => {
                    snap.files.insert(f.rel, file_digest(f.size, h));
                }
                None => snap.problems.push(format!("{} could not be hashed", f.rel)),
            }
        }
        NodeDisk {
            datasets: datasets
                .into_iter()
                .map(|(local_name, snaps)| DiskDataset {
                    local_name,
                    snapshots: snaps.into_values().collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_are_deterministic_named_and_sized() {
        let a = file_content(7, "jd0-0", 3, 2 << 20);
        assert_eq!(a, file_content(7, "jd0-0", 3, 2 << 20));
        assert_ne!(a, file_content(7, "jd0-0", 4, 2 << 20));
        assert_ne!(a, file_content(8, "jd0-0", 3, 2 << 20));
        assert!(a.starts_with(b"flock-jepsen jd0-0 f00003 seed 7\n"));
        let sizes: Vec<usize> = (0..400)
            .map(|k| file_content(1, "d", k, 2 << 20).len())
            .collect();
        assert!(sizes.iter().all(|&s| (1024..=2 << 20).contains(&s)));
        assert!(sizes.iter().filter(|&&s| s <= 32 << 10).count() > 200);
        assert!(sizes.iter().any(|&s| s > 512 << 10));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_disk_listing_becomes_snapshots_with_hashed_files() {
        let text = "S jd0-0.3/snapshots/00000000000000000001 {  \"format\": 1,  \"name\": \"s00001\",  \"guid\": 77,  \"created_unix\": 1}\n\
                    S jd0-0.3/snapshots/00000000000000000002 {\"name\": \"s00002\", \"guid\": 78}\n\
                    F|11|5|regular file|./jd0-0.3/snapshots/00000000000000000001/tree/f00001\n\
                    F|11|5|regular file|./jd0-0.3/snapshots/00000000000000000002/tree/f00001\n\
                    F|12|0|regular empty file|./jd0-0.3/snapshots/00000000000000000002/tree/f00002\n\
                    F|13|4|symbolic link|./jd0-0.3/snapshots/00000000000000000002/tree/l\n";
        let l = parse_listing(text).unwrap();
        assert_eq!(l.files.len(), 4);
        let hashes: HashMap<u64, String> = [(11, "aa".to_string()), (12, "bb".to_string())].into();
        let disk = l.into_disk(&hashes);
        assert_eq!(disk.datasets.len(), 1);
        let d = &disk.datasets[0];
        assert_eq!(d.local_name, "jd0-0.3");
        assert_eq!(d.snapshots[0].name, "s00001");
        assert_eq!(d.snapshots[0].guid, 77);
        assert_eq!(d.snapshots[0].files["f00001"], "5:aa");
        assert_eq!(d.snapshots[1].files["f00001"], "5:aa");
        assert_eq!(d.snapshots[1].files["f00002"], "0:bb");
        assert_eq!(d.snapshots[1].problems, vec!["l is a symbolic link"]);
        assert!(parse_listing("garbage\n").is_err());
    }

    #[test]
    fn settling_wants_every_holder_ready_with_the_newest_snapshot() {
        let mut st = DsState {
            id: 1,
            primary: "n1".into(),
            epoch: 2,
            moving_to: String::new(),
            snapshots: vec![DsSnap {
                name: "s1".into(),
                guid: 1,
                epoch: 2,
            }],
            holders: vec![DsHolder {
                node: "n1".into(),
                role: "primary".into(),
                state: "ready".into(),
                latest_snapshot: "s1".into(),
                mount_path: "/x".into(),
            }],
        };
        assert_eq!(unsettled(&st), None);
        st.holders.push(DsHolder {
            node: "n2".into(),
            role: "replica".into(),
            state: "ready".into(),
            latest_snapshot: "s0".into(),
            mount_path: "/y".into(),
        });
        assert!(unsettled(&st).unwrap().contains("n2 (replica)"));
        assert!(safe_path("/data/storage/datasets/jd0-0.3/live"));
        assert!(!safe_path("/data/x; rm -rf /"));
        assert!(!safe_path("relative"));
    }
}
