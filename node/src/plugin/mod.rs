//! The Docker volume plugin: flockd answers Docker's volume plugin protocol on a unix socket
//! (`/run/docker/plugins/NAME.sock`, where the engine discovers plugins by name), so that
//! `docker run -v demo:/data --volume-driver=flock ...` works on any node and the dataset moves
//! to the node that mounts it.
//!
//! - this file: the socket (binding, refusing one another process serves, removal at
//!   shutdown) and the HTTP layer: every endpoint takes JSON whatever the content type, and
//!   answers `{"Err": "..."}` with a message for a Docker user, never hangs.
//! - [`volumes`]: what each call does to the cluster: datasets through Raft, mounts recorded per
//!   Docker mount id ([`flock_scheduler::mount`]), the move before a mount.
//!
//! The protocol: <https://docs.docker.com/engine/extend/plugins_volume/>.

pub mod volumes;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::watch;

pub use volumes::Volumes;

/// Where the Docker engine looks for plugin sockets.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";
/// Overrides [`PLUGIN_DIR`], for tests that check the socket without the engine: the engine
/// scans its directory on every `docker volume ls` and waits on each socket whose flockd is
/// gone, so a test's socket left there slows every later docker command by seconds.
pub const PLUGIN_DIR_ENV: &str = "FLOCK_PLUGIN_DIR";

/// The directory the plugin socket goes in: [`PLUGIN_DIR`] unless [`PLUGIN_DIR_ENV`] says.
pub fn plugin_dir() -> std::path::PathBuf {
    std::env::var_os(PLUGIN_DIR_ENV)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(PLUGIN_DIR))
}
/// The plugin name flockd registers unless told otherwise.
pub const DEFAULT_NAME: &str = "flock";
/// The content type of the plugin protocol.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// Errors of setting the plugin's socket up.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("invalid plugin name {0:?}: use letters, digits, '_', '.' and '-' (Docker's --volume-driver takes it)")]
    InvalidName(String),
    #[error("{path} is served by another process (another flockd with the same --plugin-name?); give this one another --plugin-name, or --no-plugin")]
    InUse { path: PathBuf },
    #[error("cannot serve the Docker volume plugin at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The `docker` group's id, if the group exists (who may use Docker's own socket).
pub fn docker_gid() -> Option<libc::gid_t> {
    let name = std::ffi::CString::new("docker").ok()?;
    // SAFETY: a zeroed `group` is a valid out value; getgrnam_r fills it and points into `buf`.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `grp`.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(grp.gr_gid)
}

/// Who may call the plugin, as for Docker's own socket: root and the `docker` group (0660)
/// when `gid` is given, else root only (0600). Whoever may call it can mount any dataset.
fn restrict_socket(path: &Path, gid: Option<libc::gid_t>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match gid {
        Some(gid) => {
            std::os::unix::fs::lchown(path, None, Some(gid))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A plugin name: what `--volume-driver` takes, and the socket's file name.
pub fn validate_name(name: &str) -> Result<(), PluginError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PluginError::InvalidName(name.to_string()))
    }
}

/// The bound socket of the plugin.
pub struct PluginSocket {
    pub path: PathBuf,
    listener: UnixListener,
    /// The socket file's inode, so that shutdown removes only its own.
    ino: u64,
}

impl PluginSocket {
    /// Binds `DIR/NAME.sock`, replacing a stale socket that no process answers on, refusing one
    /// that another process serves.
    pub fn bind(dir: &Path, name: &str) -> Result<PluginSocket, PluginError> {
        validate_name(name)?;
        let path = dir.join(format!("{name}.sock"));
        let io = |source| PluginError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(PluginError::InUse { path });
            }
            std::fs::remove_file(&path).map_err(io)?;
        }
        let listener = UnixListener::bind(&path).map_err(io)?;
        restrict_socket(&path, docker_gid()).map_err(io)?;
        let ino = std::fs::metadata(&path).map_err(io)?.ino();
        Ok(PluginSocket {
            path,
            listener,
            ino,
        })
    }

    /// Serves the plugin until `shutdown`, then removes the socket file (if it is still ours).
    pub async fn serve(self, volumes: Arc<Volumes>, mut shutdown: watch::Receiver<bool>) {
        let PluginSocket {
            path,
            listener,
            ino,
        } = self;
        // Calls wait in the socket's backlog meanwhile (bounded: Docker would give up).
        let limit = volumes.call_limit();
        match tokio::time::timeout(limit, volumes.forget_stale_mounts()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("recorded Docker mounts of this node not checked: {e}"),
            Err(_) => tracing::warn!(
                "recorded Docker mounts of this node not checked: no answer within {limit:?}"
            ),
        }
        tracing::info!(socket = %path.display(), "serving the Docker volume plugin");
        let r = axum::serve(listener, router(volumes))
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "the Docker volume plugin stopped");
        }
        if std::fs::metadata(&path).is_ok_and(|m| m.ino() == ino) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The plugin's routes over `volumes`.
