//! `flockctl ui`: a local, read-only status page of the cluster, served by flockctl with the
//! operator's admin config (the nodes gain no new unauthenticated surface).
//!
//! - A gatherer looks at the cluster every interval: the cluster's status, apps, datasets and
//!   events through any node that answers, and each member's own status and metrics, every
//!   call in parallel with a short timeout, so a node that does not answer is shown as such
//!   (with when it last answered) and never holds the page. It keeps the samples of the last
//!   ten minutes for the charts, and the newest look as one JSON document.
//! - A small HTTP server on loopback serves the page (HTML, JS and CSS embedded from `ui/`)
//!   and that document (`/api/state`, polled by the page every second). It holds admin
//!   credentials, so every request needs the random token flockctl prints (`?token=`, then an
//!   HttpOnly, SameSite=Strict cookie); it never calls anything that changes the cluster, and
//!   never shows a secret, an app's command line or its output.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Args;
use serde_json::{json, Value};
use tonic::transport::Channel;

use flock_client::{connect, ClientConfig};
use flock_proto::v1::api_client::ApiClient;
use flock_proto::v1::*;
use flock_tls::TlsIdentity;

use super::progress;

/// `flockctl ui`'s flags.
#[derive(Args, Debug)]
pub struct UiArgs {
    /// Where to serve the page, HOST:PORT (port 0: any free one). Loopback only, unless
    /// --allow-remote.
    #[arg(long, default_value = "127.0.0.1:7470")]
    pub listen: SocketAddr,
    /// Allow --listen on an address other than loopback. The page reads the cluster with this
    /// admin config: anyone who reaches the address and has the printed URL (its token) sees it.
    #[arg(long)]
    pub allow_remote: bool,
    /// Print the page's address as one JSON object ({"url", "listen", "token"}) instead of a
    /// sentence.
    #[arg(long)]
    pub json: bool,
    /// Milliseconds between two looks at the cluster (the page shows each).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(200..))]
    pub interval_ms: u64,
}

/// How long one call to a node may take before the node counts as not answering.
const CALL_TIMEOUT: Duration = Duration::from_millis(1500);
/// How much history the charts keep.
const HISTORY: Duration = Duration::from_secs(600);
/// How many events the page lists.
const EVENTS_KEPT: usize = 50;

/// Serves the page until interrupted.
pub async fn run(config: &ClientConfig, addr: Option<&str>, args: &UiArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        anyhow::bail!(
            "--listen {}: not a loopback address; the page reads the cluster with your admin \
             config, so anyone reaching it could read the cluster: give --allow-remote to serve \
             it there anyway, or listen on 127.0.0.1",
            args.listen
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
    let local = listener.local_addr()?;
    let token = hex::encode(rand::random::<[u8; 24]>());
    let seeds = match addr {
        Some(a) => vec![a.to_string()],
        None => config.addrs.clone(),
    };
    let shared = Arc::new(Shared {
        token: token.clone(),
        cookie: format!("flock_ui_{}", local.port()),
        check_host: (!args.allow_remote).then_some(local.port()),
        state: Mutex::new(Arc::new(
            json!({"starting": true, "now_ms": unix_ms(SystemTime::now())}).to_string(),
        )),
    });
    let mut gatherer = Gatherer::new(config.identity()?, seeds);
    let interval = Duration::from_millis(args.interval_ms);
    let for_gatherer = shared.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let doc = gatherer.round().await;
            *for_gatherer.state.lock().unwrap_or_else(|e| e.into_inner()) =
                Arc::new(doc.to_string());
        }
    });
    let url = format!("http://{local}/?token={token}");
    if args.json {
        println!(
            "{}",
            json!({"url": url, "listen": local.to_string(), "token": token})
        );
    } else {
        println!("flockctl ui: serving the cluster's status page at {url}");
        println!("flockctl ui: open that URL (its token is the key); Ctrl-C stops it");
    }
    let app = Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
        .route("/style.css", get(style))
        .route("/api/state", get(state))
        .fallback(not_found)
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The HTTP side: the token, the assets, the state document.

