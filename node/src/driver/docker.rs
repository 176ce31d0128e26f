//! The `docker` driver: runs an app's `image` as a container of the local Docker engine,
//! through bollard over the engine's unix socket.
//!
//! A container is named `flock-NODE-APP` and labelled as flock's:
//!
//! ```text
//! flock.node=NODE   the node label the driver was made with: list() sees only these
//! flock.app=APP     the app
//! flock.spec=FP     RunSpec::fingerprint() of the spec it was started from
//! flock.restarts=N  how many times the app had been restarted when it started
//! ```
//!
//! The engine keeps the containers, so a restarted flockd finds them by label and adopts them;
//! nothing else is kept on disk. The restart policy is "no": flockd's agent restarts apps.
//!
//! Ports: each internal port of `ports` is exposed and published on the host on the same
//! port number, bound to 0.0.0.0 (the external port of the pair is the cluster's business, not
//! the container's): the app is reachable on NODE:INTERNAL, as with the process driver, where
//! the app listens on the host's INTERNAL port itself.
//!
//! No image is ever pulled: an image missing on this node is an error that says so.
//!
//! Fail closed: a listing that fails or times out is an error (the caller counts every docker
//! app unknown), an inspect that fails makes the instance [`RunState::Unknown`], and a start
//! that meets a container it cannot inspect refuses instead of removing it. Every engine call
//! is bounded ([`CALL_TIMEOUT`](super::CALL_TIMEOUT); a stop by its grace on top).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::container::{
    Config, CreateContainerOptions, InspectContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::errors::Error as BollardError;
use bollard::models::{HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum};
use bollard::Docker;
use futures::StreamExt;

use super::{DriverError, Instance, RunSpec, RunState, CALL_TIMEOUT, KILL_TIMEOUT};

/// The engine's socket (bollard's default).
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Label keys marking a container as flock's.
pub const LABEL_NODE: &str = "flock.node";
pub const LABEL_APP: &str = "flock.app";
pub const LABEL_SPEC: &str = "flock.spec";
pub const LABEL_RESTARTS: &str = "flock.restarts";

/// Runs apps as containers of the local Docker engine; one per node.
#[derive(Debug, Clone)]
pub struct DockerDriver {
    docker: Docker,
    node_label: String,
}

fn docker_err(app: &str, what: &str) -> impl FnOnce(BollardError) -> DriverError {
    let (app, what) = (app.to_string(), what.to_string());
    move |e| DriverError::Docker {
        app,
        what,
        detail: e.to_string(),
    }
}

