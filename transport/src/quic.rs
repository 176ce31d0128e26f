//! QUIC tuning for snapshot streams: the transport parameters, the endpoint's UDP socket and the
//! client/server configurations flockd's QUIC endpoint uses.
//!
//! quinn's defaults are tuned for "a 100 Mbps link with a 100 ms round trip time" and for the
//! public internet: 1.25 MB stream windows and packets no larger than 1452 bytes. Between the
//! nodes of a cluster (loopback, a LAN, jumbo frames) that leaves most of the throughput on the
//! table. [`QuicTuning::default`] is what flockd uses; every field is public so a benchmark can
//! change one thing at a time (`flock-streams` in bench/ does), and [`QuicTuning::quinn_default`]
//! is quinn's own configuration for comparison.
//!
//! What matters, measured on loopback (bench/RESULTS.md, "Snapshot streams"; `bench/run-streams.sh`):
//! - **Packet size.** Every QUIC packet is encrypted, authenticated and header-protected on its
//!   own and costs a trip through quinn's state machine, so bytes per packet is the main lever.
//!   The endpoint accepts datagrams up to [`MAX_UDP_PAYLOAD`] (quinn's default endpoint config
//!   advertises 1472), and path MTU discovery probes up to that bound: a loopback path grows to
//!   it, an Ethernet path settles at its MTU (probes the interface cannot carry fail locally
//!   with EMSGSIZE and are ignored). Connections start at 1200 bytes, safe on any path.
//! - **GSO batches past 64 KiB.** quinn 0.11 puts up to 10 packets in one GSO send whatever
//!   their size; with packets past 6.5 KB the kernel refuses the send (EMSGSIZE), quinn-udp
//!   drops it silently, and quinn's black-hole detection takes the losses for an MTU problem
//!   and falls back to 1200-byte packets for good. `GsoSplit` cuts such batches; without it,
//!   larger packets and GSO do not mix (jumbo-frame LANs included).
//! - **Socket buffers and windows.** On a fast path the receiving socket overflows whenever
//!   the receiver falls behind by more than its buffer, and bursts of lost 64 KiB packets also
//!   look like an MTU black hole. So the socket asks for 8 MiB buffers (forced past
//!   net.core.{r,w}mem_max when running as root, as flockd does), and the receive windows are
//!   fitted to half of what the kernel granted: the peer can never have more in flight than
//!   the socket holds. The windows are small on purpose: 4 MiB per stream, 8 MiB per
//!   connection. Larger ones (8-16 MiB) cost about 40% more CPU per byte on loopback (more
//!   data in flight than the caches hold, more buffers allocated and freed) and gained nothing;
//!   4 MiB still covers 30 Gbit/s at 1 ms RTT.
//! - GSO/GRO stay on (quinn's default); congestion control stays Cubic (NewReno and quinn's
//!   experimental BBR measured no better); keep-alive every 2 s and a 10 s idle timeout: a
//!   dead peer is noticed within 10 s, a quiet one is not dropped; and stateless resets keyed
//!   from the node's private key, so a restarted node resets its previous process's connections
//!   at once (the jepsen dataset workload found stale connections used for ~30 s before).
//! - **What is left** is quinn's own data path: it copies stream data into each packet and
//!   every received datagram into a fresh buffer, one copy and one allocation per side more than
//!   TLS over TCP, which costs about a third more CPU per byte. On a CPU-bound machine (both
//!   nodes on two cores) that, not the protocol or the network, is the gap to TLS over TCP.
//!   [`crate::lanes`] avoids the rest of the allocation churn on the sending side.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{
    congestion, ClientConfig, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig,
    ServerConfig, TransportConfig, VarInt,
};

use flock_tls::pki::{NodeTls, Peer, PkiError, TlsIdentity};