/// What the handlers share.
struct Shared {
    token: String,
    /// The cookie's name: with the port, as cookies are shared across a host's ports.
    cookie: String,
    /// On loopback: the port a request's Host must name (with a loopback host), so a page of
    /// another site that resolves its name to 127.0.0.1 (DNS rebinding) is refused.
    check_host: Option<u16>,
    /// The newest look at the cluster, as JSON.
    state: Mutex<Arc<String>>,
}

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// Why a request is refused, if it is.
fn refused(shared: &Shared, headers: &HeaderMap, uri: &Uri) -> Option<Response> {
    if let Some(port) = shared.check_host {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !host_is_loopback(host, port) {
            return Some(plain(
                StatusCode::FORBIDDEN,
                "flockctl ui answers only to a loopback address (127.0.0.1, localhost, [::1])\n",
            ));
        }
    }
    let cookie = cookie_value(headers, &shared.cookie);
    let query = query_token(uri);
    let ok = [cookie, query]
        .into_iter()
        .flatten()
        .any(|t| same_secret(t.as_bytes(), shared.token.as_bytes()));
    if ok {
        None
    } else {
        Some(plain(
            StatusCode::UNAUTHORIZED,
            "flockctl ui: open the URL flockctl ui printed, with its ?token=\n",
        ))
    }
}

/// Whether `host` (a Host header) is a loopback name or address with `port`.
fn host_is_loopback(host: &str, port: u16) -> bool {
    let Some((name, p)) = host.rsplit_once(':') else {
        return false;
    };
    if p.parse::<u16>().ok() != Some(port) {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The value of cookie `name`, if the request carries it.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `token` query parameter, if there is one.
fn query_token(uri: &Uri) -> Option<&str> {
    uri.query()?
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| v)
}

/// Compares two secrets in a time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn plain(code: StatusCode, text: &'static str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

/// A response with the headers every answer carries: not cached, not framed, nothing fetched
/// from anywhere but this server.
fn with_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    r
}

async fn index(State(s): State<Arc<Shared>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(r) = refused(&s, &headers, &uri) {
        return with_headers(r);
    }
    if query_token(&uri).is_some() {
        // Trade the token in the URL for a cookie, and drop it from the address bar.
        let cookie = format!(
            "{}={}; HttpOnly; SameSite=Strict; Path=/",
            s.cookie, s.token
        );
        let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return with_headers(r);
    }
    with_headers(
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            INDEX_HTML,
        )
            .into_response(),
    )
}

async fn script(State(s): State<Arc<Shared>>, headers: HeaderMap, uri: Uri) -> Response {
    with_headers(refused(&s, &headers, &uri).unwrap_or_else(|| {
        (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            APP_JS,
        )
            .into_response()
    }))
}

