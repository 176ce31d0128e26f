//! Drivers run an application's instance on this node: the `process` driver (the embedded
//! default) runs a command; the `docker` driver a container.
//!
//! A driver is told what should run ([`RunSpec`]) and reports what runs ([`Instance`]); it keeps
//! enough on disk that a restarted flockd finds the instances that kept running and adopts them
//! instead of starting duplicates. Restart policies and placement are decided elsewhere (the
//! agent and the scheduler); a driver only starts, stops, lists and shows logs.
//!
//! Drivers fail closed: a look that fails or times out is reported as such ([`Listing::failed`],
//! [`RunState::Unknown`]), never as "nothing runs", and a `stop` is `Ok` only once nothing of
//! the app runs any more. Every call that can hang is bounded by a timeout that yields an error.

pub mod docker;
pub mod process;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What to run for one application on this node: decided by flock-decide's apps core.
pub use flock_decide::apps::RunSpec;

/// What a driver reports about one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub app: String,
    /// [`RunSpec::fingerprint`] of the spec it was started from.
    pub fingerprint: String,
    pub state: RunState,
    /// The driver's id for it (a pid, a container id).
    pub id: String,
    /// How many times the app had been restarted (by its restart policy) when this instance
    /// started: kept with the instance, so a restarted flockd counts on from there.
    pub restarts: u32,
    /// Its health check's verdict (docker's `healthy`: true; `unhealthy` or `starting`: false);
    /// `None` without a health check.
    #[serde(default)]
    pub healthy: Option<bool>,
}

/// Whether an instance runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running {
        /// Seconds since the Unix epoch.
        since_unix: u64,
    },
    Exited {
        /// The exit status, when known (`None`: killed by a signal, or it exited while no
        /// flockd was watching).
        code: Option<i32>,
        /// The signal that ended it, if one did.
        signal: Option<i32>,
    },
    /// The instance exists, or may, but its state could not be read (a failed or timed-out
    /// inspect, an unreadable record): it may run. Never stored on disk.
    Unknown { reason: String },
}

/// What the drivers saw on one look.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub instances: Vec<(Instance, Kind)>,
    /// Drivers whose listing failed or timed out, with why: every app of that kind is unknown.
    /// A docker driver that is absent (no engine answered at start) is listed here too.
    pub failed: Vec<(Kind, String)>,
}

impl Listing {
    /// Why the apps of `kind` are unknown, if its driver's listing failed.
    pub fn failure(&self, kind: Kind) -> Option<&str> {
        self.failed
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, why)| why.as_str())
    }
}

/// Why a driver could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("app {app}: command {program:?} not found on this node ({detail}); install it or fix `command` in application.yml")]
    CommandNotFound {
        app: String,
        program: String,
        detail: String,
    },
    #[error("app {app}: the process driver needs `command`, not only `image`")]
    NoCommand { app: String },
    #[error("app {app} is already running here (id {id})")]
    AlreadyRunning { app: String, id: String },
    #[error("app {app} does not run on this node")]
    NotHere { app: String },
    #[error("app {app}: the docker driver needs `image`")]
    NoImage { app: String },
    #[error("app {app}: image {image} is not on this node; build or load it (docker build / docker load): no image can be pulled here")]
    ImageMissing { app: String, image: String },
    #[error("the docker driver needs a running Docker engine at {socket}: {detail}")]
    EngineUnavailable { socket: String, detail: String },
    #[error("app {app}: docker: {what}: {detail}")]
    Docker {
        app: String,
        what: String,
        detail: String,
    },
    #[error("app {app}: its instance is in an unknown state ({reason}); refusing to touch it until its state can be read")]
    Unknown { app: String, reason: String },
    #[error("app {app}: {what} did not finish within {secs} s")]
    Timeout {
        app: String,
        what: String,
        secs: u64,
    },
    #[error("app {app}: still running after the stop ({detail})")]
    StillRunning { app: String, detail: String },
    #[error("listing the {driver} driver's apps failed: {detail}")]
    ListFailed {
        driver: &'static str,
        detail: String,
    },
    #[error("app {app}: {what}: {source}")]
    Io {
        app: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl DriverError {
    /// Whether trying again cannot help until the spec or the node changes (a missing command
    /// or image); the other errors (the engine failing or slow, an unknown state) are worth a
    /// retry.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DriverError::CommandNotFound { .. }
                | DriverError::NoCommand { .. }
                | DriverError::NoImage { .. }
                | DriverError::ImageMissing { .. }
        )
    }
}

