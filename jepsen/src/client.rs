//! Reaching a node's API over mutual TLS, and reading what a failed call means for the history.
//!
//! Every connection the harness makes goes through [`connect`], with a [`ClientConfig`] made
//! from the cluster's admin config (`admin.conf`, written by `flockd init` and read the way
//! flockctl reads it), so how the harness authenticates is decided here and nowhere else.

use std::error::Error as _;
use std::path::Path;
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use flock_proto::v1::api_client::ApiClient;

/// A client of one node's `flock.v1.Api`.
pub type Api = ApiClient<Channel>;

/// How the harness connects to nodes.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long a connection attempt may take (TCP, TLS and HTTP/2 handshakes).
    pub connect_timeout: Duration,
    /// The cluster's CA and an admin certificate and key.
    pub tls: ClientTlsConfig,
}

impl ClientConfig {
    /// From an admin config file (`DATA_DIR/admin.conf` of the node that ran `flockd init`).
    pub fn from_admin_config(path: &Path) -> Result<ClientConfig, ConnectError> {
        let admin = flock_client::ClientConfig::load(path).map_err(|e| ConnectError::Config {
            path: path.display().to_string(),
            reason: format!("{e:#}"),
        })?;
        Ok(ClientConfig {
            connect_timeout: Duration::from_secs(1),
            tls: admin.tls(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad node address {addr:?} (expected HOST:PORT): {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("cannot reach flockd at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("client config {path}: {reason}")]
    Config { path: String, reason: String },
}

/// Connects to the API at `addr` (HOST:PORT). Nothing is sent on the connection before it
/// returns, so an error here means no request was made.
pub async fn connect(addr: &str, cfg: &ClientConfig) -> Result<Api, ConnectError> {
    let bad = |reason: String| ConnectError::BadAddress {
        addr: addr.to_string(),
        reason,
    };
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| bad(e.to_string()))?
        .tls_config(cfg.tls.clone())
        .map_err(|e| bad(error_chain(&e)))?
        .connect_timeout(cfg.connect_timeout)
        .tcp_nodelay(true);
    let unreachable = |reason: String| ConnectError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    // The connect timeout covers TCP only; a paused node accepts TCP but never answers.
    let channel = tokio::time::timeout(cfg.connect_timeout, endpoint.connect())
        .await
        .map_err(|_| unreachable(format!("no answer within {:?}", cfg.connect_timeout)))?
        .map_err(|e| unreachable(error_chain(&e)))?;
    Ok(ApiClient::new(channel))
}

/// What a failed call tells about its effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Certainly not applied: never sent, or the node answered that it did not apply it.
    Definite(String),
    /// May or may not have been applied.
    Indefinite(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Definite(m) | Failure::Indefinite(m) => m,
        }
    }
}

/// Reads a gRPC status the way flock defines its codes: UNAVAILABLE (no leader reachable),
/// FAILED_PRECONDITION, INVALID_ARGUMENT and the other refusals mean nothing was applied;
/// DEADLINE_EXCEEDED means the outcome is unknown. A status made by the client's transport
/// (it carries a source error) is definite only when the connection was never made.
pub fn classify(status: &tonic::Status) -> Failure {
    use tonic::Code;
    let msg = format!("{:?}: {}", status.code(), status.message());
    if status.source().is_some() {
        // Made on this side: a connect failure sent nothing; anything else may have been sent.
        let mut cur = status.source();
        while let Some(e) = cur {
            if e.downcast_ref::<tonic::ConnectError>().is_some() {
                return Failure::Definite(format!("not sent: {msg}"));
            }
            cur = e.source();
        }
        return Failure::Indefinite(format!("transport: {msg}"));
    }
    match status.code() {
        Code::Unavailable
        | Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::OutOfRange
        | Code::Unimplemented => Failure::Definite(msg),
        _ => Failure::Indefinite(msg),
    }
}

/// An error and its sources, joined (flockctl's way).
pub use flock_client::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_follow_flocks_contract() {
        assert!(matches!(
            classify(&tonic::Status::unavailable("no leader")),
            Failure::Definite(_)
        ));
        assert!(matches!(
            classify(&tonic::Status::failed_precondition("not leader")),
            Failure::Definite(_)
        ));
        assert!(matches!(
            classify(&tonic::Status::deadline_exceeded("outcome unknown")),
            Failure::Indefinite(_)
        ));
        assert!(matches!(
            classify(&tonic::Status::internal("boom")),
            Failure::Indefinite(_)
        ));
    }

    #[test]
    fn transport_errors_are_definite_only_before_sending() {
        let refused =
            tonic::Status::from_error(Box::new(tonic::ConnectError("connection refused".into())));
        assert!(
            matches!(classify(&refused), Failure::Definite(_)),
            "{refused:?}"
        );
        let reset = tonic::Status::from_error("connection reset".into());
        assert!(
            matches!(classify(&reset), Failure::Indefinite(_)),
            "{reset:?}"
        );
    }

    #[tokio::test]
    async fn connect_names_the_address() {
        let cfg = ClientConfig {
            connect_timeout: Duration::from_millis(300),
            tls: ClientTlsConfig::new(),
        };
        let e = connect("127.0.0.1:1", &cfg)
            .await
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("127.0.0.1:1")));
        let e = connect("not an address", &cfg)
            .await
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("bad node address")));
    }

    #[test]
    fn a_missing_admin_config_is_named() {
        let e = ClientConfig::from_admin_config(Path::new("/nonexistent/admin.conf"))
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("/nonexistent/admin.conf")));
    }
}