async fn style(State(s): State<Arc<Shared>>, headers: HeaderMap, uri: Uri) -> Response {
    with_headers(refused(&s, &headers, &uri).unwrap_or_else(|| {
        (
            [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
            STYLE_CSS,
        )
            .into_response()
    }))
}

async fn state(State(s): State<Arc<Shared>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(r) = refused(&s, &headers, &uri) {
        return with_headers(r);
    }
    let doc = s.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
    with_headers(
        (
            [(header::CONTENT_TYPE, "application/json")],
            doc.as_str().to_owned(),
        )
            .into_response(),
    )
}

async fn not_found(State(s): State<Arc<Shared>>, headers: HeaderMap, uri: Uri) -> Response {
    with_headers(
        refused(&s, &headers, &uri).unwrap_or_else(|| plain(StatusCode::NOT_FOUND, "not found\n")),
    )
}

// ---------------------------------------------------------------------------------------------
// Prometheus' text format: a small, tolerant reader (a line it cannot read is skipped).

/// One sample of a metrics text: its name, its labels as written (`a="1",b="2"`), its value.
#[derive(Clone, Debug, PartialEq)]
pub struct PromSample {
    pub name: String,
    pub labels: String,
    pub value: f64,
}

/// The samples of a text in Prometheus' (or OpenMetrics') text format; comments, blank lines
/// and lines it cannot read are skipped.
pub fn parse_prometheus(text: &str) -> Vec<PromSample> {
    text.lines().filter_map(parse_prom_line).collect()
}

fn parse_prom_line(line: &str) -> Option<PromSample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = "";
    if rest.starts_with('{') {
        // The closing brace outside a quoted value (values may hold braces and \").
        let mut in_quote = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in rest.char_indices().skip(1) {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quote => escaped = true,
                '"' => in_quote = !in_quote,
                '}' if !in_quote => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end?;
        labels = &rest[1..end];
        rest = &rest[end + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().ok()?,
    };
    Some(PromSample {
        name: name.to_string(),
        labels: labels.to_string(),
        value,
    })
}

/// Histograms whose mean is the page's write latency, best first: a name holding one of these
/// (and ending in `_seconds`) is taken.
const LATENCY_HINTS: &[&str] = &[
    // flockd's own: from proposing an entry to its commit and apply, on the leader.
    "raft_commit_duration",
    "commit_latency",
    "proposal",
    "propose",
    "write",
    "apply",
];

/// A write-latency histogram in `samples`: its name, and its `_sum` and `_count` totals.
pub fn latency_histogram(samples: &[PromSample]) -> Option<(String, f64, f64)> {
    for hint in LATENCY_HINTS {
        let family = samples.iter().find_map(|s| {
            let base = s.name.strip_suffix("_count")?;
            (base.starts_with("flock_") && base.ends_with("_seconds") && base.contains(hint))
                .then(|| base.to_string())
        });
        if let Some(base) = family {
            let total = |suffix: &str| {
                samples
                    .iter()
                    .filter(|s| s.name == format!("{base}{suffix}"))
                    .map(|s| s.value)
                    .filter(|v| v.is_finite())
                    .sum::<f64>()
            };
            return Some((base.clone(), total("_sum"), total("_count")));
        }
    }
    None
}

/// The sum of the series whose name holds every one of `parts` (a node's reserved memory, if
/// flockd reports it).
fn series_sum(samples: &[PromSample], parts: &[&str]) -> Option<f64> {
    let hits: Vec<f64> = samples
        .iter()
        .filter(|s| parts.iter().all(|p| s.name.contains(p)))
        .map(|s| s.value)
        .collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

// ---------------------------------------------------------------------------------------------
// The gatherer: one look at the cluster per round.

/// A point of the charts.
#[derive(Clone, Debug)]
struct Sample {
    at_ms: u64,
    /// Raft entries committed per second since the previous sample.
    entries_per_s: Option<f64>,
    /// Bytes per second of the dataset pushes running.
    push_bytes_per_s: f64,
    /// The largest replica lag, in seconds.
    replica_lag_s: Option<f64>,
    /// Write latency in ms: a histogram's mean since the previous sample, else the round trip
    /// of the cluster status call (see `latency_source`).
    latency_ms: Option<f64>,
}

/// What the gatherer remembers of a node between rounds.
#[derive(Clone, Debug, Default)]
struct NodeMemory {
    /// When it last answered (unix ms).
    last_seen_ms: Option<u64>,
    /// Its last own status, to show while it does not answer.
    last_status: Option<Value>,
    /// The write-latency histogram's totals at the previous round.
    latency: Option<(f64, f64)>,
}

struct Gatherer {
    tls: TlsIdentity,
    seeds: Vec<String>,
    /// Connections by address; dropped when a call through them fails.
    channels: HashMap<String, ApiClient<Channel>>,
    /// The address that answered the cluster-wide calls last.
    preferred: Option<String>,
    members: Vec<Member>,
    nodes: HashMap<u64, NodeMemory>,
    events: VecDeque<Value>,
    events_next: u64,
    history: VecDeque<Sample>,
    /// The previous commit index, with when it was read.
    prev_commit: Option<(Instant, u64)>,
    latency_source: String,
    /// When the last round that reached the cluster ended (unix ms).
    last_ok_ms: Option<u64>,
    last_doc: Option<Value>,
}

/// Runs a call with the timeout; its reply, or why there is none.
async fn timed<T>(
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no answer within {} ms", CALL_TIMEOUT.as_millis())),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Gatherer {
    fn new(tls: TlsIdentity, seeds: Vec<String>) -> Gatherer {
        Gatherer {
            tls,
            seeds,
            channels: HashMap::new(),
            preferred: None,
            members: Vec::new(),
            nodes: HashMap::new(),
            events: VecDeque::new(),
            events_next: 0,
            history: VecDeque::new(),
            prev_commit: None,
            latency_source: String::new(),
            last_ok_ms: None,
            last_doc: None,
        }
    }

    /// A connection to `addr`, made (with the call timeout) if there is none.
    async fn client(&mut self, addr: &str) -> Result<ApiClient<Channel>, String> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let c = connect(addr, &self.tls, CALL_TIMEOUT)
            .await
            .map_err(|e| format!("{e:#}"))?;
        self.channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// The addresses to try for the cluster-wide calls, best first.
    fn candidates(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let members = self.members.iter().map(|m| m.addr.clone());
        for a in self
            .preferred
            .iter()
            .cloned()
            .chain(self.seeds.iter().cloned())
            .chain(members)
        {
            if !a.is_empty() && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// The cluster's status from the first node that gives it, with the node's connection and
    /// the call's round trip.
    async fn cluster_status(
        &mut self,
    ) -> Result<(ApiClient<Channel>, StatusReply, Duration), String> {
        let mut errors = Vec::new();
        for addr in self.candidates() {
            let mut c = match self.client(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            let started = Instant::now();
            match timed(c.status(StatusRequest { local: false })).await {
                Ok(s) => {
                    self.preferred = Some(addr);
                    return Ok((c, s, started.elapsed()));
                }
                Err(e) => {
                    self.channels.remove(&addr);
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        Err(if errors.is_empty() {
            "the config names no addresses".into()
        } else {
            errors.join("; ")
        })
    }

    /// One look at the cluster: the page's document.
    async fn round(&mut self) -> Value {
        let started = Instant::now();
        let now_ms = unix_ms(SystemTime::now());
        let (api, status, rtt) = match self.cluster_status().await {
            Ok(v) => v,
            Err(e) => return self.unreachable_doc(now_ms, e),
        };
        self.members = status.members.clone();

        // Everything else at once, each with its timeout.
        let (mut a1, mut a2, mut a3) = (api.clone(), api.clone(), api.clone());
        let apps = timed(a1.app_list(AppListRequest::default()));
        let datasets = timed(a2.dataset_list(DatasetListRequest::default()));
        let events = timed(a3.events(EventsRequest {
            after: self.events_next,
        }));
        let mut per_node = Vec::new();
        for m in &self.members {
            let conn = match self.channels.get(&m.addr) {
                Some(c) => Ok(c.clone()),
                None => Err(m.addr.clone()),
            };
            per_node.push((m.id, conn));
        }
        let tls = self.tls.clone();
        let node_calls = per_node.into_iter().map(|(id, conn)| {
            let tls = tls.clone();
            let mut via = api.clone();
            async move {
                let started = Instant::now();
                let client = match conn {
                    Ok(c) => Ok(c),
                    Err(addr) => {
                        tokio::time::timeout(CALL_TIMEOUT, connect(&addr, &tls, CALL_TIMEOUT))
                            .await
                            .map_err(|_| "no answer".to_string())
                            .and_then(|r| r.map_err(|e| format!("{e:#}")))
                    }
                };
                let own = match client {
                    Ok(mut c) => timed(c.status(StatusRequest { local: true }))
                        .await
                        .map(|s| (c, s)),
                    Err(e) => Err(e),
                };
                let own_rtt = started.elapsed();
                let metrics = timed(via.metrics(MetricsRequest { node_id: id })).await;
                (id, own, own_rtt, metrics)
            }
        });
        let (apps, datasets, events, nodes) = tokio::join!(
            apps,
            datasets,
            events,
            futures::future::join_all(node_calls)
        );

        // Each node's own view.
        let mut node_docs: HashMap<u64, Value> = HashMap::new();
        let mut latency_delta = (0.0f64, 0.0f64);
        let mut latency_name = None;
        let mut reserved: HashMap<u64, (Option<f64>, Option<f64>)> = HashMap::new();
        for (id, own, own_rtt, metrics) in nodes {
            let addr = self
                .members
                .iter()
                .find(|m| m.id == id)
                .map(|m| m.addr.clone())
                .unwrap_or_default();
            let memory = self.nodes.entry(id).or_default();
            let mut doc = json!({});
            match own {
                Ok((client, s)) => {
                    memory.last_seen_ms = Some(now_ms);
                    let own_doc = json!({
                        "raft_state": s.state,
                        "term": s.term,
                        "commit_index": s.commit_index,
                        "applied_index": s.applied_index,
                        "last_log_index": s.last_log_index,
                        "leader": s.leader_name,
                        "workers": s.workers.iter().map(|w| json!({
                            "name": w.name, "phase": w.phase, "state": w.state,
                            "detail": w.detail, "last_error": w.last_error,
                        })).collect::<Vec<_>>(),
                        "warnings": s.warnings,
                    });
                    memory.last_status = Some(own_doc.clone());
                    doc["own"] = own_doc;
                    doc["answering"] = json!(true);
                    doc["probe_ms"] = json!(own_rtt.as_millis() as u64);
                    self.channels.insert(addr.clone(), client);
                }
                Err(e) => {
                    self.channels.remove(&addr);
                    doc["own"] = memory.last_status.clone().unwrap_or(Value::Null);
                    doc["answering"] = json!(false);
                    doc["error"] = json!(e);
                }
            }
            let memory = self.nodes.entry(id).or_default();
            doc["last_seen_ms"] = json!(memory.last_seen_ms);
            match metrics {
                Ok(m) => {
                    let samples = parse_prometheus(&m.text);
                    doc["metrics_series"] = json!(samples.len());
                    reserved.insert(
                        id,
                        (
                            series_sum(&samples, &["reserved", "memory"]),
                            series_sum(&samples, &["reserved", "cpu"]),
                        ),
                    );
                    if let Some((name, sum, count)) = latency_histogram(&samples) {
                        if let Some((ps, pc)) = memory.latency {
                            if count > pc && sum >= ps {
                                latency_delta.0 += sum - ps;
                                latency_delta.1 += count - pc;
                            }
                        }
                        memory.latency = Some((sum, count));
                        latency_name = Some(name);
                    }
                }
                Err(e) => doc["metrics_error"] = json!(e),
            }
            node_docs.insert(id, doc);
        }

        let mut errors = serde_json::Map::new();
        let apps = match apps {
            Ok(a) => a.apps,
            Err(e) => {
                errors.insert("apps".into(), json!(e));
                Vec::new()
            }
        };
        let datasets = match datasets {
            Ok(d) => d.datasets,
            Err(e) => {
                errors.insert("datasets".into(), json!(e));
                Vec::new()
            }
        };
        match events {
            Ok(r) => {
                if let Ok(list) = serde_json::from_str::<Vec<Value>>(&r.events_json) {
                    self.events.extend(list);
                    while self.events.len() > EVENTS_KEPT {
                        self.events.pop_front();
                    }
                }
                self.events_next = r.next;
            }
            Err(e) => {
                errors.insert("events".into(), json!(e));
            }
        }

        // The charts' sample.
        let commit = status.commit_index;
        let entries_per_s = match (self.prev_commit, commit) {
            (Some((at, prev)), Some(now)) if now >= prev => {
                let dt = at.elapsed().as_secs_f64();
                (dt > 0.0).then(|| (now - prev) as f64 / dt)
            }
            _ => None,
        };
        if let Some(c) = commit {
            self.prev_commit = Some((Instant::now(), c));
        }
        let push_bytes_per_s: f64 = datasets
            .iter()
            .flat_map(|d| &d.transfers)
            .filter(|t| !phase_ended(&t.phase))
            .map(|t| t.bytes_per_sec)
            .sum();
        let replica_lag_s = datasets
            .iter()
            .flat_map(|d| d.replica_lag_ms.values())
            .max()
            .map(|ms| *ms as f64 / 1000.0);
        let latency_ms = match latency_name {
            Some(name) => {
                self.latency_source = format!("{name}: mean over the last interval");
                (latency_delta.1 > 0.0).then(|| latency_delta.0 / latency_delta.1 * 1000.0)
            }
            None => {
                self.latency_source = "round trip of a cluster status call (through the \
                                       leader), measured by flockctl ui: flockd reports no \
                                       write-latency histogram"
                    .into();
                Some(rtt.as_secs_f64() * 1000.0)
            }
        };
        self.history.push_back(Sample {
            at_ms: now_ms,
            entries_per_s,
            push_bytes_per_s,
            replica_lag_s,
            latency_ms,
        });
        while self
            .history
            .front()
            .is_some_and(|s| now_ms.saturating_sub(s.at_ms) > HISTORY.as_millis() as u64)
        {
            self.history.pop_front();
        }

        let doc = json!({
            "now_ms": now_ms,
            "round_ms": started.elapsed().as_millis() as u64,
            "reached": true,
            "via": self.preferred,
            "cluster": {
                "id": status.cluster_id,
                "reported_by": status.node_name,
                "leader": status.leader_name,
                "leader_addr": status.leader_addr,
                "term": status.term,
                "commit_index": status.commit_index,
                "applied_index": status.applied_index,
                "warnings": status.warnings,
            },
            "nodes": self.members.iter().map(|m| {
                let on_node: Vec<&AppStatus> = apps
                    .iter()
                    .filter(|a| a.node == m.name || a.instance_list.iter().any(|i| i.node == m.name))
                    .collect();
                let (res_mem, res_cpu) = reserved.get(&m.id).cloned().unwrap_or((None, None));
                let mut d = json!({
                    "id": m.id,
                    "name": m.name,
                    "addr": m.addr,
                    "role": m.role,
                    "health": m.health,
                    "state": m.state,
                    "leader": status.leader_id == Some(m.id),
                    "lag": m.lag,
                    "rtt_ms": m.rtt_ms,
                    "labels": m.labels.iter().collect::<BTreeMap<_, _>>(),
                    "memory": m.memory,
                    "cpus": m.cpus,
                    "docker": m.docker,
                    "apps": on_node.iter().map(|a| a.name.clone()).collect::<Vec<_>>(),
                    "reserved_memory": res_mem,
                    "reserved_cpus": res_cpu,
                });
                if let Some(own) = node_docs.remove(&m.id) {
                    if let (Value::Object(d), Value::Object(o)) = (&mut d, own) {
                        d.extend(o);
                    }
                }
                d
            }).collect::<Vec<_>>(),
            "apps": apps.iter().map(app_json).collect::<Vec<_>>(),
            "datasets": datasets.iter().map(dataset_json).collect::<Vec<_>>(),
            "moves": moves_json(&apps, &datasets),
            "events": self.events.iter().rev().cloned().collect::<Vec<_>>(),
            "series": self.series_json(),
            "errors": errors,
        });
        self.last_ok_ms = Some(now_ms);
        self.last_doc = Some(doc.clone());
        doc
    }

    /// The document when no node answers: the last look, marked as old, with why.
    fn unreachable_doc(&mut self, now_ms: u64, error: String) -> Value {
        let mut doc = self.last_doc.clone().unwrap_or_else(
            || json!({"nodes": [], "apps": [], "datasets": [], "moves": [], "events": []}),
        );
        // The nodes did not answer: none is shown as answering.
        if let Some(nodes) = doc["nodes"].as_array_mut() {
            for n in nodes {
                n["answering"] = json!(false);
            }
        }
        doc["now_ms"] = json!(now_ms);
        doc["reached"] = json!(false);
        doc["unreachable"] = json!(error);
        doc["last_ok_ms"] = json!(self.last_ok_ms);
        doc["series"] = self.series_json();
        doc
    }

    fn series_json(&self) -> Value {
        let h = &self.history;
        json!({
            "t": h.iter().map(|s| s.at_ms).collect::<Vec<_>>(),
            "entries_per_s": h.iter().map(|s| s.entries_per_s).collect::<Vec<_>>(),
            "push_bytes_per_s": h.iter().map(|s| s.push_bytes_per_s).collect::<Vec<_>>(),
            "replica_lag_s": h.iter().map(|s| s.replica_lag_s).collect::<Vec<_>>(),
            "latency_ms": h.iter().map(|s| s.latency_ms).collect::<Vec<_>>(),
            "latency_source": self.latency_source,
        })
    }
}

/// Whether a push's phase is over (done, given up, waiting to retry).
fn phase_ended(phase: &str) -> bool {
    flock_decide::moves::MovePhase::from_name(phase).is_some_and(|p| p.has_ended())
}

/// An app as the page shows it: never its command line, environment or output (they may hold
/// secrets), only the program's or image's name.
fn app_json(a: &AppStatus) -> Value {
    let runs = if a.image.is_empty() {
        a.command
            .first()
            .map(|c| {
                std::path::Path::new(c)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    } else {
        a.image.clone()
    };
    json!({
        "name": a.name,
        "stack": a.stack,
        "node": a.node,
        "state": a.state,
        "health": a.health,
        "restarts": a.restarts,
        "last_exit_code": a.last_exit_code,
        "driver": a.driver,
        "runs": runs,
        "ports": a.ports,
        "endpoints": a.endpoints,
        "dataset": a.dataset,
        "moving_to": a.moving_to,
        "detail": a.detail,
        "service_ip": a.service_ip,
        "mesh_problems": a.mesh_problems,
        "instances": a.instances.max(1),
        "instance_nodes": a.instance_list.iter().map(|i| i.node.clone()).collect::<Vec<_>>(),
        "instances_running": a.instance_list.iter().filter(|i| i.state == "running").count(),
    })
}

fn dataset_json(d: &Dataset) -> Value {
    let primary = d.holders.iter().find(|h| h.node_id == d.primary_id);
    let newest = d.snapshots.iter().max_by_key(|s| s.created_unix);
    json!({
        "name": d.name,
        "primary": d.primary_name,
        "epoch": d.epoch,
        "size_limit": d.size_limit,
        "used_bytes": primary.map(|h| h.used_bytes),
        "referenced_bytes": primary.map(|h| h.referenced_bytes),
        "replicas": d.replicas.iter().map(|r| json!({
            "node": r,
            "lag_ms": d.replica_lag_ms.get(r),
            "base": d.bases.get(r),
            "state": d.holders.iter().find(|h| &h.node_name == r).map(|h| h.state.clone()),
        })).collect::<Vec<_>>(),
        "replicas_wanted": d.replicas_wanted,
        "snapshot_interval_ms": d.snapshot_interval_ms,
        "snapshots": d.snapshots.len(),
        "newest_snapshot": newest.map(|s| s.name.clone()),
        "newest_snapshot_unix": newest.map(|s| s.created_unix),
        "holders": d.holders.iter().map(|h| json!({
            "node": h.node_name, "role": h.role, "state": h.state, "error": h.error,
            "used_bytes": h.used_bytes,
        })).collect::<Vec<_>>(),
        "moving_to": d.moving_to,
        "hold": d.hold,
        "diverged": d.diverged,
        "retention": d.retention,
    })
}

/// Moves in progress (a dataset's pushes of kind move, an app's move without data), replica
/// pushes streaming now, and what ended a short while ago.
fn moves_json(apps: &[AppStatus], datasets: &[Dataset]) -> Vec<Value> {
    let mut out = Vec::new();
    for d in datasets {
        for t in &d.transfers {
            let is_move = t.kind == "move" || (t.kind.is_empty() && d.moving_to == t.to_node);
            let ended = phase_ended(&t.phase);
            // A replica push is worth following while it copies much (its first full copy, a
            // big delta), not the small rounds of every snapshot interval.
            let big = t.phase == "full" || t.total >= 8 << 20;
            if !is_move && (ended || !big) {
                continue;
            }
            let line = progress::line(t);
            let app = apps
                .iter()
                .find(|a| a.dataset == d.name)
                .map(|a| a.name.clone());
            out.push(json!({
                "kind": if is_move { "move" } else { "replica" },
                "dataset": d.name,
                "app": app,
                "from": d.primary_name,
                "to": t.to_node,
                "phase": t.phase,
                "words": line.words,
                "detail": line.detail,
                "bytes": t.bytes,
                "total": t.total,
                "percent": line.bar.map(|(at, of)| if of == 0 { 0.0 } else { at as f64 * 100.0 / of as f64 }),
                "bytes_per_sec": t.bytes_per_sec,
                "eta_secs": t.eta_secs,
                "attempt": t.attempt,
                "ended": ended,
                "last_error": t.last_error,
            }));
        }
    }
    for a in apps {
        // An app whose node does not answer, or is down with no failover possible yet: it
        // fails over (or cannot) once its node is declared down.
        let failing = a.state == "unreachable" || a.detail.contains("fail over");
        if failing {
            out.push(json!({
                "kind": "failover",
                "app": a.name,
                "dataset": a.dataset,
                "from": a.node,
                "to": "",
                "phase": a.state,
                "words": a.state,
                "detail": a.detail,
                "ended": false,
            }));
            continue;
        }
        let followed = out
            .iter()
            .any(|m| m["app"].as_str() == Some(a.name.as_str()) && m["ended"] == false);
        if !a.moving_to.is_empty() && !followed {
            out.push(json!({
                "kind": "move",
                "app": a.name,
                "dataset": a.dataset,
                "from": a.node,
                "to": a.moving_to,
                "phase": a.state,
                "words": a.state,
                "detail": a.detail,
                "ended": false,
            }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_prometheus_text_and_skips_what_it_cannot() {
        let text = "# HELP flock_build_info flockd's version\n\
                    # TYPE flock_build_info gauge\n\
                    flock_build_info{version=\"0.1.0\",odd=\"a}b\\\"c\"} 1\n\
                    flock_raft_commit_latency_seconds_bucket{le=\"+Inf\"} 4\n\
                    flock_raft_commit_latency_seconds_sum 0.02\n\
                    flock_raft_commit_latency_seconds_count 4 1700000000\n\
                    garbage{unclosed=\"x 1\n\
                    nonumber abc\n\
                    \n";
        let s = parse_prometheus(text);
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(s[0].name, "flock_build_info");
        assert_eq!(s[0].labels, "version=\"0.1.0\",odd=\"a}b\\\"c\"");
        assert_eq!(s[1].value, 4.0);
        let (name, sum, count) = latency_histogram(&s).unwrap();
        assert_eq!(name, "flock_raft_commit_latency_seconds");
        assert_eq!((sum, count), (0.02, 4.0));
        assert!(latency_histogram(&s[..1]).is_none());
    }

    #[test]
    fn the_token_is_taken_from_the_query_or_the_cookie() {
        let uri: Uri = "/?a=1&token=abc".parse().unwrap();
        assert_eq!(query_token(&uri), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; flock_ui_7470=tok"),
        );
        assert_eq!(cookie_value(&h, "flock_ui_7470"), Some("tok"));
        assert_eq!(cookie_value(&h, "flock_ui_7471"), None);
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }

    #[test]
    fn moves_show_a_moves_progress_and_hide_small_replica_rounds() {
        let push = |to: &str, kind: &str, phase: &str, bytes: u64, total: u64| Transfer {
            dataset: "db".into(),
            to_node: to.into(),
            kind: kind.into(),
            phase: phase.into(),
            bytes,
            total,
            attempt: 1,
            ..Default::default()
        };
        let d = Dataset {
            name: "db".into(),
            primary_name: "n1".into(),
            moving_to: "n2".into(),
            transfers: vec![
                push("n2", "move", "full", 25 << 20, 100 << 20),
                push("n3", "replica", "incremental", 10, 146),
                push("n3", "replica", "full", 1 << 20, 100 << 20),
                push("n3", "replica", "done", 100 << 20, 100 << 20),
            ],
            ..Default::default()
        };
        let app = AppStatus {
            name: "web".into(),
            node: "n3".into(),
            state: "unreachable".into(),
            detail: "node n3 did not answer".into(),
            ..Default::default()
        };
        let m = moves_json(&[app], &[d]);
        assert_eq!(m.len(), 3, "{m:#?}");
        assert_eq!(m[0]["kind"], "move");
        assert_eq!(m[0]["to"], "n2");
        assert_eq!(m[0]["percent"], 25.0);
        assert_eq!(m[0]["ended"], false);
        assert_eq!(m[1]["kind"], "replica");
        assert_eq!(m[1]["phase"], "full");
        assert_eq!(m[2]["kind"], "failover");
        assert_eq!(m[2]["app"], "web");
    }

    #[test]
    fn only_loopback_hosts_on_our_port_are_answered() {
        assert!(host_is_loopback("127.0.0.1:7470", 7470));
        assert!(host_is_loopback("localhost:7470", 7470));
        assert!(host_is_loopback("[::1]:7470", 7470));
        assert!(!host_is_loopback("127.0.0.1:7471", 7470));
        assert!(!host_is_loopback("evil.example:7470", 7470));
        assert!(!host_is_loopback("127.0.0.1", 7470));
    }
}