/// QUIC (quinn) server config: mutual TLS, a client certificate of this CA required;
/// presents `identity`'s certificate of the moment.
pub fn quic_server(identity: &TlsIdentity) -> Result<quinn::ServerConfig, PkiError> {
    let tls = identity.server_config(true, QUIC_ALPNS).map_err(quic_tls)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(quic_tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// QUIC (quinn) client config: accepts only `peer`, presents `identity`'s certificate.
pub fn quic_client(identity: &TlsIdentity, peer: Peer) -> Result<quinn::ClientConfig, PkiError> {
    let tls = identity.client_config(peer, QUIC_ALPNS).map_err(quic_tls)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(quic_tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// ALPN of flock's QUIC streams, as every build speaks them.
pub const QUIC_ALPN: &[u8] = b"flock-stream/1";

/// ALPN of flock's QUIC streams where the receiver of a dataset push also reads the `dir`
/// stream's version 2 (changed files as ranges; issue 20).
pub const QUIC_ALPN_2: &[u8] = b"flock-stream/2";

/// What this build offers and accepts, best first: both sides pick the best they share (the
/// server takes the first of its own list that the client offered), so a peer of an older
/// build, which knows only [`QUIC_ALPN`], gets it.
pub const QUIC_ALPNS: &[&[u8]] = &[QUIC_ALPN_2, QUIC_ALPN];

/// The protocol version a connection agreed on: 2 for [`QUIC_ALPN_2`], else 1.
pub fn protocol_version(conn: &quinn::Connection) -> u32 {
    let agreed = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    match agreed.as_deref() {
        Some(QUIC_ALPN_2) => 2,
        _ => 1,
    }
}

fn quic_tls(e: impl ToString) -> PkiError {
    PkiError::Bad {
        what: "QUIC TLS".into(),
        reason: e.to_string(),
    }
}

/// The largest UDP payload flock's endpoint accepts and probes for: what one IPv4 datagram can
/// carry (65535 less the IP and UDP headers), and what a loopback interface's 64 KiB MTU carries.
pub const MAX_UDP_PAYLOAD: u16 = 65_507;

/// The congestion controller of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    NewReno,
    /// quinn's BBR (documented as experimental).
    Bbr,
}

/// Everything flock tunes in quinn, in one place. See the module documentation for why.
#[derive(Clone, Debug)]
pub struct QuicTuning {
    /// Bytes a peer may send on one stream ahead of what the application read (an upper
    /// bound: see `fit_windows`).
    pub stream_receive_window: u32,
    /// Bytes a peer may send on all streams of a connection ahead of what was read (an upper
    /// bound: see `fit_windows`).
    pub receive_window: u32,
    /// Shrink the receive windows to half the receive buffer the kernel granted the socket, so
    /// a window's worth of datagrams always fits in it: on a fast path (loopback) a receiver
    /// that falls behind otherwise overflows the buffer, and quinn reads the resulting bursts of
    /// lost large packets as an MTU black hole and drops back to 1200-byte packets.
    pub fit_windows: bool,
    /// Bytes this side buffers for sending across all streams of a connection.
    pub send_window: u64,
    /// The packet size a connection starts with (at least 1200).
    pub initial_mtu: u16,
    /// The upper bound of path MTU discovery; `None` turns discovery off.
    pub mtu_discovery_upper_bound: Option<u16>,
    /// The largest UDP payload the endpoint accepts (advertised to peers as
    /// `max_udp_payload_size`; it also sizes the endpoint's receive buffers).
    pub max_udp_payload: u16,
    /// UDP generic segmentation/receive offload (quinn's `enable_segmentation_offload`).
    pub segmentation_offload: bool,
    /// Cut GSO batches larger than one UDP send can carry (see `GsoSplit`); without it,
    /// packets past 6.5 KB and GSO do not mix in quinn 0.11.
    pub split_gso: bool,
    pub congestion: Congestion,
    /// The congestion window a connection starts with, in bytes; `None` for quinn's default
    /// (about 14 KB: ten 1200-byte packets).
    pub initial_window: Option<u64>,
    /// Whether streams of equal priority take turns packet by packet (quinn's default) or each
    /// stream fills packets before the next gets a turn.
    pub send_fairness: bool,
    /// SO_SNDBUF / SO_RCVBUF asked for on the endpoint's socket; `None` leaves the system's
    /// default. The kernel caps it at net.core.{w,r}mem_max unless `force_socket_buffer`.
    pub socket_buffer: Option<usize>,
    /// Past net.core.{w,r}mem_max with SO_SNDBUFFORCE / SO_RCVBUFFORCE when the process may
    /// (CAP_NET_ADMIN, as root); otherwise the capped size is kept.
    pub force_socket_buffer: bool,
    pub keep_alive: Option<Duration>,
    pub idle_timeout: Duration,
    /// Streams a peer may have open at once (unidirectional, and bidirectional).
    pub max_concurrent_streams: u32,
}

impl Default for QuicTuning {
    fn default() -> Self {
        QuicTuning {
            stream_receive_window: 4 << 20,
            receive_window: 8 << 20,
            fit_windows: true,
            send_window: 8 << 20,
            initial_mtu: 1200,
            mtu_discovery_upper_bound: Some(MAX_UDP_PAYLOAD),
            max_udp_payload: MAX_UDP_PAYLOAD,
            segmentation_offload: true,
            split_gso: true,
            congestion: Congestion::Cubic,
            initial_window: None,
            send_fairness: true,
            socket_buffer: Some(8 << 20),
            force_socket_buffer: true,
            keep_alive: Some(Duration::from_secs(2)),
            idle_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
        }
    }
}

/// A QUIC endpoint as opened, with what the kernel granted.
pub struct Opened {
    pub endpoint: Endpoint,
    /// SO_RCVBUF / SO_SNDBUF as the kernel reports them (Linux reports twice what was asked
    /// for, counting its own bookkeeping).
    pub recv_buffer: usize,
    pub send_buffer: usize,
    /// The tuning applied, its windows fitted to `recv_buffer`.
    pub tuning: QuicTuning,
}

impl QuicTuning {
    /// quinn 0.11's own defaults (what an untuned `Endpoint::server` gets), with flock's
    /// keep-alive so only throughput settings differ.
    pub fn quinn_default() -> Self {
        QuicTuning {
            stream_receive_window: 1_250_000,
            receive_window: u32::MAX,
            fit_windows: false,
            send_window: 10_000_000,
            initial_mtu: 1200,
            mtu_discovery_upper_bound: Some(1452),
            max_udp_payload: 1472,
            segmentation_offload: true,
            split_gso: false,
            congestion: Congestion::Cubic,
            initial_window: None,
            send_fairness: true,
            socket_buffer: None,
            force_socket_buffer: false,
            keep_alive: Some(Duration::from_secs(5)),
            idle_timeout: Duration::from_secs(30),
            max_concurrent_streams: 100,
        }
    }

    /// This tuning with its receive windows fitted to a socket receive buffer of
    /// `recv_buffer` bytes (as the kernel reports it), when `fit_windows` is set.
    pub fn fitted(&self, recv_buffer: usize) -> QuicTuning {
        let mut t = self.clone();
        if self.fit_windows {
            let cap = (recv_buffer / 2).clamp(128 << 10, u32::MAX as usize) as u32;
            t.receive_window = t.receive_window.min(cap);
            t.stream_receive_window = t.stream_receive_window.min(t.receive_window);
        }
        t
    }

    /// The transport parameters of a connection.
    pub fn transport(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .send_window(self.send_window)
            .initial_mtu(self.initial_mtu)
            .min_mtu(1200)
            .enable_segmentation_offload(self.segmentation_offload)
            .send_fairness(self.send_fairness)
            .keep_alive_interval(self.keep_alive)
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_streams))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams))
            .max_idle_timeout(Some(
                IdleTimeout::try_from(self.idle_timeout).expect("an idle timeout below 2^62 ms"),
            ))
            .mtu_discovery_config(self.mtu_discovery_upper_bound.map(|bound| {
                let mut m = MtuDiscoveryConfig::default();
                m.upper_bound(bound);
                m
            }));
        match self.congestion {
            Congestion::Cubic => {
                let mut c = congestion::CubicConfig::default();
                if let Some(w) = self.initial_window {
                    c.initial_window(w);
                }
                t.congestion_controller_factory(Arc::new(c));
            }
            Congestion::NewReno => {
                let mut c = congestion::NewRenoConfig::default();
                if let Some(w) = self.initial_window {
                    c.initial_window(w);
                }
                t.congestion_controller_factory(Arc::new(c));
            }
            Congestion::Bbr => {
                let mut c = congestion::BbrConfig::default();
                if let Some(w) = self.initial_window {
                    c.initial_window(w);
                }
                t.congestion_controller_factory(Arc::new(c));
            }
        }
        t
    }

    /// The endpoint configuration: the largest datagram accepted.
    pub fn endpoint_config(&self) -> EndpointConfig {
        let mut e = EndpointConfig::default();
        e.max_udp_payload_size(self.max_udp_payload)
            .expect("max_udp_payload is within 1200..=65527");
        e
    }

    /// The QUIC server configuration: the node's mutual TLS ([`quic_server`]) with
    /// these transport parameters.
    pub fn server_config(&self, identity: &TlsIdentity) -> Result<ServerConfig, PkiError> {
        let mut c = quic_server(identity)?;
        c.transport_config(Arc::new(self.transport()));
        Ok(c)
    }

    /// The QUIC client configuration ([`quic_client`]), accepting only `peer`,
    /// with these transport parameters.
    pub fn client_config(
        &self,
        identity: &TlsIdentity,
        peer: Peer,
    ) -> Result<ClientConfig, PkiError> {
        let mut c = quic_client(identity, peer)?;
        c.transport_config(Arc::new(self.transport()));
        Ok(c)
    }

    /// Opens a QUIC endpoint on UDP `addr` with the node's TLS: the socket with this tuning's
    /// buffers, the receive windows fitted to what the kernel granted, a client configuration
    /// that accepts any node as its default, and accepting connections when `serve`. Must be
    /// called within a tokio runtime.
    pub fn open(&self, addr: SocketAddr, tls: &NodeTls, serve: bool) -> io::Result<Opened> {
        let identity = tls
            .identity()
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.open_with(addr, tls, &identity, serve)
    }

    /// As [`open`](Self::open), presenting `identity` (whose certificate may be replaced later:
    /// the endpoint presents the new one from then on).
    pub fn open_with(
        &self,
        addr: SocketAddr,
        tls: &NodeTls,
        identity: &TlsIdentity,
        serve: bool,
    ) -> io::Result<Opened> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if addr.is_ipv6() {
            // Like std's bind: an IPv6 address means IPv6 only, whatever the system default.
            socket.set_only_v6(true)?;
        }
        if let Some(bytes) = self.socket_buffer {
            set_buffer(&socket, bytes, Direction::Send, self.force_socket_buffer);
            set_buffer(&socket, bytes, Direction::Recv, self.force_socket_buffer);
        }
        socket.bind(&addr.into())?;
        let recv_buffer = socket.recv_buffer_size()?;
        let send_buffer = socket.send_buffer_size()?;
        let tuning = self.fitted(recv_buffer);
        let pki = |e: PkiError| io::Error::other(e.to_string());
        let server = if serve {
            Some(tuning.server_config(identity).map_err(pki)?)
        } else {
            None
        };
        let runtime = Arc::new(quinn::TokioRuntime);
        let udp = quinn::Runtime::wrap_udp_socket(&*runtime, socket.into())?;
        let udp: Arc<dyn quinn::AsyncUdpSocket> = if self.split_gso {
            Arc::new(GsoSplit { inner: udp })
        } else {
            udp
        };
        let mut config = EndpointConfig::new(Arc::new(reset_key(tls)));
        config
            .max_udp_payload_size(tuning.max_udp_payload)
            .expect("max_udp_payload is within 1200..=65527");
        let mut endpoint = Endpoint::new_with_abstract_socket(config, server, udp, runtime)?;
        endpoint
            .set_default_client_config(tuning.client_config(identity, Peer::AnyNode).map_err(pki)?);
        Ok(Opened {
            endpoint,
            recv_buffer,
            send_buffer,
            tuning,
        })
    }
}