/// `call` bounded by `limit`: past it, an error naming `what` (the engine may still carry the
/// call out; the next look shows what it did).
async fn bounded<T>(
    app: &str,
    what: &str,
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, BollardError>>,
) -> Result<Result<T, BollardError>, DriverError> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| DriverError::Timeout {
            app: app.to_string(),
            what: format!("docker: {what}"),
            secs: limit.as_secs(),
        })
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// An instance of `app` whose state the engine could not tell.
fn unknown(app: &str, reason: String) -> Instance {
    Instance {
        app: app.to_string(),
        fingerprint: String::new(),
        state: RunState::Unknown { reason },
        id: String::new(),
        restarts: 0,
        healthy: None,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Seconds since the epoch of an RFC 3339 time as the engine writes it
/// ("2026-11-24T01:10:00.123456789Z"); `None` for anything else, or the engine's zero time.
fn parse_rfc3339(t: &str) -> Option<u64> {
    let num = |s: &str| s.parse::<i64>().ok();
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let hms = time.get(..8)?;
    let mut h = hms.splitn(3, ':');
    let (hh, mm, ss) = (num(h.next()?)?, num(h.next()?)?, num(h.next()?)?);
    // The offset, if not Z: "+HH:MM" or "-HH:MM" at the end.
    let rest = &time[8..];
    let offset = match rest.rfind(['+', '-']) {
        Some(i) if rest.len() - i == 6 => {
            let sign = if &rest[i..=i] == "-" { -1 } else { 1 };
            sign * (num(&rest[i + 1..i + 3])? * 3600 + num(&rest[i + 4..i + 6])? * 60)
        }
        _ => 0,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss - offset;
    u64::try_from(secs).ok().filter(|s| *s > 0)
}

impl DockerDriver {
    /// Connects to the local engine at [`DOCKER_SOCKET`] and agrees on an API version with it.
    pub async fn connect(node_label: &str) -> Result<DockerDriver, DriverError> {
        Self::connect_at(DOCKER_SOCKET, node_label).await
    }

    /// Connects to the engine listening on the unix socket `socket` (tests serve a fake one)
    /// and agrees on an API version with it.
    pub async fn connect_at(socket: &str, node_label: &str) -> Result<DockerDriver, DriverError> {
        let unavailable = |detail: String| DriverError::EngineUnavailable {
            socket: socket.to_string(),
            detail,
        };
        // bollard's own timeout is a backstop: each call here has a tighter one.
        let docker = Docker::connect_with_unix(socket, 120, bollard::API_DEFAULT_VERSION)
            .map_err(|e| unavailable(e.to_string()))?;
        let hello = async {
            let docker = docker.negotiate_version().await?;
            docker.ping().await?;
            Ok::<_, BollardError>(docker)
        };
        let docker = tokio::time::timeout(CALL_TIMEOUT, hello)
            .await
            .map_err(|_| unavailable(format!("no answer within {} s", CALL_TIMEOUT.as_secs())))?
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(DockerDriver {
            docker,
            node_label: node_label.to_string(),
        })
    }

    /// The bollard client, for callers that need more of the engine.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// The container name of `app` on this node.
    pub fn container_name(&self, app: &str) -> String {
        format!("flock-{}-{}", self.node_label, app)
    }

    /// The instance of `app`, if its container exists (running or not); an instance in
    /// [`RunState::Unknown`] when the engine could not tell (it may exist and run).
    pub async fn instance(&self, app: &str) -> Option<Instance> {
        let inspected = bounded(
            app,
            "inspect the container",
            CALL_TIMEOUT,
            self.docker
                .inspect_container(&self.container_name(app), None::<InspectContainerOptions>),
        )
        .await;
        let c = match inspected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) if is_not_found(&e) => return None,
            Ok(Err(e)) => return Some(unknown(app, format!("inspecting its container: {e}"))),
            Err(e) => return Some(unknown(app, e.to_string())),
        };
        let labels = c
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        if labels.get(LABEL_NODE) != Some(&self.node_label) {
            return None;
        }
        let st = c.state.unwrap_or_default();
        let healthy = st.health.as_ref().and_then(|h| h.status).and_then(|s| {
            use bollard::models::HealthStatusEnum as H;
            match s {
                H::HEALTHY => Some(true),
                H::UNHEALTHY | H::STARTING => Some(false),
                _ => None,
            }
        });
        let state = if st.running == Some(true) {
            RunState::Running {
                since_unix: st
                    .started_at
                    .as_deref()
                    .and_then(parse_rfc3339)
                    .unwrap_or_else(now_unix),
            }
        } else {
            RunState::Exited {
                // A container created but never started has no exit code.
                code: st
                    .started_at
                    .as_deref()
                    .and_then(parse_rfc3339)
                    .and(st.exit_code)
                    .and_then(|c| i32::try_from(c).ok()),
                signal: None,
            }
        };
        Some(Instance {
            app: labels.get(LABEL_APP).cloned().unwrap_or_else(|| app.into()),
            fingerprint: labels.get(LABEL_SPEC).cloned().unwrap_or_default(),
            state,
            id: c.id.unwrap_or_default(),
            restarts: labels
                .get(LABEL_RESTARTS)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0),
            healthy,
        })
    }

    /// Every container of this node's label, running, exited or unknown, by app; an error
    /// when the engine could not list them (then every docker app is unknown, not absent).
    pub async fn list(&self) -> Result<Vec<Instance>, DriverError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_NODE}={}", self.node_label)],
        )]);
        let listed = tokio::time::timeout(
            CALL_TIMEOUT,
            self.docker.list_containers(Some(ListContainersOptions {
                all: true,
                filters,
                ..Default::default()
            })),
        )
        .await;
        let summaries = match listed {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(DriverError::ListFailed {
                    driver: "docker",
                    detail: format!("the engine's container list: {e}"),
                })
            }
            Err(_) => {
                return Err(DriverError::ListFailed {
                    driver: "docker",
                    detail: format!(
                        "the engine did not list its containers within {} s",
                        CALL_TIMEOUT.as_secs()
                    ),
                })
            }
        };
        // Inspected side by side: a slow engine costs one timeout, not one per container.
        let looks = summaries.iter().filter_map(|s| {
            let labels = s.labels.as_ref()?;
            let app = labels.get(LABEL_APP)?;
            Some(async move { (s, labels, self.instance(app).await) })
        });
        let mut out = Vec::new();
        for (s, labels, found) in futures::future::join_all(looks).await {
            match found {
                Some(mut i) if matches!(i.state, RunState::Unknown { .. }) => {
                    // What the listing knew of it, to show with the unknown state.
                    i.id = s.id.clone().unwrap_or_default();
                    i.fingerprint = labels.get(LABEL_SPEC).cloned().unwrap_or_default();
                    i.restarts = labels
                        .get(LABEL_RESTARTS)
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0);
                    out.push(i);
                }
                Some(i) => out.push(i),
                // Removed since the listing.
                None => {}
            }
        }
        out.sort_by(|a, b| a.app.cmp(&b.app));
        Ok(out)
    }

    /// Whether the engine has `image` (flock never pulls); the engine's error when it could
    /// not tell.
    pub async fn has_image(&self, image: &str) -> Result<bool, String> {
        match tokio::time::timeout(CALL_TIMEOUT, self.docker.inspect_image(image)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if is_not_found(&e) => Ok(false),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} s", CALL_TIMEOUT.as_secs())),
        }
    }

    /// Starts a container for `spec`, labelled with `restarts`. Refused while one of the app
    /// runs, or may run (its state unknown); an exited one is removed first.
    pub async fn start(
        &self,
        spec: &RunSpec,
        restarts: u32,
        secrets_dir: Option<&std::path::Path>,
    ) -> Result<Instance, DriverError> {
        let app = &spec.app;
        let image = spec
            .image
            .as_ref()
            .filter(|i| !i.is_empty())
            .ok_or_else(|| DriverError::NoImage { app: app.clone() })?;
        let name = self.container_name(app);
        match self.instance(app).await.map(|i| (i.state, i.id)) {
            Some((RunState::Running { .. }, id)) => {
                return Err(DriverError::AlreadyRunning {
                    app: app.clone(),
                    id,
                })
            }
            Some((RunState::Unknown { reason }, _)) => {
                return Err(DriverError::Unknown {
                    app: app.clone(),
                    reason,
                })
            }
            _ => {}
        }
        // The name may be taken by a container not ours by label (a half-made one): remove it,
        // unless it runs.
        self.remove_stopped(app, &name).await?;
        match bounded(
            app,
            "inspect the image",
            CALL_TIMEOUT,
            self.docker.inspect_image(image),
        )
        .await?
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                return Err(DriverError::ImageMissing {
                    app: app.clone(),
                    image: image.clone(),
                })
            }
            Err(e) => return Err(docker_err(app, &format!("inspect image {image}"))(e)),
        }

        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("FLOCK_APP={app}"));
        if let Some(m) = &spec.mountpoint {
            if spec.dataset_path.is_some() {
                env.push(format!("FLOCK_DATASET_PATH={m}"));
            }
        }
        if let Some((internal, _)) = spec.ports.first() {
            env.push(format!("PORT={internal}"));
        }
        let more = &spec.more;
        let mut binds = match (&spec.dataset_path, &spec.mountpoint) {
            (Some(p), Some(m)) => vec![format!("{}:{m}", p.display())],
            _ => Vec::new(),
        };
        binds.extend(
            more.binds
                .iter()
                .map(|b| format!("{}:{}:ro", b.source, b.target)),
        );
        if let Some(dir) = secrets_dir {
            let names = super::secret_file_names(&more.secrets);
            for (s, name) in more.secrets.iter().zip(names) {
                binds.push(format!("{}:{}:ro", dir.join(name).display(), s.target));
            }
        }
        let mut exposed = HashMap::new();
        let mut bindings = HashMap::new();
        // The internal ports of `ports`, and those its siblings reach it on: published on the
        // node at their own number, where the mesh and service addresses forward to.
        let internals = spec
            .ports
            .iter()
            .map(|(i, _)| *i)
            .chain(more.expose.iter().copied())
            .collect::<std::collections::BTreeSet<u16>>();
        for internal in &internals {
            let key = format!("{internal}/tcp");
            exposed.insert(key.clone(), HashMap::new());
            bindings.insert(
                key,
                Some(vec![PortBinding {
                    host_ip: Some("0.0.0.0".into()),
                    host_port: Some(internal.to_string()),
                }]),
            );
        }
        let mut labels: HashMap<String, String> = more
            .labels
            .iter()
            .filter(|(k, _)| !k.starts_with("flock."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend([
            (LABEL_NODE.to_string(), self.node_label.clone()),
            (LABEL_APP.to_string(), app.clone()),
            (LABEL_SPEC.to_string(), spec.fingerprint()),
            (LABEL_RESTARTS.to_string(), restarts.to_string()),
        ]);
        let host_config = HostConfig {
            binds: (!binds.is_empty()).then_some(binds),
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            memory: spec.mem_limit.and_then(|m| i64::try_from(m).ok()),
            memory_reservation: more.mem_reservation.and_then(|m| i64::try_from(m).ok()),
            cpu_shares: spec.cpu_shares.and_then(|c| i64::try_from(c).ok()),
            nano_cpus: more
                .cpu_limit_milli
                .and_then(|m| i64::try_from(m.saturating_mul(1_000_000)).ok()),
            shm_size: more.shm_size.and_then(|m| i64::try_from(m).ok()),
            ulimits: (!more.ulimits.is_empty()).then(|| {
                more.ulimits
                    .iter()
                    .map(|u| bollard::models::ResourcesUlimits {
                        name: Some(u.name.clone()),
                        soft: Some(u.soft),
                        hard: Some(u.hard),
                    })
                    .collect()
            }),
            extra_hosts: (!more.extra_hosts.is_empty()).then(|| {
                more.extra_hosts
                    .iter()
                    .map(|(name, ip)| format!("{name}:{ip}"))
                    .collect()
            }),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        };
        let healthcheck = more.healthcheck.as_ref().map(|h| {
            let ns =
                |ms: Option<u64>| ms.and_then(|m| i64::try_from(m.saturating_mul(1_000_000)).ok());
            bollard::models::HealthConfig {
                test: Some(if h.disable {
                    vec!["NONE".to_string()]
                } else {
                    h.test.clone()
                }),
                interval: ns(h.interval_ms),
                timeout: ns(h.timeout_ms),
                retries: h.retries.map(i64::from),
                start_period: ns(h.start_period_ms),
                ..Default::default()
            }
        });
        let config = Config {
            image: Some(image.clone()),
            cmd: spec.command.clone().filter(|c| !c.is_empty()),
            entrypoint: more.entrypoint.clone(),
            user: more.user.clone(),
            working_dir: more.working_dir.clone(),
            hostname: more.hostname.clone(),
            stop_signal: more.stop_signal.clone(),
            stop_timeout: more
                .stop_grace_ms
                .map(|ms| i64::try_from(ms.div_ceil(1000)).unwrap_or(i64::MAX)),
            healthcheck,
            env: Some(env),
            labels: Some(labels),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            host_config: Some(host_config),
            ..Default::default()
        };
        let created = bounded(
            app,
            "create the container",
            CALL_TIMEOUT,
            self.docker.create_container(
                Some(CreateContainerOptions {
                    name: name.clone(),
                    platform: None,
                }),
                config,
            ),
        )
        .await?
        .map_err(docker_err(app, "create the container"))?;
        let started = bounded(
            app,
            "start the container",
            CALL_TIMEOUT,
            self.docker
                .start_container(&created.id, None::<StartContainerOptions<String>>),
        )
        .await;
        match started {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // Not started, it would only be in the way of the next try.
                let _ = self.remove_stopped(app, &name).await;
                return Err(docker_err(app, "start the container")(e));
            }
            // It may have started after all: the next look tells.
            Err(e) => return Err(e),
        }
        match self.instance(app).await {
            Some(i) if !matches!(i.state, RunState::Unknown { .. }) => Ok(i),
            _ => Ok(Instance {
                app: app.clone(),
                fingerprint: spec.fingerprint(),
                state: RunState::Running {
                    since_unix: now_unix(),
                },
                id: created.id,
                restarts,
                healthy: None,
            }),
        }
    }

    /// Stops the app's container: SIGTERM, then SIGKILL after `grace`. Ok once it does not
    /// run (the engine answers a stop when the container has stopped); an error, never Ok,
    /// when the engine fails or does not answer in time. The container and its log stay (see
    /// [`remove`](Self::remove)).
    pub async fn stop(&self, app: &str, grace: Duration) -> Result<(), DriverError> {
        // The app's own grace (compose's stop_grace_period), which the engine keeps as the
        // container's StopTimeout, over the default; a failed inspect keeps the default.
        let own = bounded(
            app,
            "inspect the container",
            CALL_TIMEOUT,
            self.docker
                .inspect_container(&self.container_name(app), None::<InspectContainerOptions>),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
        .and_then(|c| c.config?.stop_timeout)
        .and_then(|t| u64::try_from(t).ok());
        let grace = own.map_or(grace, Duration::from_secs);
        let t = i64::try_from(grace.as_secs_f64().ceil() as u64).unwrap_or(i64::MAX);
        let stopped = bounded(
            app,
            "stop the container",
            grace + KILL_TIMEOUT,
            self.docker
                .stop_container(&self.container_name(app), Some(StopContainerOptions { t })),
        )
        .await?;
        match stopped {
            Ok(()) => Ok(()),
            // 304: it was not running; 404: there is none.
            Err(BollardError::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => Err(docker_err(app, "stop the container")(e)),
        }
    }

    /// Removes the container named `name` unless it runs (or its state is unknown): a
    /// running container is never removed by force here, so a failed look cannot kill an app.
    async fn remove_stopped(&self, app: &str, name: &str) -> Result<(), DriverError> {
        let inspected = bounded(
            app,
            "inspect the container",
            CALL_TIMEOUT,
            self.docker
                .inspect_container(name, None::<InspectContainerOptions>),
        )
        .await?;
        match inspected {
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => {
                return Err(DriverError::Unknown {
                    app: app.to_string(),
                    reason: format!("inspecting container {name}: {e}"),
                })
            }
            Ok(c) if c.state.as_ref().and_then(|s| s.running) != Some(false) => {
                return Err(DriverError::Docker {
                    app: app.to_string(),
                    what: format!("remove container {name}"),
                    detail: "it runs (or its state is unknown); stop it first".into(),
                })
            }
            Ok(_) => {}
        }
        let removed = bounded(
            app,
            "remove the container",
            CALL_TIMEOUT,
            self.docker.remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            ),
        )
        .await?;
        match removed {
            Err(e) if !is_not_found(&e) => Err(docker_err(app, "remove the container")(e)),
            _ => Ok(()),
        }
    }

    /// Stops the app and removes its container, log included.
    pub async fn remove(&self, app: &str) -> Result<(), DriverError> {
        self.stop(app, super::process::STOP_GRACE).await?;
        self.remove_stopped(app, &self.container_name(app)).await
    }

    /// The last `tail` lines of the container's stdout and stderr.
    pub async fn logs(&self, app: &str, tail: usize) -> Result<Vec<String>, DriverError> {
        let name = self.container_name(app);
        let mut stream = self.docker.logs(
            &name,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: tail.to_string(),
                ..Default::default()
            }),
        );
        let mut text = Vec::new();
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        while let Some(chunk) = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| DriverError::Timeout {
                app: app.to_string(),
                what: "docker: read the logs".into(),
                secs: CALL_TIMEOUT.as_secs(),
            })?
        {
            match chunk {
                Ok(out) => text.extend_from_slice(out.as_ref()),
                Err(e) if is_not_found(&e) => {
                    return Err(DriverError::NotHere {
                        app: app.to_string(),
                    })
                }
                Err(e) => return Err(docker_err(app, "read the logs")(e)),
            }
        }
        let mut lines: Vec<String> = String::from_utf8_lossy(&text)
            .lines()
            .map(str::to_string)
            .collect();
        let skip = lines.len().saturating_sub(tail);
        Ok(lines.split_off(skip))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;

    #[test]
    fn engine_times_parse() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:10Z"), Some(10));
        assert_eq!(
            parse_rfc3339("2026-11-24T01:10:00.123456789Z"),
            Some(1_795_482_600)
        );
        assert_eq!(
            parse_rfc3339("2026-11-24T02:10:00+01:00"),
            Some(1_795_482_600)
        );
        assert_eq!(parse_rfc3339("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}