pub fn router(volumes: Arc<Volumes>) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/VolumeDriver.Capabilities", post(capabilities))
        .route("/VolumeDriver.Create", post(create))
        .route("/VolumeDriver.Remove", post(remove))
        .route("/VolumeDriver.Mount", post(mount))
        .route("/VolumeDriver.Unmount", post(unmount))
        .route("/VolumeDriver.Path", post(path))
        .route("/VolumeDriver.Get", post(get))
        .route("/VolumeDriver.List", post(list))
        .fallback(unknown)
        .with_state(volumes)
}

/// A reply in the protocol's content type.
fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    reply(StatusCode::OK, body)
}

/// A failed call: Docker shows `Err` to its user.
fn err(msg: impl std::fmt::Display) -> Response {
    ok(json!({ "Err": msg.to_string() }))
}

/// At most this many bytes of a caller's text go into an answer (names, options, parser
/// messages), so that an answer never echoes an unbounded request.
pub const ECHO_MAX: usize = 64;

/// `text` for a message: quoted, cut to [`ECHO_MAX`] bytes with its length when longer.
pub fn echo(text: &str) -> String {
    if text.len() <= ECHO_MAX {
        return format!("{text:?}");
    }
    let mut cut = ECHO_MAX;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}... ({} bytes)", &text[..cut], text.len())
}

/// A message from code we do not control (the JSON parser) cut to a few hundred bytes.
fn bounded_message(msg: &str) -> String {
    const MAX: usize = 200;
    if msg.len() <= MAX {
        return msg.to_string();
    }
    let mut cut = MAX;
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} bytes)", &msg[..cut], msg.len())
}

/// Why a call's request is refused before it reaches the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// Not the JSON the call takes (answered with 400 Bad Request).
    Malformed(String),
    /// Well-formed, but a name, option or id is not usable (answered with an `Err`).
    Invalid(String),
}

impl CallError {
    /// The message Docker shows its user.
    pub fn message(&self) -> &str {
        match self {
            CallError::Malformed(m) | CallError::Invalid(m) => m,
        }
    }

    fn into_response(self) -> Response {
        match self {
            CallError::Malformed(m) => reply(StatusCode::BAD_REQUEST, json!({ "Err": m })),
            CallError::Invalid(m) => err(m),
        }
    }
}

/// The request body as `T`; Docker sends JSON under its own content type, so the type is not
/// checked.
fn parse<T: DeserializeOwned>(call: &str, body: &[u8]) -> Result<T, CallError> {
    serde_json::from_slice(body).map_err(|e| {
        CallError::Malformed(format!(
            "flock: malformed {call} request ({}); expected JSON such as {{\"Name\": \"demo\"}}",
            bounded_message(&e.to_string())
        ))
    })
}

/// Decodes and checks a `VolumeDriver.Create` request: the volume's name and its size option.
pub fn decode_create(body: &[u8]) -> Result<(String, Option<u64>), CallError> {
    let req: CreateReq = parse("VolumeDriver.Create", body)?;
    volumes::check_name(&req.name).map_err(CallError::Invalid)?;
    let size = volumes::create_size(&req.name, &req.opts.unwrap_or_default())
        .map_err(CallError::Invalid)?;
    Ok((req.name, size))
}

/// Decodes and checks a request that names a volume (Remove, Path, Get).
pub fn decode_name(call: &str, body: &[u8]) -> Result<String, CallError> {
    let req: NameReq = parse(call, body)?;
    volumes::check_name(&req.name).map_err(CallError::Invalid)?;
    Ok(req.name)
}

/// Decodes and checks a `VolumeDriver.Mount` or `VolumeDriver.Unmount` request: the volume's
/// name and Docker's mount id.
pub fn decode_mount(call: &str, body: &[u8]) -> Result<(String, String), CallError> {
    let req: MountReq = parse(call, body)?;
    volumes::check_name(&req.name).map_err(CallError::Invalid)?;
    volumes::check_mount_id(call, &req.id).map_err(CallError::Invalid)?;
    Ok((req.name, req.id))
}

