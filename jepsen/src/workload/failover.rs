//! The failover workload (issue 17): the move workload's test app ([`super::moves`]: the same
//! clients, direct and through the mesh, the same final read) on apps of its own (`jf-1`..)
//! whose datasets keep replicas (`replicas: 2`, a snapshot every `snapshot_interval`, 500 ms by
//! default), and no moves: the nemesis's faults make the failovers (kill of the app's node,
//! kill of its flockd alone, SIGSTOP of its flockd, a partition isolating it). What is its own,
//! here:
//!
//! - [`replicate`]: `DatasetSet` of each app's dataset (`fo_replicate`), retried until
//!   acknowledged, after the deploy (which sends the same policy as the app's volume keys,
//!   `replicas` and `snapshot_interval`, when this workload deploys): the app workload's
//!   deployer, when it runs, deploys these apps with its own and sends no policy.
//! - [`events_op`]: after the faults, the cluster's events (`Events`, `fo_events`): each
//!   `FailedOver` with its nodes by name and its times on the history's clock, which
//!   [`crate::checker::failover`] needs to tell an allowed loss from a lost write.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::Value;
use tokio::sync::watch;

use flock_proto::v1 as pb;

use super::moves::Ctx;
use super::{pause, Done};
use crate::client::{classify, Failure};
use crate::history::{AppResult, Call, FailoverSeen, NoReplicaSeen, Outcome};
use crate::runner::{record_call, Conn};

/// Sets the replication of `app`'s dataset (named after the app) until a `DatasetSet` is
/// acknowledged, or `stop`. Until the app first runs its dataset does not exist, and the call
/// is refused: asked again every second.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn replicate(
    ctx: &Ctx,
    conns: &mut [Conn],
    rng: &mut StdRng,
    app: &str,
    replicas: u32,
    interval: Duration,
    stop: &mut watch::Receiver<bool>,
) {
    let mut process = ctx.opts.process_base + 600_000;
    let interval_ms = interval.as_millis() as u64;
    loop {
        let i = rng.random_range(0..conns.len());
        let conn = &mut conns[i];
        let attempt = async {
            let api = conn.api().await?;
            let r = api
                .dataset_set(pb::DatasetSetRequest {
                    name: app.to_string(),
                    size_limit: None,
                    clear_limit: false,
                    retention: String::new(),
                    replicas: Some(replicas),
                    snapshot_interval: format!("{interval_ms}ms"),
                })
                .await
                .map_err(|s| classify(&s))?
                .into_inner();
            let d = r.dataset.unwrap_or_default();
            Ok(Done::app(AppResult::Replicated {
                replicas: d.replicas_wanted,
                interval_ms: d.snapshot_interval_ms,
            }))
        };
        let (op, broken) = record_call(
            &ctx.rec,
            &ctx.nodes[i].name,
            process,
            Call::FoReplicate {
                app: app.to_string(),
                replicas,
                interval_ms,
            },
            ctx.opts.rpc_timeout,
            attempt,
        )
        .await;
        if broken {
            conns[i].api = None;
        }
        match op.outcome {
            Outcome::Ok => return,
            Outcome::Unknown => process += 1,
            Outcome::Fail => {}
        }
        if pause(Duration::from_secs(1), stop).await {
            return;
        }
    }
}

/// The time a periodic snapshot's name gives (`auto-2026-11-23T23-15-49.123Z`: flockd names
/// it by the wall clock just before it takes it), in ms since the Unix epoch.
pub fn snapshot_name_unix_ms(name: &str) -> Option<u64> {
    let t = name.strip_prefix("auto-")?.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, ms) = time.split_once('.')?;
    let h: Vec<i64> = hms
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let ms: i64 = ms.parse().ok()?;
    let ([y, m, day], [hh, mm, ss]) = (d.as_slice(), h.as_slice()) else {
        return None;
    };
    if !(1..=12).contains(m) || !(1..=31).contains(day) || ms > 999 || *hh > 23 {
        return None;
    }
    // Days since 1970-01-01 from a civil date (Howard Hinnant's algorithm, as flockd's).
    let y = if *m <= 2 { y - 1 } else { *y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1000 + ms).ok()
}

