//! A run's report: `report.md` (verdict, figures, faults, anomalies) and `timeline.png`, the
//! latency of every op and the throughput over time with the faults shaded.
//!
//! The PNG is drawn with plotters' bitmap backend; text uses ab_glyph with a TrueType font read
//! at run time (DejaVu Sans from Debian's `fonts-dejavu-core`, or `FLOCK_JEPSEN_FONT`), so no
//! system font library is linked. Without a font the chart is drawn without text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::checker::register::describe;
use crate::history::{History, Op, Outcome};
use crate::nemesis::{describe_plan, Step};
use crate::runner::{RunError, RunOptions, Verdict};
use crate::workload::register::CAS_NOT_APPLIED;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font for plotters once; false when none could be read.
fn font() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let env = std::env::var("FLOCK_JEPSEN_FONT").ok();
        for path in env.iter().map(String::as_str).chain(FONT_PATHS) {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Writes `report.md` and `timeline.png` into `dir`.
pub fn write(
    dir: &Path,
    history: &History,
    verdict: &Verdict,
    steps: &[Step],
    opts: &RunOptions,
    workload_end_ns: u64,
) -> Result<(), RunError> {
    let png = dir.join("timeline.png");
    let drawn = timeline(&png, history, workload_end_ns).err();
    let md = markdown(history, verdict, steps, opts, drawn.as_deref());
    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|source| RunError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "VALID",
        Some(false) => "INVALID",
        None => "UNDECIDED",
    }
}

