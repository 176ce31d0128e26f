//! flock-tls: TLS for every connection flock makes, and the cluster's PKI. The bottom layer that
//! the Raft network, the daemon, the client (flockctl, jepsen, bench) and the snapshot transport
//! share, so each of them trusts and presents certificates the same way.
//!
//! - This root: a TLS identity ([`TlsIdentity`]: the cluster CA, and this side's certificate
//!   and key, replaceable while running so a renewed certificate is used by every new
//!   connection), the client side that checks the peer is the node it meant to reach
//!   ([`connect_peer`], [`peer_channel`]), and the server side's accept loop ([`tls_incoming`]).
//! - [`pki`]: the cluster CA, certificates by role, a node's TLS files, and the private-file
//!   reader and writer (0600) every key and config goes through.
//!
//! Identity lives in a certificate's common name: `node-<id>` or `admin-<label>`. Every node
//! certificate also names [`SERVER_NAME`] with the server-auth usage; admin certificates carry
//! only the client-auth usage, so they cannot serve. A client checks the chain against the CA,
//! the validity period (an expired certificate is refused), the server-auth usage, and then the
//! common name: `node-<id>` of the node it dialled ([`Peer::Node`]), or any node ([`Peer::AnyNode`],
//! flockctl, which may talk to any of them).

pub mod pki;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use flock_scheduler::NodeId;

/// The DNS name on every node certificate, verified by every client.
pub const SERVER_NAME: &str = "flock-node";

/// ALPN of gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// How long a TLS handshake may take on the server before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whom a client connection must reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// This node: its certificate must name `node-<id>`.
    Node(NodeId),
    /// Any node of the cluster (flockctl, a joining node); never an admin certificate.
    AnyNode,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Node(id) => write!(f, "node {id}"),
            Peer::AnyNode => write!(f, "a node"),
        }
    }
}

/// Errors setting up TLS; messages name the input.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct TlsError {
    pub what: String,
    pub reason: String,
}

fn bad(what: &str, reason: impl ToString) -> TlsError {
    TlsError {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

/// The common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad("certificate", e))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .map(str::to_string);
    cn.ok_or_else(|| bad("certificate", "no common name"))
}

/// A DER certificate's validity period (not before, not after).
pub fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad("certificate", e))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let v = cert.validity();
    Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}

/// Whether a common name is a node's (`node-<id>`), and which.
fn node_of(cn: &str) -> Option<NodeId> {
    cn.strip_prefix("node-")?.parse().ok()
}

/// The certificates of a PEM text, in order.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(what, format!("not a PEM certificate: {e:?}")))?;
    if certs.is_empty() {
        return Err(bad(what, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// A TLS identity: the cluster CA every peer must chain to, and (for nodes and admins) the
/// certificate and key this side presents. Clones share the certificate, and
/// [`replace`](Self::replace) changes it for every connection made afterwards (client and
/// server) without rebuilding anything.
#[derive(Clone)]
pub struct TlsIdentity {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    ca: CertificateDer<'static>,
    current: Arc<RwLock<Option<Arc<CertifiedKey>>>>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// An identity trusting the CA in `ca_pem`, presenting `cert_pem` (the end-entity first) and
    /// `key_pem` when given. The CA is sent after the certificate, so that a joining node can
    /// pin it from the handshake.
    pub fn from_pem(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = certs_from_pem(ca_pem, "CA certificate")?.remove(0);
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| bad("CA certificate", e))?;
        let id = TlsIdentity {
            provider,
            roots: Arc::new(roots),
            ca,
            current: Arc::new(RwLock::new(None)),
        };
        if let Some((cert, key)) = identity {
            id.replace(cert, key)?;
        }
        Ok(id)
    }

    /// Presents `cert_pem` and `key_pem` from now on (a renewed certificate). Checks that the
    /// key is the certificate's.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let mut chain = certs_from_pem(cert_pem, "certificate")?;
        if !chain.contains(&self.ca) {
            chain.push(self.ca.clone());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| bad("private key", format!("{e:?}")))?;
        let certified = CertifiedKey::from_der(chain, key, &self.provider)
            .map_err(|e| bad("certificate and key", e))?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(certified));
        Ok(())
    }

    /// The certificate this side presents now (DER), if any.
    pub fn certificate(&self) -> Option<CertificateDer<'static>> {
        self.certified().map(|c| c.cert[0].clone())
    }

    fn certified(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A client configuration that presents this identity and accepts only `peer`.
    pub fn client_config(
        &self,
        peer: Peer,
        alpn: &[&[u8]],
    ) -> Result<rustls::ClientConfig, TlsError> {
        let webpki =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| bad("TLS verifier", e))?;
        let name = ServerName::try_from(SERVER_NAME).map_err(|e| bad("server name", e))?;
        let verifier = Arc::new(PeerVerifier { webpki, peer, name });
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("TLS", e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(config)
    }

    /// A server configuration that presents this identity (whatever it is when a client
    /// connects) and verifies client certificates against the CA (chain, validity, client-auth
    /// usage). With `require_client_cert` false, clients without a certificate are let in (the
    /// handlers refuse them all but Join); a client with a bad or expired one never is.
    pub fn server_config(
        &self,
        require_client_cert: bool,
        alpn: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let builder =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone());
        let builder = if require_client_cert {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        let verifier = builder.build().map_err(|e| bad("TLS client verifier", e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("TLS", e))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(config)
    }
}

/// Hands rustls the identity's current certificate, on either side.
#[derive(Debug)]
struct Resolver(TlsIdentity);

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certified()
    }

    fn has_certs(&self) -> bool {
        self.0.certified().is_some()
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified()
    }
}

