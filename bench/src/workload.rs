//! The two workloads: closed-loop write throughput/latency, and the write gap across a
//! `kill -9` of the leader.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use crate::cluster::{Cluster, KvClient};
use crate::progress;

/// The value every put writes: 64 bytes of ASCII (flock's API takes a string, etcd's bytes;
/// ASCII makes both the same 64 bytes on the wire).
pub const VALUE: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A put that takes longer than this during the throughput run counts as an error; it only
/// keeps a stuck system from stalling the benchmark.
const THROUGHPUT_PUT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub clients: usize,
    /// Member the clients wrote to (the leader).
    pub endpoint: String,
    /// Acknowledged puts started inside the measured window.
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Puts that failed or timed out inside the measured window.
    pub errors: u64,
    /// Elections (Raft term changes) from the first put to the last: spurious under load.
    pub elections: u64,
}

/// `clients` tasks, each with its own gRPC channel to the leader, each putting `VALUE` under
/// `bench/<client>/<i>` one at a time, for `warmup` (not measured) and then `duration`.
pub async fn throughput(
    cluster: &impl Cluster,
    leader: usize,
    clients: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<Throughput> {
    let system = cluster.system();
    let target = cluster.target(leader);
    // Connect everyone before the clock starts, so connection setup is not measured.
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(KvClient::connect(system, &target).await?);
    }
    let term_before = cluster.term().await?;
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + warmup;
    let end = measure_from + duration;

    let mut tasks = Vec::with_capacity(clients);
    for (c, mut kv) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            // 1 µs .. 60 s at 3 significant digits.
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| anyhow!("cannot create histogram: {e}"))?;
            let mut errors = 0u64;
            tokio::time::sleep_until(start.into()).await;
            let mut i = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let r = tokio::time::timeout(
                    THROUGHPUT_PUT_TIMEOUT,
                    kv.put(format!("bench/{c}/{i}"), VALUE),
                )
                .await;
                i += 1;
                if t0 < measure_from {
                    continue;
                }
                match r {
                    Ok(Ok(())) => {
                        let us = t0.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                        hist.record(us)
                            .map_err(|e| anyhow!("cannot record latency: {e}"))?;
                    }
                    _ => errors += 1,
                }
            }
            Ok::<_, anyhow::Error>((hist, errors))
        }));
    }

    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| anyhow!("cannot create histogram: {e}"))?;
    let mut errors = 0;
    for t in tasks {
        let (hist, e) = t.await.context("a client task panicked")??;
        all.add(&hist)
            .map_err(|e| anyhow!("cannot merge histograms: {e}"))?;
        errors += e;
    }
    let elections = cluster.term().await?.saturating_sub(term_before);
    // Puts still running at `end` finish after it; counting by start time keeps the window exact.
    let ops = all.len();
    Ok(Throughput {
        clients,
        endpoint: cluster.member_name(leader).to_string(),
        ops,
        ops_per_sec: ops as f64 / duration.as_secs_f64(),
        p50_ms: all.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: all.max() as f64 / 1000.0,
        errors,
        elections,
    })
}

/// How long the failover writer waits for one put before it moves to the next member.
pub const FAILOVER_PUT_TIMEOUT: Duration = Duration::from_millis(500);
/// After a put fails faster than this, the writer waits out the rest before retrying, so that
/// members answering "no leader" at once are not hammered in a busy loop (which would steal
/// CPU from the election it waits for). It bounds the gap's resolution to about 10 ms.
const RETRY_FLOOR: Duration = Duration::from_millis(10);
/// How often the live members are asked whom they see as leader after the kill.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// How long a round may take to see a write acknowledged after the kill.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Serialize)]
pub struct FailoverRound {
    pub round: usize,
    pub killed: String,
    pub new_leader: String,
    /// From the last acknowledged write before the kill to the first after it.
    pub gap_ms: f64,
    /// From the moment the leader was dead (reaped) to the first acknowledged write after it.
    pub dead_to_ack_ms: f64,
    /// From the moment the leader was dead to the first probe in which a live member named a
    /// new leader (members asked every `PROBE_EVERY`, from their own view): the election
    /// alone, without the client's retry timing.
    pub dead_to_leader_ms: Option<f64>,
    /// Every failed put of the round, in order: what the client saw during the gap.
    pub failures: Vec<Failure>,
}

/// One failed put during a failover round.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// When it was sent, relative to the leader's death (negative: before it).
    pub sent_ms: f64,
    /// The member it was sent to.
    pub member: String,
    /// "timeout" or the gRPC status code and message.
    pub error: String,
}

/// One acknowledged put: when it was sent, when it was acknowledged.
#[derive(Clone, Copy)]
struct Ack {
    sent: Instant,
    acked: Instant,
}

/// What the failover writer saw.
struct Writes {
    acks: Vec<Ack>,
    /// (sent, member index, error)
    failures: Vec<(Instant, usize, String)>,
}