/// Which driver runs an app: `docker` for an `image`, `process` for a `command` alone.
pub use flock_decide::apps::DriverKind as Kind;

/// How long one look at a driver (a listing, an inspect, a short engine call) may take before
/// it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stop may take beyond its grace period (the SIGKILL and the wait for the exit).
pub const KILL_TIMEOUT: Duration = Duration::from_secs(15);

/// The file names of an app's secrets in its secrets directory: the target's last component
/// (`/run/secrets/db_password` is `db_password`), with its index before it when two share one.
pub fn secret_file_names(secrets: &[flock_decide::apps::SecretFile]) -> Vec<String> {
    let base = |t: &str| {
        let b = t.rsplit('/').find(|c| !c.is_empty()).unwrap_or("secret");
        if b == "." || b == ".." {
            "secret".to_string()
        } else {
            b.to_string()
        }
    };
    secrets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let b = base(&s.target);
            let shared = secrets.iter().filter(|o| base(&o.target) == b).count() > 1;
            if shared {
                format!("{i}-{b}")
            } else {
                b
            }
        })
        .collect()
}

/// A node's drivers: the process driver always, the docker driver when an engine answered at
/// start.
#[derive(Clone)]
pub struct Drivers {
    pub process: std::sync::Arc<process::ProcessDriver>,
    pub docker: Option<std::sync::Arc<docker::DockerDriver>>,
    /// Why there is no docker driver, for the apps that need one.
    pub docker_error: String,
}

impl Drivers {
    /// The process driver rooted at `apps_root`, and the docker driver if the local engine
    /// answers (its containers labelled with `node_label`). Without an engine, apps with an
    /// `image` fail with the reason; apps with a `command` run as usual.
    pub async fn open(apps_root: std::path::PathBuf, node_label: &str) -> anyhow::Result<Drivers> {
        Drivers::open_at(apps_root, node_label, docker::DOCKER_SOCKET).await
    }