/// The key that stateless resets are made with, derived from the node's private key: the same
/// across restarts of a node, so a restarted flockd resets the connections its previous process
/// left open at once (peers see "reset" on their next packet), instead of peers sending into them
/// until the idle timeout.
fn reset_key(tls: &NodeTls) -> ring::hmac::Key {
    use sha2::Digest;
    let secret = sha2::Sha256::new()
        .chain_update(b"flock QUIC stateless reset key v1\0")
        .chain_update(tls.key_pem.as_bytes())
        .finalize();
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Send,
    Recv,
}

/// Asks for a socket buffer of `bytes`; past the system cap with the FORCE option if `force`
/// and permitted. Failures leave the buffer as it was: a small buffer is slower, not wrong.
fn set_buffer(socket: &socket2::Socket, bytes: usize, dir: Direction, force: bool) {
    let (set, get, force_opt) = match dir {
        Direction::Send => (
            socket.set_send_buffer_size(bytes),
            socket.send_buffer_size(),
            libc::SO_SNDBUFFORCE,
        ),
        Direction::Recv => (
            socket.set_recv_buffer_size(bytes),
            socket.recv_buffer_size(),
            libc::SO_RCVBUFFORCE,
        ),
    };
    if let Err(e) = set {
        tracing::debug!(error = %e, ?dir, "cannot set the QUIC socket's buffer");
    }
    // Linux reports twice the size it granted.
    let granted = get.map(|g| g / 2).unwrap_or(0);
    if force && granted < bytes {
        let value = bytes.min(i32::MAX as usize) as libc::c_int;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid pointer to an int.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(socket),
                libc::SOL_SOCKET,
                force_opt,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(
                error = %io::Error::last_os_error(),
                ?dir,
                granted,
                "cannot force the QUIC socket's buffer past the system cap"
            );
        }
    }
}

