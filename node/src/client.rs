//! Connecting to a node's API, as flockctl and a joining node do.

use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use flock_proto::v1::api_client::ApiClient;

/// Connects to the API at `addr` (HOST:PORT), failing with a message naming the address.
pub async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<ApiClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| anyhow::anyhow!("bad address {addr:?} (expected HOST:PORT): {e}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach flockd at {addr}: {}", error_chain(&e)))?;
    Ok(ApiClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// Connects to `addr`, retrying with exponential backoff (100 ms doubling to 2 s) until `total`
/// has passed; then fails naming the address and the last error.
pub async fn connect_with_retry(addr: &str, total: Duration) -> anyhow::Result<ApiClient<Channel>> {
    let deadline = Instant::now() + total;
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match connect(addr, Duration::from_secs(2)).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() + delay >= deadline => {
                anyhow::bail!("{e} (gave up after {attempts} attempts over {total:?}); check the address and that flockd runs there")
            }
            Err(e) => {
                tracing::info!(error = %e, "retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// An error and its sources, joined: tonic's top-level transport error says little alone.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