    /// As [`open`](Self::open), with the Docker engine at `docker_socket`.
    pub async fn open_at(
        apps_root: std::path::PathBuf,
        node_label: &str,
        docker_socket: &str,
    ) -> anyhow::Result<Drivers> {
        let process =
            std::sync::Arc::new(process::ProcessDriver::new(&apps_root).map_err(|e| {
                anyhow::anyhow!("cannot use the app directory {}: {e}", apps_root.display())
            })?);
        let connected = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            docker::DockerDriver::connect_at(docker_socket, node_label),
        )
        .await;
        let (docker, docker_error) = match connected {
            Ok(Ok(d)) => (Some(std::sync::Arc::new(d)), String::new()),
            Ok(Err(e)) => (None, e.to_string()),
            Err(_) => (
                None,
                format!("the Docker engine at {docker_socket} did not answer within 3 s"),
            ),
        };
        match &docker {
            Some(_) => tracing::info!("docker driver: connected to the local engine"),
            None => {
                tracing::info!(reason = %docker_error, "docker driver unavailable; apps with an image cannot run here")
            }
        }
        Ok(Drivers {
            process,
            docker,
            docker_error,
        })
    }

    /// The same drivers, telling process apps the host their node is reached at
    /// (`FLOCK_NODE_HOST`).
    pub fn with_node_host(mut self, host: &str) -> Drivers {
        if let Some(p) = std::sync::Arc::get_mut(&mut self.process) {
            p.node_host = Some(host.to_string());
        }
        self
    }

    fn docker(&self, app: &str) -> Result<&docker::DockerDriver, DriverError> {
        self.docker
            .as_deref()
            .ok_or_else(|| DriverError::EngineUnavailable {
                socket: docker::DOCKER_SOCKET.to_string(),
                detail: format!("app {app}: {}", self.docker_error),
            })
    }

    /// Why `spec` could not start on this node, as far as can be told before it starts: its
    /// driver missing, its image not in the local engine, its program not found. `None` when
    /// nothing is known to stop it.
    pub async fn preflight(&self, spec: &flock_scheduler::config::AppSpec) -> Option<String> {
        match Kind::of(spec.image.as_deref()) {
            Kind::Docker => {
                let image = spec.image.as_deref().unwrap_or_default();
                let Some(docker) = &self.docker else {
                    return Some(format!(
                        "the app has an image and this node has no docker driver: {}",
                        self.docker_error
                    ));
                };
                match docker.has_image(image).await {
                    Ok(true) => None,
                    Ok(false) => Some(format!(
                        "image {image} is not in this node's Docker engine, and flock never pulls; \
                         `docker pull {image}` (or `docker load`) on the node first"
                    )),
                    Err(e) => Some(format!(
                        "the Docker engine could not tell whether it has image {image}: {e}"
                    )),
                }
            }
            Kind::Process => {
                let program = spec.command.as_ref()?.first()?;
                program_problem(program, std::env::var_os("PATH").as_deref())
            }
        }
    }

    /// Every instance of both drivers, with the driver that runs it, and the drivers that
    /// could not be read: an app of a failed kind is unknown, not absent.
    pub async fn list(&self) -> Listing {
        let mut listing = Listing::default();
        let p = self.process.clone();
        let process =
            tokio::time::timeout(CALL_TIMEOUT, tokio::task::spawn_blocking(move || p.list())).await;
        match process {
            Ok(Ok(Ok(instances))) => listing
                .instances
                .extend(instances.into_iter().map(|i| (i, Kind::Process))),
            Ok(Ok(Err(e))) => listing.failed.push((Kind::Process, e.to_string())),
            Ok(Err(e)) => listing
                .failed
                .push((Kind::Process, format!("the listing task failed: {e}"))),
            Err(_) => listing.failed.push((
                Kind::Process,
                format!(
                    "listing the app processes took over {} s",
                    CALL_TIMEOUT.as_secs()
                ),
            )),
        }
        match &self.docker {
            Some(d) => match d.list().await {
                Ok(instances) => listing
                    .instances
                    .extend(instances.into_iter().map(|i| (i, Kind::Docker))),
                Err(e) => listing.failed.push((Kind::Docker, e.to_string())),
            },
            None => listing.failed.push((
                Kind::Docker,
                format!("no docker driver on this node: {}", self.docker_error),
            )),
        }
        listing
    }

    /// Starts `spec`, recording `restarts` with the instance ([`Instance::restarts`]).
    pub async fn start(
        &self,
        kind: Kind,
        spec: &RunSpec,
        restarts: u32,
    ) -> Result<Instance, DriverError> {
        match kind {
            Kind::Process => {
                let (p, s) = (self.process.clone(), spec.clone());
                blocking(&spec.app, "start", CALL_TIMEOUT, move || {
                    p.start(&s, restarts)
                })
                .await
            }
            Kind::Docker => {
                let secrets =
                    (!spec.more.secrets.is_empty()).then(|| self.process.secrets_dir(&spec.app));
                self.docker(&spec.app)?
                    .start(spec, restarts, secrets.as_deref())
                    .await
            }
        }
    }

    /// Writes the secret files of `spec` (`contents` in the order of `spec.more.secrets`)
    /// where its driver gives them to it: a directory of the app's, private to root; each
    /// file has the mode the app asked for, and is replaced whole (written aside, then
    /// renamed). Files of secrets the app no longer has go.
    pub fn write_secrets(&self, spec: &RunSpec, contents: &[Vec<u8>]) -> std::io::Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let dir = self.process.secrets_dir(&spec.app);
        if spec.more.secrets.is_empty() {
            return match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        std::fs::create_dir_all(&dir)?;
        // The directory is root's alone: the files' own modes are for the app (a container
        // sees the file, not the directory).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let names = secret_file_names(&spec.more.secrets);
        for ((s, name), content) in spec.more.secrets.iter().zip(&names).zip(contents) {
            let tmp = dir.join(format!(".{name}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            std::io::Write::write_all(&mut f, content)?;
            f.sync_all()?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(s.mode & 0o777))?;
            std::fs::rename(&tmp, dir.join(name))?;
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !names.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Ok only once nothing of the app runs any more (process: every process of its group
    /// gone, killed after the grace period whatever the leader did; docker: the container
    /// stopped).
    pub async fn stop(&self, kind: Kind, app: &str) -> Result<(), DriverError> {
        match kind {
            Kind::Process => {
                let (p, a) = (self.process.clone(), app.to_string());
                let grace = p.grace();
                // The app's own grace, if it asks for one, bounds the wait.
                let (_, own) = p.stop_plan(app, grace);
                blocking(app, "stop", own + KILL_TIMEOUT, move || p.stop(&a, grace)).await
            }
            Kind::Docker => self.docker(app)?.stop(app, process::STOP_GRACE).await,
        }
    }

    /// Stops the app (as [`stop`](Self::stop)) and forgets it, its log included.
    pub async fn remove(&self, kind: Kind, app: &str) -> Result<(), DriverError> {
        match kind {
            Kind::Process => {
                let (p, a) = (self.process.clone(), app.to_string());
                blocking(
                    app,
                    "remove",
                    self.process.grace() + KILL_TIMEOUT + CALL_TIMEOUT,
                    move || p.remove(&a),
                )
                .await
            }
            Kind::Docker => self.docker(app)?.remove(app).await,
        }
    }

    /// The app's last `tail` output lines.
    pub async fn logs(&self, kind: Kind, app: &str, tail: usize) -> Vec<String> {
        match kind {
            Kind::Process => {
                let (p, a) = (self.process.clone(), app.to_string());
                blocking(app, "read the log", CALL_TIMEOUT, move || p.logs(&a, tail))
                    .await
                    .map(|(l, _)| l)
                    .unwrap_or_default()
            }
            Kind::Docker => match self.docker(app) {
                Ok(d) => d.logs(app, tail).await.unwrap_or_default(),
                Err(_) => Vec::new(),
            },
        }
    }
}

/// Runs a blocking driver call on tokio's blocking pool, bounded by `limit`: past it the call
/// is an error (it may still finish in the background; what it did shows in the next look).
async fn blocking<T: Send + 'static>(
    app: &str,
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(DriverError::Io {
            app: app.to_string(),
            what: what.to_string(),
            source: std::io::Error::other(e.to_string()),
        }),
        Err(_) => Err(DriverError::Timeout {
            app: app.to_string(),
            what: what.to_string(),
            secs: limit.as_secs(),
        }),
    }
}

/// Why the process driver could not run `program`: an absolute path that is not an executable
/// file, or a bare name found in no directory of `path`. A relative path with a `/` is looked up
/// in the app's working directory (its dataset) when it starts, so it is not judged here.
fn program_problem(program: &str, path: Option<&std::ffi::OsStr>) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.starts_with('/') {
        let p = std::path::Path::new(program);
        return match std::fs::metadata(p) {
            Err(_) => Some(format!("command {program} does not exist on this node")),
            Ok(_) if !executable(p) => Some(format!("command {program} is not an executable file")),
            Ok(_) => None,
        };
    }
    if program.contains('/') {
        return None;
    }
    let path = path.unwrap_or_else(|| std::ffi::OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    if std::env::split_paths(path).any(|d| executable(&d.join(program))) {
        return None;
    }
    Some(format!(
        "command {program:?} is not found in flockd's PATH on this node ({}); install it there or give its absolute path",
        path.to_string_lossy()
    ))
}

#[cfg(test)]
mod preflight_tests {
    use super::program_problem;
    use std::ffi::OsStr;

    #[test]
    fn programs_are_looked_up_as_the_driver_would() {
        assert_eq!(
            program_problem("sh", Some(OsStr::new("/nowhere:/bin"))),
            None
        );
        let m = program_problem("no-such-program-flock", Some(OsStr::new("/bin"))).unwrap();
        assert!(
            m.contains("not found in flockd's PATH") && m.contains("/bin"),
            "{m}"
        );
        assert_eq!(program_problem("/bin/sh", None), None);
        let m = program_problem("/no/such/program", None).unwrap();
        assert!(m.contains("does not exist"), "{m}");
        let plain = tempfile::NamedTempFile::new().expect("a temp file");
        let plain = plain.path().to_str().expect("utf-8").to_string();
        let m = program_problem(&plain, None).unwrap();
        assert!(m.contains("not an executable"), "{m}");
        assert_eq!(program_problem("./run.sh", None), None);
    }
}
