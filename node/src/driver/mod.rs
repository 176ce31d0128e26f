//! Drivers run an application's instance on this node: the `process` driver (the embedded
//! default) runs a command; the `docker` driver (later) a container.
//!
//! A driver is told what should run ([`RunSpec`]) and reports what runs ([`Instance`]); it keeps
//! enough on disk that a restarted flockd finds the instances that kept running and adopts them
//! instead of starting duplicates. Restart policies and placement are decided elsewhere (the
//! agent and the scheduler); a driver only starts, stops, lists and shows logs.

pub mod docker;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What to run for one application on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub app: String,
    /// For the docker driver.
    pub image: Option<String>,
    /// For the process driver: the program and its arguments.
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// The dataset's files on this node, if the app has a volume.
    pub dataset_path: Option<PathBuf>,
    /// Where the app sees its volume (docker: the bind mount's target).
    pub mountpoint: Option<String>,
    /// (internal, external) ports.
    pub ports: Vec<(u16, u16)>,
    pub mem_limit: Option<u64>,
    pub cpu_shares: Option<u64>,
}

impl RunSpec {
    /// A digest of the spec: an instance started from another spec is out of date.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).expect("a spec serializes");
        hex::encode(&Sha256::digest(&json)[..12])
    }
}

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
    #[error("app {app}: {what}: {source}")]
    Io {
        app: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Which driver runs an app: `docker` for an `image`, `process` for a `command` alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Process,
    Docker,
}

impl Kind {
    /// The driver for an app with this image and command.
    pub fn of(image: Option<&str>) -> Kind {
        if image.is_some() {
            Kind::Docker
        } else {
            Kind::Process
        }
    }
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
        let process =
            std::sync::Arc::new(process::ProcessDriver::new(&apps_root).map_err(|e| {
                anyhow::anyhow!("cannot use the app directory {}: {e}", apps_root.display())
            })?);
        let connected = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            docker::DockerDriver::connect(node_label),
        )
        .await;
        let (docker, docker_error) = match connected {
            Ok(Ok(d)) => (Some(std::sync::Arc::new(d)), String::new()),
            Ok(Err(e)) => (None, e.to_string()),
            Err(_) => (
                None,
                format!(
                    "the Docker engine at {} did not answer within 3 s",
                    docker::DOCKER_SOCKET
                ),
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

    /// Every instance of both drivers, with the driver that runs it.
    pub async fn list(&self) -> Vec<(Instance, Kind)> {
        let p = self.process.clone();
        let mut out: Vec<(Instance, Kind)> = tokio::task::spawn_blocking(move || p.list())
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|i| (i, Kind::Process))
            .collect();
        if let Some(d) = &self.docker {
            out.extend(d.list().await.into_iter().map(|i| (i, Kind::Docker)));
        }
        out
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
                tokio::task::spawn_blocking(move || p.start(&s, restarts))
                    .await
                    .map_err(|e| DriverError::Io {
                        app: spec.app.clone(),
                        what: "start".into(),
                        source: std::io::Error::other(e.to_string()),
                    })?
            }
            Kind::Docker => self.docker(&spec.app)?.start(spec, restarts).await,
        }
    }

    pub async fn stop(&self, kind: Kind, app: &str) {
        match kind {
            Kind::Process => {
                let (p, a) = (self.process.clone(), app.to_string());
                let _ = tokio::task::spawn_blocking(move || p.stop(&a, process::STOP_GRACE)).await;
            }
            Kind::Docker => {
                if let Ok(d) = self.docker(app) {
                    let _ = d.stop(app, process::STOP_GRACE).await;
                }
            }
        }
    }

    pub async fn remove(&self, kind: Kind, app: &str) {
        match kind {
            Kind::Process => {
                let (p, a) = (self.process.clone(), app.to_string());
                let _ = tokio::task::spawn_blocking(move || p.remove(&a)).await;
            }
            Kind::Docker => {
                if let Ok(d) = self.docker(app) {
                    let _ = d.remove(app).await;
                }
            }
        }
    }

    /// The app's last `tail` output lines.
    pub async fn logs(&self, kind: Kind, app: &str, tail: usize) -> Vec<String> {
        match kind {
            Kind::Process => {
                let (p, a) = (self.process.clone(), app.to_string());
                tokio::task::spawn_blocking(move || p.logs(&a, tail))
                    .await
                    .ok()
                    .and_then(Result::ok)
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