/// One writer puts sequentially, starting at the leader and moving on to the next live member
/// after any error or timeout; after `before_kill` the leader is killed with SIGKILL. The gap is
/// measured from the last write acknowledged before the kill to the first write sent after
/// the leader was dead (reaped) and acknowledged. A write sent while the kill was under way is
/// ignored: the dead leader may have answered it from its socket buffer.
/// The killed member is restarted and the cluster is whole again when this returns.
pub async fn failover(
    cluster: &mut impl Cluster,
    round: usize,
    before_kill: Duration,
) -> Result<FailoverRound> {
    let system = cluster.system();
    let leader = cluster.leader().await?;
    let n = cluster.size();
    let clients = (0..n)
        .map(|i| KvClient::lazy(system, &cluster.target(i)))
        .collect::<Result<Vec<_>>>()?;
    let (alive_tx, alive_rx) = watch::channel(vec![true; n]);
    let (acked_tx, mut acked_rx) = watch::channel::<Option<Instant>>(None);
    let (stop_tx, stop_rx) = watch::channel(false);

    let writer = tokio::spawn(async move {
        let mut clients = clients;
        let mut current = leader;
        let mut w = Writes {
            acks: Vec::new(),
            failures: Vec::new(),
        };
        let mut i = 0u64;
        while !*stop_rx.borrow() {
            let sent = Instant::now();
            let key = format!("bench/failover/{round}/{i}");
            i += 1;
            let error =
                match tokio::time::timeout(FAILOVER_PUT_TIMEOUT, clients[current].put(key, VALUE))
                    .await
                {
                    Ok(Ok(())) => {
                        let acked = Instant::now();
                        w.acks.push(Ack { sent, acked });
                        acked_tx.send_replace(Some(acked));
                        continue;
                    }
                    Ok(Err(status)) => {
                        let mut e = format!("{:?}: {}", status.code(), status.message());
                        e.truncate(200);
                        e
                    }
                    Err(_) => "timeout".to_string(),
                };
            w.failures.push((sent, current, error));
            let alive = alive_rx.borrow().clone();
            current = (1..=n)
                .map(|k| (current + k) % n)
                .find(|&k| alive[k])
                .unwrap_or(current);
            let spent = sent.elapsed();
            if spent < RETRY_FLOOR {
                tokio::time::sleep(RETRY_FLOOR - spent).await;
            }
        }
        w
    });

    // Connect the probe now, so no handshake falls into the gap, and check it names the leader.
    let mut probe = cluster.leader_probe()?;
    for i in 0..n {
        if probe.leader_seen_by(i).await != Some(leader) {
            progress!(
                "{}: warning: {} does not name {} as leader before the kill",
                system.name(),
                cluster.member_name(i),
                cluster.member_name(leader)
            );
        }
    }

    tokio::time::sleep(before_kill).await;
    let killed = cluster.member_name(leader).to_string();
    progress!("{}: round {round}: kill -9 leader {killed}", system.name());
    let kill_sent = Instant::now();
    cluster.kill(leader).await?;
    let dead = Instant::now();
    alive_tx.send_modify(|a| a[leader] = false);

    // Wait for an acknowledgement of a write sent after the leader was dead.
    // `wait_for` returns a read guard on the channel; keep only whether it succeeded, or the
    // writer's next `send_replace` would block on that guard.
    let writer_through = acked_rx.clone();
    let acked = async {
        tokio::time::timeout(
            FAILOVER_LIMIT,
            acked_rx.wait_for(|t| t.is_some_and(|t| t > dead)),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    };
    // Meanwhile, ask the live members every PROBE_EVERY whom they see as leader; give up 2 s
    // after the writer got through (the probe is then broken, not the cluster).
    let elected = async {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        while dead.elapsed() < FAILOVER_LIMIT {
            tick.tick().await;
            let through = *writer_through.borrow();
            if through.is_some_and(|t| t > dead && t.elapsed() > Duration::from_secs(2)) {
                break;
            }
            for i in (0..n).filter(|&i| i != leader) {
                if probe.leader_seen_by(i).await.is_some_and(|l| l != leader) {
                    return Some(Instant::now());
                }
            }
        }
        None
    };
    let (waited, elected) = tokio::join!(acked, elected);
    // Let a few more writes through, then stop the writer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_tx.send_replace(true);
    let w = writer.await.context("the failover writer panicked")?;
    if !waited {
        bail!(
            "{}: no write was acknowledged within {} s after killing leader {killed}",
            system.name(),
            FAILOVER_LIMIT.as_secs()
        );
    }

    let last_before = w
        .acks
        .iter()
        .filter(|a| a.acked <= kill_sent)
        .map(|a| a.acked)
        .max()
        .ok_or_else(|| {
            anyhow!(
                "{}: no write was acknowledged in the {} s before the kill",
                system.name(),
                before_kill.as_secs()
            )
        })?;
    let first_after = w
        .acks
        .iter()
        .filter(|a| a.sent >= dead)
        .map(|a| a.acked)
        .min()
        .ok_or_else(|| {
            anyhow!(
                "{}: no write sent after the kill was acknowledged",
                system.name()
            )
        })?;
    let gap = first_after.duration_since(last_before);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let failures: Vec<Failure> = w
        .failures
        .iter()
        .map(|(sent, member, error)| Failure {
            sent_ms: if *sent >= dead {
                ms(sent.duration_since(dead))
            } else {
                -ms(dead.duration_since(*sent))
            },
            member: cluster.member_name(*member).to_string(),
            error: error.clone(),
        })
        .collect();

    let new_leader = cluster.leader().await?;
    let new_leader = cluster.member_name(new_leader).to_string();
    progress!(
        "{}: round {round}: gap {:.0} ms ({} failed puts), new leader {new_leader} seen {} \
         after the kill; restarting {killed}",
        system.name(),
        ms(gap),
        failures.len(),
        elected
            .map(|t| format!("{:.0} ms", ms(t.duration_since(dead))))
            .unwrap_or_else(|| "never".into())
    );
    cluster.restart(leader).await?;
    Ok(FailoverRound {
        round,
        killed,
        new_leader,
        gap_ms: ms(gap),
        dead_to_ack_ms: ms(first_after.duration_since(dead)),
        dead_to_leader_ms: elected.map(|t| ms(t.duration_since(dead))),
        failures,
    })
}

/// Median of the failover gaps (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}