/// flockd's transport parameters ([`QuicTuning::default`], windows not yet fitted to a socket).
pub fn transport_config() -> TransportConfig {
    QuicTuning::default().transport()
}

/// Opens flockd's QUIC endpoint on UDP `addr` ([`QuicTuning::open`] with the defaults):
/// serving connections, and dialling with the same TLS; returns it with its tuning (windows
/// fitted to the socket), which connections to peers use. Logs the socket buffers granted, and
/// warns when they are too small for full speed.
pub fn bind_endpoint(
    addr: SocketAddr,
    tls: &NodeTls,
    identity: &TlsIdentity,
) -> io::Result<(Endpoint, QuicTuning)> {
    let opened = QuicTuning::default().open_with(addr, tls, identity, true)?;
    let window = opened.tuning.receive_window;
    if opened.recv_buffer < (8 << 20) {
        tracing::warn!(
            recv_buffer = opened.recv_buffer,
            window,
            "the QUIC socket got a small receive buffer, so snapshot streams use small windows; \
             run flockd as root or raise net.core.rmem_max and net.core.wmem_max (e.g. to 8388608)"
        );
    } else {
        tracing::debug!(
            recv_buffer = opened.recv_buffer,
            send_buffer = opened.send_buffer,
            window,
            "QUIC endpoint open"
        );
    }
    Ok((opened.endpoint, opened.tuning))
}