/// Verifies a server as the CA's webpki verifier does (chain, validity, server-auth usage, the
/// name [`SERVER_NAME`]), then that its common name is the expected node's.
#[derive(Debug)]
struct PeerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    peer: Peer,
    name: ServerName<'static>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            &self.name,
            ocsp_response,
            now,
        )?;
        let cn = common_name(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let ok = match (self.peer, node_of(&cn)) {
            (Peer::Node(want), Some(id)) => want == id,
            (Peer::AnyNode, Some(_)) => true,
            (_, None) => false,
        };
        if !ok {
            // Reads: certificate not valid for name "node-3"; certificate is only valid for
            // common name "node-2".
            let found: String = cn.chars().take(80).collect();
            let expected = match self.peer {
                Peer::Node(id) => format!("node-{id}"),
                Peer::AnyNode => "node-N".to_string(),
            };
            let expected = ServerName::try_from(expected)
                .map_err(|_| rustls::Error::General("bad expected name".into()))?;
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext {
                    expected,
                    presented: vec![format!("common name {found:?}")],
                },
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// How long a connection attempt to a peer may take (TCP and TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A gRPC channel to `addr` (HOST:PORT) over mutual TLS with `identity`, accepting only `peer`;
/// connected on first use, and reconnected (with the identity's certificate of the moment) when
/// the connection drops.
pub fn peer_channel(
    addr: &str,
    identity: &TlsIdentity,
    peer: Peer,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let (endpoint, connector) = peer_endpoint(addr, identity, peer, connect_timeout)?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// As [`peer_channel`], connected before it returns: an error names the address and why.
pub async fn connect_peer(
    addr: &str,
    identity: &TlsIdentity,
    peer: Peer,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let (endpoint, connector) = peer_endpoint(addr, identity, peer, connect_timeout)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| bad(&format!("cannot reach flockd at {addr}"), error_chain(&e)))
}

/// An error and its sources, joined (tonic's transport error says little alone).
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

fn peer_endpoint(
    addr: &str,
    identity: &TlsIdentity,
    peer: Peer,
    connect_timeout: Duration,
) -> Result<(Endpoint, PeerConnector), TlsError> {
    let shown: String = addr.chars().take(100).collect();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| {
            bad(
                &format!("address {shown:?}"),
                format!("expected HOST:PORT: {e}"),
            )
        })?
        .connect_timeout(connect_timeout)
        // Detect a peer that vanished without closing its connections (a paused or partitioned
        // node) within about two seconds, instead of letting requests hang on the dead connection.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true);
    let connector = PeerConnector {
        addr: addr.to_string(),
        peer,
        tls: tokio_rustls::TlsConnector::from(Arc::new(identity.client_config(peer, &[ALPN_H2])?)),
    };
    Ok((endpoint, connector))
}

/// Dials one peer for tonic: TCP (no Nagle), then TLS that accepts only [`PeerConnector::peer`].
#[derive(Clone)]
struct PeerConnector {
    addr: String,
    peer: Peer,
    tls: tokio_rustls::TlsConnector,
}

type Connecting = Pin<
    Box<
        dyn Future<
                Output = std::io::Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<NoSigPipe>>,
                >,
            > + Send,
    >,
>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for PeerConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<NoSigPipe>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            // The messages keep the words `never_sent` in flock-node looks for: a request whose
            // connection failed was certainly not delivered.
            let addrs = tokio::net::lookup_host(&this.addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("dns error: {}: {e}", this.addr))
            })?;
            let mut last = None;
            let mut tcp = None;
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(s) => {
                        tcp = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let tcp = tcp.ok_or_else(|| {
                let (kind, why) = match last {
                    Some(e) => (e.kind(), e.to_string()),
                    None => (std::io::ErrorKind::NotFound, "no address".to_string()),
                };
                std::io::Error::new(kind, format!("tcp connect error: {}: {why}", this.addr))
            })?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(SERVER_NAME)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = this.tls.connect(name, NoSigPipe(tcp)).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "error trying to connect: TLS with {} (expecting {}) failed: {e}",
                        this.addr, this.peer
                    ),
                )
            })?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// A TCP stream written with `send` only, never `writev`: std sends with MSG_NOSIGNAL, but
/// `writev` has no such flag, and a vectored write to a connection the server already closed
/// (it refused this side's certificate) would raise SIGPIPE, which kills a process that
/// restored its default action (flockctl does, to die quietly on a closed stdout).
pub struct NoSigPipe(TcpStream);

impl tokio::io::AsyncRead for NoSigPipe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NoSigPipe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    // poll_write_vectored: the default, one `poll_write` of the first non-empty buffer.
}

/// TLS connections accepted on `listener` with the server configuration `config`, handshakes
/// run concurrently (each bounded by [`HANDSHAKE_TIMEOUT`]), for tonic's `serve_with_incoming`:
/// tonic reads the client's certificates from these streams (`Request::peer_certs`). Accepted
/// sockets get TCP_NODELAY. Ends when `stop` changes or the consumer goes away.
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> impl futures::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.changed() => return,
                _ = tx.closed() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and the like: wait a little instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