/// The `FailedOver` and `NoReplica` events of `events_json` (`EventsReply`), nodes by name
/// (`names`: id -> name), times on the history's clock (`t0_unix_ns`: the wall clock at its 0).
pub fn parse_events(
    events_json: &str,
    names: &BTreeMap<u64, String>,
    t0_unix_ns: u64,
) -> Result<(Vec<FailoverSeen>, Vec<NoReplicaSeen>), String> {
    let events: Vec<Value> =
        serde_json::from_str(events_json).map_err(|e| format!("undecodable events: {e}"))?;
    let name = |v: &Value| {
        let id = v.as_u64().unwrap_or(0);
        names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"))
    };
    let on_clock = |unix_ms: u64| (unix_ms * 1_000_000).saturating_sub(t0_unix_ns);
    // node -> (declared at, last heard), from the NodeDown events.
    let mut heard: Vec<(String, u64, u64)> = Vec::new();
    for e in &events {
        if let Some(d) = e["event"].get("NodeDown") {
            heard.push((
                name(&d["node"]),
                e["at_unix_ms"].as_u64().unwrap_or(0),
                d["last_heard_unix_ms"].as_u64().unwrap_or(0),
            ));
        }
    }
    let mut failovers = Vec::new();
    let mut no_replica = Vec::new();
    for e in &events {
        let at_unix_ms = e["at_unix_ms"].as_u64().unwrap_or(0);
        if let Some(f) = e["event"].get("FailedOver") {
            let from = name(&f["from"]);
            let snapshot = f["snapshot"].as_str().map(str::to_string);
            let snapshot_unix_ms = snapshot
                .as_deref()
                .and_then(snapshot_name_unix_ms)
                .or_else(|| f["snapshot_unix"].as_u64().map(|s| s * 1000));
            // The latest NodeDown of that node declared at or before the failover.
            let last_heard = heard
                .iter()
                .filter(|(n, at, _)| *n == from && *at <= at_unix_ms)
                .max_by_key(|(_, at, _)| *at)
                .map(|(_, _, h)| on_clock(*h));
            failovers.push(FailoverSeen {
                id: e["id"].as_u64().unwrap_or(0),
                dataset: f["dataset"].as_str().unwrap_or("").to_string(),
                apps: f["apps"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                from,
                to: name(&f["to"]),
                epoch: f["epoch"].as_u64().unwrap_or(0),
                at_unix_ms,
                at_ns: on_clock(at_unix_ms),
                last_heard_ns: last_heard,
                snapshot,
                snapshot_unix_ms,
                snapshot_ns: snapshot_unix_ms.map(on_clock),
                at_risk_ms: f["at_risk_ms"].as_u64().unwrap_or(0),
            });
        } else if let Some(f) = e["event"].get("NoReplica") {
            no_replica.push(NoReplicaSeen {
                dataset: f["dataset"].as_str().unwrap_or("").to_string(),
                node: name(&f["node"]),
                reason: f["reason"].as_str().unwrap_or("").to_string(),
                at_ns: on_clock(at_unix_ms),
            });
        }
    }
    Ok((failovers, no_replica))
}

/// While the workload runs: reads the cluster's new events every 3 s, through the nodes in
/// turn (a node that does not answer is skipped), into `ctx.events_seen`, until `stop`. The
/// cluster keeps only its newest events ([`flock_scheduler::failover::MAX_EVENTS`]): a run with
/// many faults would lose its first failovers if they were read only at the end.
pub(crate) async fn collect_events(ctx: std::sync::Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut conns: Vec<Conn> = ctx.nodes.iter().map(|n| Conn::new(n, &ctx.cfg)).collect();
    let mut next = 0u64;
    let mut k = 0usize;
    loop {
        k += 1;
        let conn = &mut conns[k % ctx.nodes.len()];
        let read = async {
            let api = conn.api().await?;
            api.events(pb::EventsRequest { after: next })
                .await
                .map_err(|s| classify(&s))
                .map(|r| r.into_inner())
        };
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(r)) => {
                if let Ok(Value::Array(events)) = serde_json::from_str::<Value>(&r.events_json) {
                    let mut seen = ctx.events_seen.lock().unwrap_or_else(|p| p.into_inner());
                    for e in events {
                        if let Some(id) = e["id"].as_u64() {
                            seen.insert(id, e);
                        }
                    }
                }
                next = next.max(r.next);
            }
            _ => conn.api = None,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The events read during the run and `final_json` together, oldest first; an error when
/// some were dropped by the cluster before anyone read them (ids missing from 0 on).
pub fn merge_events(seen: &BTreeMap<u64, Value>, final_json: &str) -> Result<String, String> {
    let mut all = seen.clone();
    let last: Vec<Value> =
        serde_json::from_str(final_json).map_err(|e| format!("undecodable events: {e}"))?;
    for e in last {
        if let Some(id) = e["id"].as_u64() {
            all.insert(id, e);
        }
    }
    if let Some(missing) = (0..all.len() as u64).find(|id| !all.contains_key(id)) {
        return Err(format!(
            "the cluster's events from id {missing} on were dropped (it keeps the newest {}) \
             before they were read: the failovers cannot all be checked",
            flock_scheduler::failover::MAX_EVENTS
        ));
    }
    serde_json::to_string(&all.into_values().collect::<Vec<_>>()).map_err(|e| e.to_string())
}

/// The cluster's events after the faults (`fo_events`), through the first node that answers
/// (each try recorded), with the members' names from its `Status`; with those read during the
/// run ([`collect_events`]).
pub(crate) async fn events_op(ctx: &Ctx, conns: &mut [Conn]) {
    let t0_unix_ns = ctx.rec.t0_unix_ns;
    for (i, conn) in conns.iter_mut().enumerate() {
        let attempt = async {
            let api = conn.api().await?;
            let status = api
                .status(pb::StatusRequest { local: false })
                .await
                .map_err(|s| classify(&s))?
                .into_inner();
            let names: BTreeMap<u64, String> =
                status.members.into_iter().map(|m| (m.id, m.name)).collect();
            let r = api
                .events(pb::EventsRequest { after: 0 })
                .await
                .map_err(|s| classify(&s))?
                .into_inner();
            let seen = ctx
                .events_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let all = merge_events(&seen, &r.events_json).map_err(Failure::Definite)?;
            let (failovers, no_replica) =
                parse_events(&all, &names, t0_unix_ns).map_err(Failure::Definite)?;
            Ok(Done::app(AppResult::Failovers {
                failovers,
                no_replica,
            }))
        };
        let (op, broken) = record_call(
            &ctx.rec,
            &ctx.nodes[i].name,
            ctx.opts.process_base + 700_000,
            Call::FoEvents {},
            Duration::from_secs(10),
            attempt,
        )
        .await;
        if broken {
            conn.api = None;
        }
        if op.outcome == Outcome::Ok {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_during_the_run_and_at_the_end_are_merged_and_a_gap_is_an_error() {
        let ev = |id: u64| serde_json::json!({"id": id, "at_unix_ms": id, "event": {}});
        let seen: BTreeMap<u64, Value> = (0..3).map(|i| (i, ev(i))).collect();
        let last = serde_json::to_string(&vec![ev(2), ev(3)]).unwrap();
        let all: Vec<Value> = serde_json::from_str(&merge_events(&seen, &last).unwrap()).unwrap();
        assert_eq!(
            all.iter()
                .map(|e| e["id"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // Read only at the end, after the cluster dropped 0..5: refused, not checked as if
        // the first failovers never happened.
        let late = serde_json::to_string(&vec![ev(5), ev(6)]).unwrap();
        let err = merge_events(&BTreeMap::new(), &late).unwrap_err();
        assert!(err.contains("from id 0 on were dropped"), "{err}");
        let gap: BTreeMap<u64, Value> = [(0, ev(0)), (2, ev(2))].into();
        assert!(merge_events(&gap, "[]").unwrap_err().contains("from id 1"));
    }

    #[test]
    fn periodic_snapshot_names_give_their_time() {
        // flockd's own test of time_name: 1_795_475_749_123 ms is 2026-11-23T23-15-49.123Z.
        assert_eq!(
            snapshot_name_unix_ms("auto-2026-11-23T23-15-49.123Z"),
            Some(1_795_475_749_123)
        );
        assert_eq!(
            snapshot_name_unix_ms("auto-2000-02-29T00-00-00.000Z"),
            Some(951_782_400_000)
        );
        assert_eq!(
            snapshot_name_unix_ms("auto-1970-01-01T00-00-00.000Z"),
            Some(0)
        );
        assert_eq!(snapshot_name_unix_ms("move-3"), None);
        assert_eq!(snapshot_name_unix_ms("auto-2026-13-01T00-00-00.000Z"), None);
    }

    #[test]
    fn failed_over_events_are_put_on_the_history_clock() {
        let json = r#"[
          {"id":1,"at_unix_ms":1795475760000,"text":"node n2 declared down",
           "event":{"NodeDown":{"node":2,"last_heard_unix_ms":1795475756500,"by_operator":false}}},
          {"id":2,"at_unix_ms":1795475760000,"text":"...",
           "event":{"FailedOver":{"dataset":"jf-1","apps":["jf-1"],"from":2,"to":4,"epoch":3,
             "snapshot":"auto-2026-11-23T23-15-49.123Z","snapshot_unix":1795475749,"at_risk_ms":7500}}},
          {"id":3,"at_unix_ms":1795475761000,"text":"...",
           "event":{"NoReplica":{"dataset":"x","node":2,"reason":"none fits"}}},
          {"id":4,"at_unix_ms":1795475762000,"text":"...","event":{"NodeUp":{"node":2}}}
        ]"#;
        let names: BTreeMap<u64, String> = [(2, "n2".to_string()), (4, "n4".to_string())].into();
        let t0 = 1_795_475_700_000u64 * 1_000_000;
        let (f, n) = parse_events(json, &names, t0).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].from.as_str(), f[0].to.as_str()), ("n2", "n4"));
        assert_eq!(f[0].at_ns, 60_000_000_000);
        assert_eq!(f[0].last_heard_ns, Some(56_500_000_000));
        assert_eq!(f[0].snapshot_ns, Some(49_123_000_000));
        assert_eq!(f[0].epoch, 3);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].node, "n2");
        assert!(parse_events("nope", &names, t0).is_err());
    }
}
