//! The edge of the gRPC server: who may send a request body at all.
//!
//! [`AuthLayer`] wraps every service of the server (Raft and API). It decides from the request's
//! path and the client certificate the TLS handshake verified, before tonic reads a byte of the
//! body, so a caller without a certificate of this cluster cannot make a node hold any of its
//! message in memory:
//!
//! - `/flock.v1.Api/Join` is open (a joining node has no certificate yet), with its body cut off
//!   at [`JOIN_MAX_BYTES`];
//! - the Raft service and the API's node-only calls (`Propose`, `ReadIndex`) need a node
//!   certificate of a current member;
//! - every other call needs a member's certificate: a node's, or an admin's.
//!
//! A refused request gets its gRPC status (UNAUTHENTICATED without a certificate,
//! PERMISSION_DENIED for a removed node or the wrong role) and its body is dropped unread. The
//! handlers check again ([`Authorizer`]); this layer only makes sure nobody else gets that far.
//! It reads the certificates from the request's extensions, where tonic puts the TLS connection's
//! details, so it does not depend on how TLS is set up.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

use crate::pki::{Authorizer, PeerCerts, Role};

/// The path of the one call open to callers without a certificate.
pub const JOIN_PATH: &str = "/flock.v1.Api/Join";

/// The largest Join request body accepted, gRPC framing included. A join carries a token (about
/// 110 bytes), a name, an address and a CSR (under 1 KiB); this leaves ample room.
pub const JOIN_MAX_BYTES: usize = 64 * 1024;

/// Calls only nodes make.
fn node_only(path: &str) -> bool {
    path.starts_with("/flock.v1.Raft/")
        || path == "/flock.v1.Api/Propose"
        || path == "/flock.v1.Api/ReadIndex"
}

/// The verified client certificates of the connection a request came on, if any.
pub fn peer_certs<B>(req: &http::Request<B>) -> PeerCerts {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
}

/// Wraps the server's services with [`AuthService`].
#[derive(Clone)]
pub struct AuthLayer {
    auth: Authorizer,
}

impl AuthLayer {
    pub fn new(auth: Authorizer) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Authorizer,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S> AuthService<S> {
    /// Whether the request may reach its service; the status to answer with when not.
    fn admit<B>(&self, req: &http::Request<B>) -> Result<(), Status> {
        let path = req.uri().path();
        if path == JOIN_PATH {
            return Ok(());
        }
        let role = self.auth.check(&peer_certs(req))?;
        if node_only(path) && !matches!(role, Role::Node(_)) {
            return Err(Status::permission_denied("only nodes may call this"));
        }
        Ok(())
    }
}

impl<S> Service<http::Request<Body>> for AuthService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        std::future::Ready<Result<http::Response<Body>, S::Error>>,
        BoxFuture<http::Response<Body>, S::Error>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        use futures::future::Either;
        if let Err(status) = self.admit(&req) {
            tracing::debug!(path = %bounded(req.uri().path()), code = ?status.code(), "refused before reading the body");
            // Dropping `req` drops its body unread: the client's stream is reset.
            return Either::Left(std::future::ready(Ok(status.into_http())));
        }
        let req = if req.uri().path() == JOIN_PATH {
            if let Some(len) = declared_len(&req) {
                if len > JOIN_MAX_BYTES as u64 {
                    return Either::Left(std::future::ready(Ok(
                        too_large(JOIN_MAX_BYTES, len).into_http()
                    )));
                }
            }
            req.map(|b| Body::new(Limited::new(b, JOIN_MAX_BYTES)))
        } else {
            req
        };
        Either::Right(Box::pin(self.inner.call(req)))
    }
}

fn declared_len<B>(req: &http::Request<B>) -> Option<u64> {
    req.headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn too_large(max: usize, len: u64) -> Status {
    Status::resource_exhausted(format!(
        "a join request is at most {max} bytes; this one is {len} or more"
    ))
}

/// At most 64 characters of a path, for logs.
fn bounded(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push_str(&format!("… ({} bytes)", s.len()));
    }
    out
}

/// A body that fails, with RESOURCE_EXHAUSTED, as soon as more than `max` bytes arrive: the
/// excess is never buffered.
struct Limited {
    inner: Body,
    max: usize,
    seen: usize,
    failed: bool,
}

impl Limited {
    fn new(inner: Body, max: usize) -> Self {
        Limited {
            inner,
            max,
            seen: 0,
            failed: false,
        }
    }
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.seen = self.seen.saturating_add(data.len());
                if self.seen > self.max {
                    self.failed = true;
                    return Poll::Ready(Some(Err(too_large(self.max, self.seen as u64))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn body_of(chunks: Vec<usize>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|n| Ok::<_, Status>(http_body::Frame::data(Bytes::from(vec![0u8; n]))));
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn limited_passes_up_to_the_limit_and_fails_past_it() {
        let ok = Limited::new(body_of(vec![1000, 24]), 1024);
        assert_eq!(ok.collect().await.unwrap().to_bytes().len(), 1024);
        let over = Limited::new(body_of(vec![1000, 25, 1 << 20]), 1024);
        let e = over.collect().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("at most 1024 bytes"), "{e}");
    }

    #[test]
    fn node_only_calls() {
        for p in [
            "/flock.v1.Raft/AppendEntries",
            "/flock.v1.Raft/Vote",
            "/flock.v1.Raft/InstallSnapshot",
            "/flock.v1.Raft/AppendStream",
            "/flock.v1.Api/Propose",
            "/flock.v1.Api/ReadIndex",
        ] {
            assert!(node_only(p), "{p}");
        }
        for p in ["/flock.v1.Api/Status", "/flock.v1.Api/KvPut", JOIN_PATH] {
            assert!(!node_only(p), "{p}");
        }
    }

    #[test]
    fn bounded_paths() {
        assert_eq!(bounded("/a"), "/a");
        let long = "x".repeat(100_000);
        assert!(bounded(&long).len() < 100);
    }
}