/// Runs a call with a bound on its time: Docker's client gives up after a minute or two, and
/// an answer that says why is better than a broken pipe.
async fn bounded(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Response>,
) -> Response {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => err(format!(
            "flock: {what} took longer than {}s (is a majority of the cluster's nodes up? `flockctl status`); try again",
            limit.as_secs()
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NameReq {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateReq {
    name: String,
    #[serde(default)]
    opts: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MountReq {
    name: String,
    #[serde(rename = "ID", default)]
    id: String,
}

async fn activate() -> Response {
    ok(json!({ "Implements": ["VolumeDriver"] }))
}

async fn capabilities() -> Response {
    ok(json!({ "Capabilities": { "Scope": "global" } }))
}

async fn unknown(uri: axum::http::Uri) -> Response {
    reply(
        StatusCode::NOT_FOUND,
        json!({ "Err": format!("flock: {} is not a call of the volume plugin protocol", echo(uri.path())) }),
    )
}

async fn create(State(v): State<Arc<Volumes>>, body: Bytes) -> Response {
    let (name, size) = match decode_create(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    bounded(v.call_limit(), "creating the volume", async {
        match v.create(&name, size).await {
            Ok(()) => ok(json!({ "Err": "" })),
            Err(e) => err(e),
        }
    })
    .await
}

async fn remove(State(v): State<Arc<Volumes>>, body: Bytes) -> Response {
    let name = match decode_name("VolumeDriver.Remove", &body) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    bounded(v.call_limit(), "removing the volume", async {
        match v.remove(&name).await {
            Ok(()) => ok(json!({ "Err": "" })),
            Err(e) => err(e),
        }
    })
    .await
}

async fn mount(State(v): State<Arc<Volumes>>, body: Bytes) -> Response {
    let (name, id) = match decode_mount("VolumeDriver.Mount", &body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    // The mount bounds its own wait (and says how far the move got); this is a backstop.
    bounded(
        v.mount_wait + v.call_limit(),
        "mounting the volume",
        async {
            match v.mount(&name, &id).await {
                Ok(p) => ok(json!({ "Mountpoint": p.display().to_string(), "Err": "" })),
                Err(e) => err(e),
            }
        },
    )
    .await
}

async fn unmount(State(v): State<Arc<Volumes>>, body: Bytes) -> Response {
    let (name, id) = match decode_mount("VolumeDriver.Unmount", &body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    bounded(v.call_limit(), "unmounting the volume", async {
        match v.unmount(&name, &id).await {
            Ok(()) => ok(json!({ "Err": "" })),
            Err(e) => err(e),
        }
    })
    .await
}

async fn path(State(v): State<Arc<Volumes>>, body: Bytes) -> Response {
    let name = match decode_name("VolumeDriver.Path", &body) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    bounded(v.call_limit(), "looking the volume up", async {
        match v.path(&name).await {
            Ok(p) => ok(json!({
                "Mountpoint": p.map(|p| p.display().to_string()).unwrap_or_default(),
                "Err": ""
            })),
            Err(e) => err(e),
        }
    })
    .await
}

async fn get(State(v): State<Arc<Volumes>>, body: Bytes) -> Response {
    let name = match decode_name("VolumeDriver.Get", &body) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    bounded(v.call_limit(), "looking the volume up", async {
        match v.get(&name).await {
            Ok(vol) => ok(json!({ "Volume": vol, "Err": "" })),
            Err(e) => err(e),
        }
    })
    .await
}

async fn list(State(v): State<Arc<Volumes>>) -> Response {
    bounded(v.call_limit(), "listing the volumes", async {
        ok(json!({ "Volumes": v.list(), "Err": "" }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names() {
        for good in ["flock", "flock-n1", "a.b_c"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "a/b", "a b", "../x"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let first = PluginSocket::bind(dir.path(), "p").unwrap();
            assert!(matches!(
                PluginSocket::bind(dir.path(), "p"),
                Err(PluginError::InUse { .. })
            ));
            drop(first);
            // The file is left behind, and nobody answers: it is replaced.
            assert!(dir.path().join("p.sock").exists());
            PluginSocket::bind(dir.path(), "p").unwrap();
        });
    }

    #[test]
    fn the_socket_is_for_root_and_the_docker_group_only() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _s = PluginSocket::bind(dir.path(), "p").unwrap();
            let md = std::fs::metadata(dir.path().join("p.sock")).unwrap();
            match docker_gid() {
                Some(gid) => {
                    assert_eq!(md.mode() & 0o7777, 0o660);
                    assert_eq!(md.gid(), gid);
                }
                None => assert_eq!(md.mode() & 0o7777, 0o600),
            }
        });
    }
}
