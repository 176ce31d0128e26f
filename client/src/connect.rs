//! Connecting to a node's API over mutual TLS, as flockctl and a joining node do.

use std::time::{Duration, Instant};

use tonic::transport::Channel;

use flock_proto::v1::api_client::ApiClient;
use flock_tls::{Peer, TlsIdentity};

use crate::ClientError;

/// An error and its sources, joined: tonic's top-level transport error says little alone.
pub use flock_tls::error_chain;

/// The largest reply a client accepts (a big cluster's status or dataset list).
pub const MAX_REPLY: usize = 64 * 1024 * 1024;

/// Connects to the API at `addr` (HOST:PORT) over TLS, presenting `tls`, and accepting any node
/// of its CA as the server; fails with a message naming the address.
pub async fn connect(
    addr: &str,
    tls: &TlsIdentity,
    timeout: Duration,
) -> Result<ApiClient<Channel>, ClientError> {
    let channel = flock_tls::connect_peer(addr, tls, Peer::AnyNode, timeout).await?;
    Ok(ApiClient::new(channel).max_decoding_message_size(MAX_REPLY))
}

/// Runs `attempt` until it succeeds or `total` has passed, with exponential backoff (100 ms
/// doubling to 2 s); then fails with the last error and how long it tried. `retry` says which
/// errors are worth another attempt.
pub async fn with_backoff<T, F, Fut>(
    what: &str,
    total: Duration,
    retry: impl Fn(&anyhow::Error) -> bool,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + total;
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if !retry(&e) => return Err(e),
            Err(e) if Instant::now() + delay >= deadline => {
                anyhow::bail!("{e:#} (gave up after {attempts} attempts over {total:?}); check {what} and that flockd runs there")
            }
            Err(e) => {
                tracing::info!(error = %format!("{e:#}"), "retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backoff_stops_at_a_final_error_and_names_what_to_check() {
        let mut n = 0;
        let e = with_backoff(
            "the address",
            Duration::from_millis(250),
            |e| e.to_string() == "again",
            || {
                n += 1;
                async { Err::<(), _>(anyhow::anyhow!("again")) }
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(n >= 2, "{n} attempts");
        assert!(
            e.contains("gave up after") && e.contains("check the address"),
            "{e}"
        );
        let e = with_backoff(
            "x",
            Duration::from_secs(5),
            |_| false,
            || async { Err::<(), _>(anyhow::anyhow!("final")) },
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(e, "final");
    }
}