/// The most bytes one UDP send may carry over IPv4; a GSO batch is one send.
const MAX_SEND: usize = MAX_UDP_PAYLOAD as usize;

/// quinn's UDP socket, with GSO batches cut to what one send may carry.
///
/// quinn 0.11 batches up to 10 packets in one GSO send whatever their size, so once path MTU
/// discovery grows packets past 6.5 KB (jumbo frames, loopback) a batch exceeds 64 KiB, the
/// kernel refuses it with EMSGSIZE, quinn-udp drops it silently (it expects EMSGSIZE only
/// for MTU probes), and the losses soon trip quinn's black-hole detection, which sends the
/// connection back to 1200-byte packets. This wrapper sends such a batch in several sends.
#[derive(Debug)]
struct GsoSplit {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
}

impl quinn::AsyncUdpSocket for GsoSplit {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size else {
            return self.inner.try_send(transmit);
        };
        if transmit.contents.len() <= MAX_SEND || segment == 0 {
            return self.inner.try_send(transmit);
        }
        let per_send = (MAX_SEND / segment).max(1) * segment;
        for (i, part) in transmit.contents.chunks(per_send).enumerate() {
            let t = quinn::udp::Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: part,
                segment_size: (part.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            };
            match self.inner.try_send(&t) {
                Ok(()) => {}
                // Nothing sent yet: quinn retries the whole batch once the socket is writable.
                Err(e) if i == 0 => return Err(e),
                // Part of the batch went out: the rest is dropped, as a full queue would drop
                // it, and QUIC's loss recovery resends it. (Retrying the whole batch would send
                // the first part twice.)
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flock_tls::pki::{new_key_and_csr, CertAuthority, Role};

    /// A node's TLS material signed by `ca` (tests of this crate).
    pub(crate) fn node_tls(ca: &CertAuthority, id: u64) -> NodeTls {
        let (key_pem, csr) = new_key_and_csr().unwrap();
        NodeTls {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: ca.sign_csr(&csr, &Role::Node(id)).unwrap(),
            key_pem,
        }
    }

    /// Connects a client endpoint to a server endpoint, each offering `client` / `server`
    /// ALPN lists, and returns the version each side agreed on.
    async fn agreed(client: &[&[u8]], server: &[&[u8]]) -> (u32, u32) {
        let (ca, _) = CertAuthority::create("alpn-test").unwrap();
        let (a, b) = (node_tls(&ca, 1), node_tls(&ca, 2));
        let loopback = "127.0.0.1:0".parse().unwrap();
        let tuning = QuicTuning::default();
        let srv = tuning.open(loopback, &a, true).unwrap().endpoint;
        let cli = tuning.open(loopback, &b, false).unwrap().endpoint;
        let rustls_server = a.identity().unwrap().server_config(true, server).unwrap();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(rustls_server).unwrap();
        srv.set_server_config(Some(ServerConfig::with_crypto(Arc::new(crypto))));
        let rustls_client = b
            .identity()
            .unwrap()
            .client_config(Peer::Node(1), client)
            .unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls_client).unwrap();
        let config = ClientConfig::new(Arc::new(crypto));
        let addr = srv.local_addr().unwrap();
        let (c, s) = tokio::join!(
            async {
                cli.connect_with(config, addr, flock_tls::SERVER_NAME)
                    .unwrap()
                    .await
                    .unwrap()
            },
            async { srv.accept().await.unwrap().await.unwrap() }
        );
        (protocol_version(&c), protocol_version(&s))
    }

    /// Two builds that speak flock-stream/2 agree on it; a peer of an older build (only
    /// flock-stream/1), on either side, gets flock-stream/1.
    #[tokio::test]
    async fn peers_agree_on_the_best_stream_version_both_speak() {
        assert_eq!(agreed(QUIC_ALPNS, QUIC_ALPNS).await, (2, 2));
        assert_eq!(
            agreed(&[QUIC_ALPN], QUIC_ALPNS).await,
            (1, 1),
            "older client"
        );
        assert_eq!(
            agreed(QUIC_ALPNS, &[QUIC_ALPN]).await,
            (1, 1),
            "older server"
        );
    }
}
