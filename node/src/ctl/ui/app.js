// flockctl ui: polls /api/state every second and draws the cluster. Hand-written, no
// framework; every text goes in through textContent (nothing the cluster reports is parsed as
// HTML), charts are inline SVG.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids.flat()) {
    if (k === undefined || k === null || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
}

function pill(text, kind) { return el("span", { class: "pill " + kind, text }); }
function sub(text) { return el("div", { class: "sub", text }); }

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = n, i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${u[i]}`;
}

function dur(ms) {
  if (ms === null || ms === undefined) return "-";
  if (ms < 1000) return `${Math.round(ms)}ms`;
  const s = Math.round(ms / 1000);
  const two = (a, ua, b, ub) => (b ? `${a}${ua} ${b}${ub}` : `${a}${ua}`);
  if (s < 60) return `${s}s`;
  if (s < 3600) return two(Math.floor(s / 60), "m", s % 60, "s");
  return two(Math.floor(s / 3600), "h", Math.floor((s % 3600) / 60), "m");
}

// The end of an error chain ("...: Connection refused (os error 111)"): the whole one is in
// the element's title.
function shortError(e) {
  const parts = String(e).split(": ");
  return parts.slice(-2).join(": ");
}

function clock(ms) {
  const d = new Date(ms);
  return d.toISOString().replace("T", " ").slice(0, 19) + "Z";
}

function table(head, rows, rowClass) {
  const t = el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => typeof h === "object" ? el("th", { class: "num", text: h.num }) : el("th", { text: h })))));
  const body = el("tbody");
  rows.forEach((r, i) => {
    body.append(el("tr", { class: rowClass ? rowClass(i) : null }, r.map((c) => {
      if (c instanceof Node) return el("td", {}, c);
      if (Array.isArray(c)) return el("td", {}, c);
      if (c && typeof c === "object" && "num" in c) return el("td", { class: "num", text: c.num });
      return el("td", { text: c === undefined || c === null || c === "" ? "-" : c });
    })));
  });
  t.append(body);
  return t;
}

function replace(id, ...kids) {
  const box = document.getElementById(id);
  box.replaceChildren(...kids);
}

function stateKind(s) {
  s = (s || "").toLowerCase();
  if (/^(running|ready|healthy|leader|follower|done|primary)/.test(s)) return "ok";
  if (/(fail|error|down|unreach|crash|exited|diverged|not answering)/.test(s)) return "bad";
  if (/(drain|wait|start|stop|mov|pending|retry|unknown|hold|handoff|degraded)/.test(s)) return "warn";
  return "info";
}

// --- charts ---------------------------------------------------------------------------------

function chart(title, ts, values, fmt, note, now) {
  const W = 300, H = 64;
  const box = el("div", { class: "chart" });
  let last = null;
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null && values[i] !== undefined) { last = values[i]; break; }
  box.append(el("div", { class: "title", text: title }));
  box.append(el("div", { class: "value", text: last === null ? "-" : fmt(last) }));
  const first = ts.length ? ts[0] : now;
  const span = Math.max(60000, now - first);
  const max = Math.max(1e-9, ...values.filter((v) => v !== null && v !== undefined));
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": title });
  g.append(svg("line", { class: "axis", x1: 0, y1: H - 0.5, x2: W, y2: H - 0.5 }));
  // One polyline per run of known values: an unknown value breaks the line.
  let run = [];
  const flush = () => {
    if (run.length > 1) {
      const pts = run.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
      g.append(svg("polygon", { class: "area", points: `${run[0][0].toFixed(1)},${H} ${pts} ${run[run.length - 1][0].toFixed(1)},${H}` }));
      g.append(svg("polyline", { class: "line", points: pts }));
    }
    run = [];
  };
  ts.forEach((t, i) => {
    const v = values[i];
    if (v === null || v === undefined) { flush(); return; }
    const x = W - ((now - t) / span) * W;
    const y = H - 2 - (v / max) * (H - 6);
    run.push([x, y]);
  });
  flush();
  box.append(g);
  box.append(el("div", { class: "note", text: `peak ${fmt(max === 1e-9 ? 0 : max)} · last ${dur(span)}${note ? " · " + note : ""}` }));
  return box;
}

function drawCharts(s) {
  const se = s.series || { t: [] };
  const now = s.now_ms;
  // flockd's write-latency histogram when it reports one; else what this page measures.
  const measured = (se.latency_source || "").startsWith("round trip");
  const charts = [
    chart("Raft throughput", se.t, se.entries_per_s || [], (v) => `${v.toFixed(1)} entries/s`, "", now),
    chart("Data pushed", se.t, se.push_bytes_per_s || [], (v) => `${bytes(Math.round(v))}/s`, "", now),
    chart("Replica lag (max)", se.t, se.replica_lag_s || [], (v) => `${v.toFixed(1)} s`, "", now),
    measured ? chart("API round trip", se.t, se.latency_ms || [], (v) => `${v.toFixed(1)} ms`, "status call, measured here", now)
      : chart("Write latency", se.t, se.latency_ms || [], (v) => `${v.toFixed(1)} ms`, `mean of ${(se.latency_source || "").split(":")[0]}`, now),
  ];
  charts[3].setAttribute("title", se.latency_source || "");
  replace("charts", ...charts);
}

// --- sections -------------------------------------------------------------------------------

function drawNodes(s) {
  const nodes = s.nodes || [];
  if (!nodes.length) { replace("nodes", el("div", { class: "empty", text: "no nodes known yet" })); return; }
  const rows = nodes.map((n) => {
    const own = n.own || {};
    let health;
    if (n.answering === false) {
      health = [pill("not answering", "bad"),
        sub(n.last_seen_ms ? `last seen ${dur(s.now_ms - n.last_seen_ms)} ago` : "never seen by this page"),
        n.error ? el("div", { class: "err", title: n.error, text: shortError(n.error) }) : null];
    } else {
      health = [pill(n.health || "unknown", stateKind(n.health)),
        sub(n.probe_ms !== undefined ? `answered in ${n.probe_ms} ms` : "")];
    }
    const state = n.state ? pill(n.state, stateKind(n.state)) : pill("-", "off");
    const cap = [
      n.memory ? `${bytes(n.memory)} RAM` : null,
      n.cpus ? `${n.cpus} CPU` : null,
      n.docker === true ? "docker" : n.docker === false ? "no docker" : null,
    ].filter(Boolean).join(" · ") || "not reported";
    const reserved = [];
    if (n.reserved_memory !== null && n.reserved_memory !== undefined) reserved.push(`${bytes(n.reserved_memory)} RAM`);
    if (n.reserved_cpus !== null && n.reserved_cpus !== undefined) reserved.push(`${n.reserved_cpus} CPU`);
    const apps = n.apps || [];
    const labels = Object.entries(n.labels || {}).map(([k, v]) => el("span", { class: "label", text: `${k}=${v}` }));
    const raft = [
      el("div", { text: `${own.raft_state || "?"} · ${n.role || "?"}` }),
      sub(`commit ${own.commit_index ?? "-"} · applied ${own.applied_index ?? "-"}${n.lag !== null && n.lag !== undefined ? " · lag " + n.lag : ""}`),
    ];
    return [
      [el("div", {}, el("b", { text: n.name }), " ", n.leader ? pill("leader", "info") : null), sub(n.addr)],
      health, state, raft, cap,
      [el("div", { text: reserved.length ? reserved.join(" · ") : `${apps.length} app${apps.length === 1 ? "" : "s"}` }),
        sub(apps.join(", "))],
      labels.length ? labels : "-",
    ];
  });
  replace("nodes", table(["Node", "Health", "State", "Raft", "Capacity", "Reserved / apps", "Labels"], rows,
    (i) => nodes[i].answering === false ? "dead" : null));
}

function drawApps(s) {
  const apps = s.apps || [];
  if (s.errors && s.errors.apps) { replace("apps", el("div", { class: "empty err", text: `apps: ${s.errors.apps}` })); return; }
  if (!apps.length) { replace("apps", el("div", { class: "empty", text: "no apps deployed" })); return; }
  const rows = apps.map((a) => [
    [el("b", { text: a.name }), a.stack ? sub(`stack ${a.stack}`) : null],
    [el("div", { text: (a.instance_nodes || []).length > 1 ? a.instance_nodes.join(", ") : (a.node || "-") }),
      a.moving_to ? sub(`moving to ${a.moving_to}`) : null],
    [pill(a.state || "?", stateKind(a.state)),
      a.instances > 1 ? sub(`${a.instances_running} of ${a.instances} instances running`) : null,
      a.detail ? sub(a.detail) : null],
    a.health ? pill(a.health, stateKind(a.health)) : "-",
    { num: String(a.restarts ?? 0) },
    [...(a.endpoints || []).map((e) => el("div", { class: "mono", text: e })),
      (a.ports || []).length ? sub(`ports ${a.ports.join(", ")}`) : null,
      ...(a.mesh_problems || []).map((p) => el("div", { class: "err", text: p }))],
    a.dataset || "-",
    [el("div", { text: a.runs || "-" }), sub(a.driver || "")],
  ]);
  replace("apps", table(["App", "Node", "State", "Health", { num: "Restarts" }, "Endpoints", "Dataset", "Runs"], rows));
}

function drawDatasets(s) {
  const ds = s.datasets || [];
  if (s.errors && s.errors.datasets) { replace("datasets", el("div", { class: "empty err", text: `datasets: ${s.errors.datasets}` })); return; }
  if (!ds.length) { replace("datasets", el("div", { class: "empty", text: "no datasets" })); return; }
  const rows = ds.map((d) => {
    const replicas = (d.replicas || []).map((r) => el("div", {},
      el("span", { text: r.node }), " ",
      r.lag_ms !== null && r.lag_ms !== undefined ? pill(`lag ${dur(r.lag_ms)}`, r.lag_ms > 2 * (d.snapshot_interval_ms || 60000) ? "warn" : "ok") : pill("no base yet", "warn")));
    const bad = (d.holders || []).filter((h) => h.state && h.state !== "ready");
    return [
      [el("b", { text: d.name }), d.hold ? sub(`held: ${d.hold}`) : null],
      [el("div", { text: d.primary || "-" }), sub(`epoch ${d.epoch}`), d.moving_to ? pill(`moving to ${d.moving_to}`, "warn") : null],
      replicas.length ? [...replicas, sub(d.replicas_wanted ? `${d.replicas_wanted} wanted, snapshot every ${dur(d.snapshot_interval_ms)}` : "none wanted (kept by a move)")] :
        (d.replicas_wanted ? [pill(`wants ${d.replicas_wanted}`, "warn")] : "none"),
      [el("div", { text: String(d.snapshots) }), d.newest_snapshot ? sub(`newest ${d.newest_snapshot}`) : null],
      [el("div", { text: `${bytes(d.used_bytes)} used` }), sub(d.size_limit ? `limit ${bytes(d.size_limit)}` : "no limit"),
        d.size_limit && d.used_bytes > d.size_limit ? pill("over its limit", "bad") : null],
      bad.length ? bad.map((h) => el("div", {}, el("span", { text: `${h.node}: ` }), pill(h.state, stateKind(h.state)), h.error ? el("div", { class: "err", text: h.error }) : null))
        : pill("all copies ready", "ok"),
    ];
  });
  replace("datasets", table(["Dataset", "Primary", "Replicas (lag)", "Snapshots", "Size", "Copies"], rows));
}

function drawMoves(s) {
  const moves = s.moves || [];
  if (!moves.length) { replace("moves", el("div", { class: "empty", text: "no moves or failovers in progress" })); return; }
  const cards = moves.map((m) => {
    const failed = (m.phase || "").startsWith("fail");
    const card = el("div", { class: "move " + m.kind + (m.ended ? " ended" : "") + (failed ? " failed" : "") });
    const named = m.app ? (m.dataset ? `${m.app} (dataset ${m.dataset})` : m.app) : m.dataset;
    const what = m.kind === "replica" ? `replica sync of ${m.dataset}` :
      m.kind === "failover" ? `failover of ${named}` : `move of ${named}`;
    card.append(el("div", { class: "head" },
      el("span", { class: "what", text: what }),
      el("span", { text: m.to ? `${m.from || "?"} → ${m.to}` : `from ${m.from || "?"}` }),
      pill(m.words || m.phase || "?", m.ended ? (failed ? "bad" : "off") : m.kind === "failover" ? "warn" : "info"),
      el("span", { class: "pct", text: m.percent !== null && m.percent !== undefined ? `${m.percent.toFixed(0)}%` : "" })));
    if (m.percent !== null && m.percent !== undefined) {
      const W = 1000;
      card.append(svg("svg", { class: "bar", viewBox: `0 0 ${W} 10`, preserveAspectRatio: "none" },
        svg("rect", { class: "track", x: 0, y: 0, width: W, height: 10, rx: 3 }),
        svg("rect", { class: "fill", x: 0, y: 0, width: (W * Math.min(100, m.percent) / 100).toFixed(1), height: 10, rx: 3 })));
    }
    const facts = [];
    if (m.bytes !== undefined && (m.bytes || m.total)) facts.push(`${bytes(m.bytes)}${m.total ? " of " + bytes(m.total) : ""}`);
    if (m.bytes_per_sec) facts.push(`${bytes(Math.round(m.bytes_per_sec))}/s`);
    if (m.eta_secs !== null && m.eta_secs !== undefined) facts.push(`eta ${dur(m.eta_secs * 1000)}`);
    if (m.attempt > 1) facts.push(`attempt ${m.attempt}`);
    card.append(sub(facts.join(" · ") || m.detail || ""));
    if (m.last_error) card.append(el("div", { class: "err", text: m.last_error }));
    return card;
  });
  replace("moves", ...cards);
}

function drawEvents(s) {
  const ev = s.events || [];
  if (s.errors && s.errors.events && !ev.length) { replace("events", el("div", { class: "empty err", text: `events: ${s.errors.events}` })); return; }
  if (!ev.length) { replace("events", el("div", { class: "empty", text: "no events yet (nodes declared down or back, failovers)" })); return; }
  replace("events", el("div", { class: "events" }, ev.slice(0, 20).map((e) =>
    el("div", {}, el("span", { class: "when", text: e.at_unix_ms ? clock(e.at_unix_ms) : "" }), el("span", { text: e.text || JSON.stringify(e) })))));
}

function drawSummary(s) {
  const c = s.cluster || {};
  const parts = [];
  const add = (k, v) => parts.push(el("span", {}, `${k} `, el("b", { text: v }), "   "));
  if (c.id) add("cluster", c.id.slice(0, 8));
  add("leader", c.leader || "none");
  if (c.term !== undefined) add("term", String(c.term));
  if (c.commit_index !== undefined && c.commit_index !== null) add("commit", String(c.commit_index));
  const n = (s.nodes || []).length, up = (s.nodes || []).filter((x) => x.answering !== false).length;
  add("nodes answering", `${up}/${n}`);
  replace("summary", ...parts);
  const banner = document.getElementById("banner");
  const warnings = (c.warnings || []);
  if (s.reached === false) {
    banner.hidden = false;
    banner.textContent = `No node answers: ${s.unreachable}. ` +
      (s.last_ok_ms ? `What you see is from ${dur(s.now_ms - s.last_ok_ms)} ago.` : "Nothing was read yet.");
  } else if (warnings.length) {
    banner.hidden = false;
    banner.textContent = warnings.join(" · ");
  } else {
    banner.hidden = true;
  }
}

let lastFetch = 0;
function draw(s) {
  if (s.starting) return;
  drawSummary(s); drawCharts(s); drawNodes(s); drawMoves(s); drawApps(s); drawDatasets(s); drawEvents(s);
  document.body.dataset.ready = "true";
}

async function tick() {
  try {
    const r = await fetch("/api/state", { cache: "no-store", credentials: "same-origin" });
    if (r.status === 401 || r.status === 403) {
      const b = document.getElementById("banner");
      b.hidden = false;
      b.textContent = "Not allowed: open the URL flockctl ui printed (with its token) again.";
      return;
    }
    const s = await r.json();
    lastFetch = Date.now();
    draw(s);
  } catch (e) {
    const b = document.getElementById("banner");
    b.hidden = false;
    b.textContent = `flockctl ui does not answer (${e}); is it still running?`;
  }
}

setInterval(() => {
  const u = document.getElementById("updated");
  const ago = Date.now() - lastFetch;
  u.textContent = !lastFetch ? "" : ago < 1500 ? "live" : `updated ${dur(ago)} ago`;
}, 1000);
tick();
setInterval(tick, 1000);