/// Seconds after the heal per name (`never` for none), comma-separated.
fn after_heal(times: &BTreeMap<String, Option<f64>>) -> String {
    times
        .iter()
        .map(|(n, t)| match t {
            Some(t) => format!("{n} {t:.1}s"),
            None => format!("{n} never"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A JSON object of a checker's details; absent fields read as 0 or empty.
struct Fields<'a>(&'a serde_json::Value);

impl Fields<'_> {
    fn n(&self, k: &str) -> u64 {
        self.0.get(k).and_then(|x| x.as_u64()).unwrap_or(0)
    }

    fn x(&self, k: &str) -> f64 {
        self.0.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0)
    }

    fn t(&self, k: &str) -> &str {
        self.0.get(k).and_then(|x| x.as_str()).unwrap_or("")
    }

    /// An array of strings, space-separated.
    fn list(&self, k: &str) -> String {
        self.0
            .get(k)
            .and_then(|x| x.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    }
}

/// The checker's notes (at most 10), under `heading`, if it has any.
fn checker_notes(s: &mut String, details: &serde_json::Value, heading: &str) {
    let Some(notes) = details.get("notes").and_then(|n| n.as_array()) else {
        return;
    };
    if notes.is_empty() {
        return;
    }
    let _ = writeln!(s, "{heading}");
    for n in notes.iter().take(10) {
        let _ = writeln!(s, "- {}", n.as_str().unwrap_or(""));
    }
    if notes.len() > 10 {
        let _ = writeln!(s, "- ({} more in verdict.json)", notes.len() - 10);
    }
}

fn markdown(
    history: &History,
    v: &Verdict,
    steps: &[Step],
    opts: &RunOptions,
    png_error: Option<&str>,
) -> String {
    let mut s = String::new();
    let meta = history.meta.as_ref();
    let _ = writeln!(s, "# flock-jepsen run: {}\n", yes_no(v.valid));
    let _ = writeln!(
        s,
        "- seed **{}**, started {}, workload {} ({} reads), nemeses: {}",
        v.seed,
        meta.map(|m| m.started.as_str()).unwrap_or("?"),
        meta.map(|m| m.workload.as_str()).unwrap_or("?"),
        meta.map(|m| m.read_mode.as_str()).unwrap_or("?"),
        meta.map(|m| m.nemeses.join(", ")).unwrap_or_default()
    );
    let _ = writeln!(s, "- repeat: `{}`", opts.command_line);
    let _ = writeln!(
        s,
        "- nodes: {}; {}{}{}{}{}\n",
        meta.map(|m| m.nodes.join(" ")).unwrap_or_default(),
        if opts.workloads.register {
            format!(
                "register: {} clients, about {} ops/s, key prefix `{}`",
                opts.concurrency, opts.rate, opts.register.prefix
            )
        } else {
            String::new()
        },
        match &opts.workloads.dataset {
            Some(d) => format!(
                "{}datasets: {} writers, a fresh dataset after {} acknowledged writes, moves with probability {}, files up to {} KiB",
                if opts.workloads.register { "; " } else { "" },
                d.writers,
                d.writes_per_dataset,
                d.move_probability,
                d.max_file_bytes >> 10
            ),
            None => String::new(),
        },
        match &opts.workloads.app {
            Some(a) => format!(
                "{}apps: {} ({} stateful), a deploy moving one or two of them about every {:.0}s, every node polled every {} ms",
                if opts.workloads.register || opts.workloads.dataset.is_some() { "; " } else { "" },
                a.apps,
                a.apps.div_ceil(2),
                a.deploy_interval.as_secs_f64(),
                a.poll_interval.as_millis()
            ),
            None => String::new(),
        },
        match &opts.workloads.moves {
            Some(m) => format!(
                "{}move: {} test app(s), {} appending clients ({}, about {} appends/s), a move about every {:.0}s, cancelled with probability {}",
                if opts.workloads.register
                    || opts.workloads.dataset.is_some()
                    || opts.workloads.app.is_some()
                {
                    "; "
                } else {
                    ""
                },
                m.apps,
                m.clients,
                m.via.as_str(),
                m.rate,
                m.move_interval.as_secs_f64(),
                m.cancel_probability
            ),
            None => String::new(),
        },
        match &opts.workloads.failover {
            Some(m) => format!(
                "failover: {} test app(s) with {} replicas and a snapshot every {} ms, {} appending clients ({}, about {} appends/s), no moves",
                m.apps,
                m.replication.map(|r| r.0).unwrap_or(0),
                m.replication.map(|r| r.1.as_millis()).unwrap_or(0),
                m.clients,
                m.via.as_str(),
                m.rate,
            ),
            None => String::new(),
        }
    );
    let _ = writeln!(s, "## Checks\n");
    for c in &v.checks {
        let _ = writeln!(
            s,
            "- **{}**: {} — {}",
            c.checker,
            yes_no(c.valid),
            c.summary
        );
    }
    let r = &v.recovery;
    let _ = writeln!(
        s,
        "- **recovery** (write + linearizable read on every node within {:.0}s of the heal): {} — {}",
        r.bound_s,
        if r.ok { "VALID" } else { "INVALID" },
        after_heal(&r.nodes)
    );
    let c = &v.convergence;
    let _ = writeln!(
        s,
        "- **convergence** (every replica equal to the final reads within {:.0}s): {} — {}\n",
        c.bound_s,
        if c.ok { "VALID" } else { "INVALID" },
        match c.converged_after_s {
            Some(t) => format!("{} keys, equal after {t:.1}s", c.keys),
            None => c.differences.join("; "),
        }
    );
    if let Some(d) = &v.datasets {
        let _ = writeln!(
            s,
            "- **dataset recovery** (a write and a snapshot on every dataset within {:.0}s of the heal): {} — {}",
            d.recovery_bound_s,
            if d.recovered.values().all(Option::is_some) { "VALID" } else { "INVALID" },
            after_heal(&d.recovered)
        );
        let _ = writeln!(
            s,
            "- **dataset holders settle** (no move left, every holder ready with the newest snapshot, within {:.0}s; then every disk read): {} — {}; disks read: {}\n",
            d.settle_bound_s,
            if d.settled_after_s.is_some() && d.disks_read.values().all(|r| *r) {
                "VALID"
            } else {
                "INVALID"
            },
            match d.settled_after_s {
                Some(t) => format!("settled after {t:.1}s"),
                None => d.unsettled.join("; "),
            },
            d.disks_read
                .iter()
                .map(|(n, ok)| format!("{n} {}", if *ok { "ok" } else { "FAILED" }))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    if let Some(a) = &v.apps {
        let _ = writeln!(
            s,
            "- **apps after the heal** (every app of the final configuration running once, on its node, and nowhere else, within {:.0}s): {} — {}\n",
            a.bound_s,
            if a.ok { "VALID" } else { "INVALID" },
            match a.converged_after_s {
                Some(t) => format!(
                    "after {t:.1}s (generation {})",
                    a.final_generation.unwrap_or(0)
                ),
                None => a.unconverged.join("; "),
            }
        );
    }

    if let Some(m) = &v.moves {
        let _ = writeln!(
            s,
            "- **move workload after the heal** (each app running in one place, its log read, within {:.0}s): {} — {}\n",
            m.bound_s,
            if m.ok { "VALID" } else { "INVALID" },
            if m.ok {
                m.read_after_s
                    .iter()
                    .map(|(a, t)| {
                        format!(
                            "{a} on {} after {:.1}s",
                            m.final_node.get(a).map(String::as_str).unwrap_or("?"),
                            t.unwrap_or(0.0)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                m.problems.join("; ")
            }
        );
    }

    if let Some(m) = &v.failover {
        let _ = writeln!(
            s,
            "- **failover workload after the heal** (each app running in one place, its log read, within {:.0}s): {} — {}\n",
            m.bound_s,
            if m.ok { "VALID" } else { "INVALID" },
            if m.ok {
                m.read_after_s
                    .iter()
                    .map(|(a, t)| {
                        format!(
                            "{a} on {} after {:.1}s",
                            m.final_node.get(a).map(String::as_str).unwrap_or("?"),
                            t.unwrap_or(0.0)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                m.problems.join("; ")
            }
        );
    }
    if let Some(check) = v.checks.iter().find(|c| c.checker == "failover") {
        let _ = writeln!(
            s,
            "Failovers (the fault before each, when it was declared, the snapshot it started from and the appends it lost, the first append the new primary acknowledged; the rule: jepsen/README.md):\n"
        );
        for line in crate::checker::failover::describe_failovers(&check.details) {
            let _ = writeln!(s, "- {line}");
        }
        let _ = writeln!(s);
    }

    let st = &v.stats;
    let _ = writeln!(s, "## Figures (workload phase, {:.0}s)\n", st.duration_s);
    let _ = writeln!(
        s,
        "| ops | total | ok | fail | unknown |\n|---|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        s,
        "| all | {} | {} | {} | {} |",
        st.all.total, st.all.ok, st.all.fail, st.all.unknown
    );
    for (f, c) in st.by_f.iter().chain(st.by_node.iter()) {
        let _ = writeln!(
            s,
            "| {f} | {} | {} | {} | {} |",
            c.total, c.ok, c.fail, c.unknown
        );
    }
    let _ = writeln!(
        s,
        "\n- latency of ok ops: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        st.latency.p50_ms, st.latency.p99_ms, st.latency.max_ms
    );
    for (what, g) in [
        ("no op succeeded", &st.longest_unavailable),
        ("no write succeeded", &st.longest_without_write),
    ] {
        let _ = writeln!(
            s,
            "- longest time {what}: **{:.2}s** ({:.1}s to {:.1}s{})",
            g.seconds,
            g.from_s,
            g.to_s,
            if g.during.is_empty() {
                String::new()
            } else {
                format!(", during {}", g.during.join(", "))
            }
        );
    }
    if !st.by_fault.is_empty() {
        let _ = writeln!(
            s,
            "\nLongest time without any ok op, per fault (from its start to 5 s after its end):\n\n\
             | fault | count | median | max |\n|---|---:|---:|---:|"
        );
        for (kind, f) in &st.by_fault {
            let _ = writeln!(
                s,
                "| {kind} | {} | {:.2}s | {:.2}s |",
                f.count, f.median_gap_s, f.max_gap_s
            );
        }
    }
    if v.datasets.is_some() {
        datasets_section(&mut s, history, v);
    }
    if v.apps.is_some() {
        apps_section(&mut s, history, v);
    }
    if v.moves.is_some() {
        moves_section(&mut s, history, v);
    }
    let _ = writeln!(s, "\n## Timeline\n");
    match png_error {
        None => {
            let _ = writeln!(
                s,
                "![timeline](timeline.png)\n\nTop: latency of each op (green ok, grey a compare-and-set \
                 that found another value, red fail, orange unknown, drawn when the client gave up). \
                 Bottom: ok ops per second, and failed or unknown ones. Shaded: faults."
            );
        }
        Some(e) => {
            let _ = writeln!(s, "(no timeline: {e})");
        }
    }

    let _ = writeln!(
        s,
        "\n## Faults\n\n| start | stop | fault | detail |\n|---:|---:|---|---|"
    );
    for f in history.fault_intervals() {
        let _ = writeln!(
            s,
            "| {:.1}s | {:.1}s | {} | {} |",
            f.start_ns as f64 / 1e9,
            f.stop_ns as f64 / 1e9,
            f.fault,
            f.detail
        );
    }
    let _ = writeln!(
        s,
        "\nThe seed's schedule (leader-targeted faults pick the leader when they start):\n\n```"
    );
    for line in describe_plan(steps) {
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(s, "```");

    for c in &v.checks {
        let Some(anomalies) = c.details.get("anomalies").and_then(|a| a.as_array()) else {
            continue;
        };
        if anomalies.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n## Anomalies ({})\n", c.checker);
        for a in anomalies.iter().take(10) {
            let text = a.get("explanation").and_then(|e| e.as_str()).unwrap_or("");
            let _ = writeln!(s, "```\n{text}```\n");
        }
        if anomalies.len() > 10 {
            let _ = writeln!(s, "({} more in verdict.json)", anomalies.len() - 10);
        }
    }
    // Unknown outcomes, the cases a reader most often asks about.
    let unknown: Vec<String> = history
        .ops
        .iter()
        .filter(|o| o.outcome == Outcome::Unknown)
        .take(5)
        .map(describe)
        .collect();
    if !unknown.is_empty() {
        let _ = writeln!(s, "\n## First unknown outcomes\n\n```");
        for u in unknown {
            let _ = writeln!(s, "{u}");
        }
        let _ = writeln!(s, "```");
    }
    s
}

/// The dataset workload's figures: per dataset, latencies of its calls, the longest time without
/// a snapshot, and the checker's notes.
fn datasets_section(s: &mut String, history: &History, v: &Verdict) {
    let Some(check) = v.checks.iter().find(|c| c.checker == "datasets") else {
        return;
    };
    let d = &check.details;
    let _ = writeln!(
        s,
        "\n## Datasets\n\nPer dataset (writes and snapshots include the round after the heal; \
         fenced: acknowledged writes no move could overtake, see jepsen/README.md):\n\n\
         | dataset | writes ok/fail/unknown | fenced | MiB ok | snapshots ok/fail/unknown | recorded | moves ok/fail/unknown | committed | final primary | holders | copies read | file checks |\n\
         |---|---|---:|---:|---|---:|---|---:|---|---|---:|---:|"
    );
    if let Some(m) = d.get("datasets").and_then(|m| m.as_object()) {
        for (name, f) in m {
            let f = Fields(f);
            let _ = writeln!(
                s,
                "| {name} | {}/{}/{} | {} | {:.1} | {}/{}/{} | {} | {}/{}/{} | {} | {} | {} | {} | {} |",
                f.n("writes_ok"),
                f.n("writes_fail"),
                f.n("writes_unknown"),
                f.n("writes_fenced"),
                f.n("bytes_ok") as f64 / 1048576.0,
                f.n("snapshots_ok"),
                f.n("snapshots_fail"),
                f.n("snapshots_unknown"),
                f.n("recorded"),
                f.n("moves_ok"),
                f.n("moves_fail"),
                f.n("moves_unknown"),
                f.n("moves_committed"),
                f.t("final_primary"),
                f.list("final_holders"),
                f.n("copies_read"),
                f.n("files_checked"),
            );
        }
    }
    // Latencies of the dataset calls during the workload.
    let end = v.stats.duration_s;
    let _ = write!(
        s,
        "\nLatency of ok dataset calls (workload phase):\n\n{}",
        latencies(history, end, |o| o.call.is_dataset())
    );
    // The longest time a dataset took no snapshot while its writer was asking for them: between
    // two acknowledged snapshots, or from the last one to the last attempt, in the workload
    // phase (a writer that moved on to a fresh dataset asks no more).
    let end_ns = (end * 1e9) as u64;
    let mut worst: Option<(f64, String, f64, f64)> = None;
    let mut per: BTreeMap<&str, Vec<(u64, bool)>> = BTreeMap::new();
    for o in history.ops.iter().filter(|o| o.invoke_ns <= end_ns) {
        if let crate::history::Call::DsSnapshot { dataset, .. } = &o.call {
            per.entry(dataset.as_str())
                .or_default()
                .push((o.complete_ns, o.outcome == Outcome::Ok));
        }
    }
    for (name, mut ops) in per {
        ops.sort_unstable();
        let mut last_ok: Option<u64> = None;
        for (t, ok) in ops {
            if let Some(from) = last_ok {
                let gap = t.saturating_sub(from) as f64 / 1e9;
                if worst.as_ref().is_none_or(|b| gap > b.0) {
                    worst = Some((gap, name.to_string(), from as f64 / 1e9, t as f64 / 1e9));
                }
            }
            if ok {
                last_ok = Some(t);
            }
        }
    }
    if let Some((gap, name, from, to)) = worst {
        let during: Vec<String> = history
            .fault_intervals()
            .iter()
            .filter(|f| (f.start_ns as f64 / 1e9) < to && (f.stop_ns as f64 / 1e9) > from)
            .map(|f| format!("{} ({})", f.fault, f.detail))
            .collect();
        let shown = during.len().min(4);
        let _ = writeln!(
            s,
            "\n- longest time a dataset's writer asked for snapshots and none was acknowledged: **{gap:.2}s** ({name}, {from:.1}s to {to:.1}s{}{})",
            if during.is_empty() {
                String::new()
            } else {
                format!(", during {}", during[..shown].join(", "))
            },
            if during.len() > shown {
                format!(" and {} more faults", during.len() - shown)
            } else {
                String::new()
            }
        );
    }
    checker_notes(s, d, "\nChecker notes (no violation):\n");
}

/// Latency percentiles (p50, p99, max, in ms) of the ok ops that `pick` selects, invoked in the
/// workload phase (`end_s`), by function.
fn latencies(history: &History, end_s: f64, pick: impl Fn(&Op) -> bool) -> String {
    let mut s = String::from("| call | ok | p50 | p99 | max |\n|---|---:|---:|---:|---:|\n");
    let mut by_f: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for o in history
        .ops
        .iter()
        .filter(|o| pick(o) && o.outcome == Outcome::Ok && (o.invoke_ns as f64 / 1e9) <= end_s)
    {
        by_f.entry(o.call.f())
            .or_default()
            .push(o.latency_ns() as f64 / 1e6);
    }
    for (f, mut l) in by_f {
        l.sort_by(f64::total_cmp);
        let p = |q: f64| l[(((l.len() - 1) as f64) * q).round() as usize];
        let _ = writeln!(
            s,
            "| {f} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            l.len(),
            p(0.5),
            p(0.99),
            p(1.0)
        );
    }
    s
}

/// The app workload's figures: per app, moves asked, instances seen, the intervals in which one
/// instance provably ran, the longest time no node was seen running it; the calls' latencies.
fn apps_section(s: &mut String, history: &History, v: &Verdict) {
    let Some(check) = v.checks.iter().find(|c| c.checker == "apps") else {
        return;
    };
    let d = &check.details;
    let fd = Fields(d);
    let _ = writeln!(
        s,
        "\n## Apps\n\n- deploys ok/fail/unknown: {}/{}/{}; LocalApps polls ok/failed: {}/{}; AppList reads ok/failed: {}/{}\n\
         - the running-twice claim covers {} intervals in which one instance of a stateful app provably ran ({:.0} s in all)\n",
        fd.n("deploys_ok"),
        fd.n("deploys_fail"),
        fd.n("deploys_unknown"),
        fd.n("polls_ok"),
        fd.n("polls_fail"),
        fd.n("lists_ok"),
        fd.n("lists_fail"),
        fd.n("stateful_runs"),
        fd.x("stateful_run_seconds"),
    );
    let _ = writeln!(
        s,
        "Per app (intervals: in which one instance provably ran, see jepsen/README.md; overlaps: \
         instances on two nodes seen running at once, a violation for a stateful app):\n\n\
         | app | stateful | moves asked | seen running | instances | nodes | intervals | interval s | overlaps | longest unseen | final node | final state |\n\
         |---|---|---:|---:|---:|---|---:|---:|---:|---:|---|---|"
    );
    if let Some(m) = d.get("apps").and_then(|m| m.as_object()) {
        for (name, f) in m {
            let stateful = f.get("stateful").and_then(|b| b.as_bool()).unwrap_or(false);
            let f = Fields(f);
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {:.1}s | {} | {} |",
                if stateful { "yes" } else { "no" },
                f.n("moves_asked"),
                f.n("seen_running"),
                f.n("instances"),
                f.list("nodes"),
                f.n("runs"),
                f.x("run_seconds"),
                f.n("overlaps"),
                f.x("longest_unseen_s"),
                f.t("final_node"),
                f.t("final_state"),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nLatency of ok app calls (workload phase):\n\n{}",
        latencies(history, v.stats.duration_s, |o| o.call.is_app())
    );
    checker_notes(s, d, "Checker notes (no violation):\n");
}

/// The move workload's figures: per app, appends, what the final log held, moves and their
/// fates with the downtime around each, acknowledgements per instance.
fn moves_section(s: &mut String, history: &History, v: &Verdict) {
    let Some(check) = v.checks.iter().find(|c| c.checker == "moves") else {
        return;
    };
    let Some(apps) = check.details.get("apps").and_then(|m| m.as_object()) else {
        return;
    };
    let _ = writeln!(s, "\n## Move workload\n");
    for (name, f) in apps {
        let fig = Fields(f);
        let _ = writeln!(
            s,
            "**{name}**: appends ok/fail/unknown {}/{}/{} (unknown ones in the final log: {}, not: {}); final log {} entries, read on {} (instance {}); \
             moves asked ok/refused/unknown {}/{}/{}, of the accepted: {} committed, {} cancelled, {} superseded, {} unresolved; cancels ok/fail/unknown {}/{}/{}; \
             longest time without an acknowledged append {:.2}s ({:.1}s to {:.1}s)\n",
            fig.n("acked"),
            fig.n("failed"),
            fig.n("unknown"),
            fig.n("unknown_present"),
            fig.n("unknown_absent"),
            fig.n("final_entries"),
            fig.t("final_node"),
            fig.t("final_instance"),
            fig.n("moves_ok"),
            fig.n("moves_fail"),
            fig.n("moves_unknown"),
            fig.n("committed"),
            fig.n("cancelled"),
            fig.n("superseded"),
            fig.n("unresolved"),
            fig.n("cancels_ok"),
            fig.n("cancels_fail"),
            fig.n("cancels_unknown"),
            fig.x("longest_gap_s"),
            fig.x("longest_gap_from_s"),
            fig.x("longest_gap_to_s"),
        );
        let _ = writeln!(
            s,
            "Accepted moves (handoff: from the last acknowledged append before the first one another instance took after the move (direct: on the target) to that one, and when; downtime: the longest time without an acknowledged append from the move to the next move or cancel, with the faults during it):\n\n\
             | asked at | from | to | fate | handoff | at | downtime | from | to | faults during it |\n|---:|---|---|---|---:|---:|---:|---:|---:|---|"
        );
        for m in f
            .get("moves")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
        {
            let mv = Fields(m);
            let opt = |k: &str, unit: &str, digits: usize| {
                m.get(k)
                    .and_then(|x| x.as_f64())
                    .map(|v| format!("{v:.digits$}{unit}"))
                    .unwrap_or_else(|| "-".into())
            };
            let _ = writeln!(
                s,
                "| {:.1}s | {} | {} | {} | {} | {} | {:.2}s | {:.1}s | {:.1}s | {} |",
                mv.x("at_s"),
                mv.t("from"),
                mv.t("to"),
                mv.t("fate"),
                opt("handoff_s", "s", 2),
                opt("handoff_at_s", "s", 1),
                mv.x("gap_s"),
                mv.x("gap_from_s"),
                mv.x("gap_to_s"),
                mv.t("faults")
            );
        }
        let _ = writeln!(
            s,
            "\nAcknowledgements per instance (process) of the app:\n\n| instance | through | acks | seqs | first | last |\n|---|---|---:|---|---:|---:|"
        );
        for i in f
            .get("instances")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
        {
            let seqs = i
                .get("seqs")
                .and_then(|x| x.as_array())
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_u64().unwrap_or(0).to_string())
                        .collect::<Vec<_>>()
                        .join("..")
                })
                .unwrap_or_default();
            let i = Fields(i);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1}s | {:.1}s |",
                i.t("instance"),
                i.list("nodes"),
                i.n("acks"),
                seqs,
                i.x("first_s"),
                i.x("last_s"),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nLatency of ok move-workload calls (workload phase):\n\n{}",
        latencies(history, v.stats.duration_s, |o| o.call.is_move())
    );
}

/// How an op is drawn: a compare-and-set that found another value is an answer, not an error.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Ok,
    NotApplied,
    Fail,
    Unknown,
}

impl Class {
    fn of(op: &Op) -> Class {
        let not_applied = op
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with(CAS_NOT_APPLIED));
        match op.outcome {
            Outcome::Ok => Class::Ok,
            Outcome::Unknown => Class::Unknown,
            Outcome::Fail if not_applied => Class::NotApplied,
            Outcome::Fail => Class::Fail,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::NotApplied => "cas not applied",
            Class::Fail => "fail",
            Class::Unknown => "unknown",
        }
    }
}

/// Colours of fault kinds, in the order they first appear.
fn fault_colors(history: &History) -> BTreeMap<String, RGBColor> {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(230, 85, 13),
        RGBColor(49, 130, 189),
        RGBColor(117, 107, 177),
        RGBColor(158, 154, 200),
        RGBColor(253, 174, 107),
        RGBColor(116, 196, 118),
        RGBColor(222, 45, 38),
        RGBColor(99, 99, 99),
    ];
    let mut m = BTreeMap::new();
    for f in history.fault_intervals() {
        let n = m.len();
        m.entry(f.fault).or_insert(PALETTE[n % PALETTE.len()]);
    }
    m
}

fn timeline(path: &Path, history: &History, workload_end_ns: u64) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let text = font();
    let root = BitMapBackend::new(path, (1800, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (upper, lower) = root.split_vertically(620);
    let end_s = (history.end_ns().max(workload_end_ns) as f64 / 1e9).max(1.0);
    latency_chart(&upper, history, end_s, text).map_err(|e| err(&e))?;
    throughput_chart(&lower, history, end_s, text).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn latency_chart(
    area: &DrawingArea<BitMapBackend, Shift>,
    history: &History,
    end_s: f64,
    text: bool,
) -> DrawResult {
    let max_ms = history
        .ops
        .iter()
        .map(|o| o.latency_ns() as f64 / 1e6)
        .fold(10.0f64, f64::max)
        * 1.5;
    let mut b = ChartBuilder::on(area);
    b.margin(15);
    if text {
        b.caption("latency of each op (ms, log scale)", ("sans-serif", 22))
            .x_label_area_size(35)
            .y_label_area_size(70);
    }
    let mut chart = b.build_cartesian_2d(0f64..end_s, (0.1f64..max_ms).log_scale())?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("seconds since start").y_desc("ms");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    let colors = fault_colors(history);
    chart.draw_series(history.fault_intervals().into_iter().map(|f| {
        let c = colors
            .get(&f.fault)
            .copied()
            .unwrap_or(RGBColor(128, 128, 128));
        Rectangle::new(
            [
                (f.start_ns as f64 / 1e9, 0.1),
                (f.stop_ns as f64 / 1e9, max_ms),
            ],
            c.mix(0.18).filled(),
        )
    }))?;
    // Errors last, so that they show on top of the many ok ops.
    for (class, color) in [
        (Class::NotApplied, RGBColor(170, 170, 170)),
        (Class::Ok, RGBColor(44, 160, 44)),
        (Class::Fail, RGBColor(214, 39, 40)),
        (Class::Unknown, RGBColor(255, 127, 14)),
    ] {
        let series = chart.draw_series(
            history
                .ops
                .iter()
                .filter(|o| Class::of(o) == class)
                .map(|o| {
                    let y = (o.latency_ns() as f64 / 1e6).max(0.1);
                    Circle::new((o.complete_ns as f64 / 1e9, y), 2, color.mix(0.6).filled())
                }),
        )?;
        if text {
            series
                .label(class.label())
                .legend(move |(x, y)| Circle::new((x, y), 4, color.filled()));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    Ok(())
}

fn throughput_chart(
    area: &DrawingArea<BitMapBackend, Shift>,
    history: &History,
    end_s: f64,
    text: bool,
) -> DrawResult {
    let buckets = end_s.ceil() as usize + 1;
    let mut ok = vec![0u32; buckets];
    let mut bad = vec![0u32; buckets];
    for o in &history.ops {
        let i = ((o.complete_ns as f64 / 1e9) as usize).min(buckets - 1);
        match Class::of(o) {
            Class::Ok => ok[i] += 1,
            Class::NotApplied => {}
            Class::Fail | Class::Unknown => bad[i] += 1,
        }
    }
    let max = ok
        .iter()
        .chain(bad.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.2;
    let mut b = ChartBuilder::on(area);
    b.margin(15);
    if text {
        b.caption(
            "ops per second: ok (green), failed or unknown (red); shaded: faults",
            ("sans-serif", 22),
        )
        .x_label_area_size(35)
        .y_label_area_size(70);
    }
    let mut chart = b.build_cartesian_2d(0f64..end_s, 0f64..max)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("seconds since start").y_desc("ops/s");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    let colors = fault_colors(history);
    for (fault, color) in &colors {
        let color = *color;
        let series = chart.draw_series(
            history
                .fault_intervals()
                .into_iter()
                .filter(|f| &f.fault == fault)
                .map(|f| {
                    Rectangle::new(
                        [
                            (f.start_ns as f64 / 1e9, 0.0),
                            (f.stop_ns as f64 / 1e9, max),
                        ],
                        color.mix(0.18).filled(),
                    )
                }),
        )?;
        if text {
            series.label(fault.as_str()).legend(move |(x, y)| {
                Rectangle::new([(x - 6, y - 6), (x + 6, y + 6)], color.mix(0.5).filled())
            });
        }
    }
    chart.draw_series(LineSeries::new(
        ok.iter()
            .enumerate()
            .map(|(i, n)| (i as f64 + 0.5, *n as f64)),
        RGBColor(44, 160, 44).stroke_width(2),
    ))?;
    chart.draw_series(LineSeries::new(
        bad.iter()
            .enumerate()
            .map(|(i, n)| (i as f64 + 0.5, *n as f64)),
        RGBColor(214, 39, 40).stroke_width(1),
    ))?;
    if text && !colors.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    Ok(())
}

/// Draws the timeline of a stored history (for `flock-jepsen check`).
pub fn timeline_only(path: &Path, history: &History) -> Result<(), String> {
    timeline(path, history, history.end_ns())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_absent_ones_as_zero_or_empty() {
        let v = serde_json::json!({"n": 3, "x": 1.5, "t": "a", "l": ["n1", "n2"]});
        let f = Fields(&v);
        assert_eq!(
            (f.n("n"), f.x("x"), f.t("t"), f.list("l")),
            (3, 1.5, "a", "n1 n2".into())
        );
        assert_eq!(
            (f.n("?"), f.x("?"), f.t("?"), f.list("?")),
            (0, 0.0, "", String::new())
        );
        let times = [("n1".to_string(), Some(1.25)), ("n2".to_string(), None)].into();
        assert_eq!(after_heal(&times), "n1 1.2s, n2 never");
    }

    #[test]
    fn checker_notes_show_ten_at_most() {
        let mut s = String::new();
        checker_notes(&mut s, &serde_json::json!({"notes": []}), "Notes:");
        assert_eq!(s, "");
        let notes: Vec<String> = (0..12).map(|i| format!("n{i}")).collect();
        checker_notes(&mut s, &serde_json::json!({ "notes": notes }), "Notes:");
        assert!(s.starts_with("Notes:\n- n0\n"), "{s}");
        assert!(s.ends_with("- n9\n- (2 more in verdict.json)\n"), "{s}");
    }
}
