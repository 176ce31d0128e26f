//! `Join`, the one call open to callers without a certificate: everything is checked before
//! anything is proposed (the rate, every field's size, the token's CA and secret, the name, the
//! address and the CSR), so a failed join writes nothing to the log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use flock_proto::v1::{JoinReply, JoinRequest};
use flock_scheduler::state::{validate_addr, validate_name, MAX_NAME_LEN};
use flock_scheduler::{hash_join_secret, Command, CommandResult};

use super::{unexpected, unreachable_ca, ApiService, Reply};
use crate::cluster::ClusterError;
use crate::pki::Role;
use crate::token::JoinToken;

/// The longest token accepted: `FLOCK-1-` and a 64-digit fingerprint, `-` and a secret of at
/// most 128 hex digits (flockd makes 32).
pub const MAX_TOKEN_LEN: usize = 8 + 64 + 1 + 128;
/// The longest advertised address: a DNS name (253) and `:PORT`.
pub const MAX_ADDR_LEN: usize = 253 + 6;
/// The largest CSR in PEM: an ECDSA one is under 1 KiB; an RSA-4096 one under 2 KiB.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// The metadata key a refusal for too many joins carries: how many milliseconds to wait.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// Joins one source may start in a burst, and how often it gets one more.
const BURST: f64 = 5.0;
const REFILL_EVERY: Duration = Duration::from_secs(1);
/// Sources remembered at most; past that, newcomers share one bucket.
const MAX_SOURCES: usize = 4096;

/// A token bucket per source address (IPv6 by /64, what one host usually has), in a bounded
/// map.
pub struct JoinLimiter {
    buckets: Mutex<Limiter>,
}

struct Limiter {
    by_source: HashMap<IpAddr, Bucket>,
    overflow: Bucket,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Bucket {
            tokens: BURST,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let gained =
            now.saturating_duration_since(self.at).as_secs_f64() / REFILL_EVERY.as_secs_f64();
        self.tokens = (self.tokens + gained).min(BURST);
        self.at = now;
    }

    /// Takes a token, or says how long until there is one.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(REFILL_EVERY.mul_f64(1.0 - self.tokens))
        }
    }
}

fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl Default for JoinLimiter {
    fn default() -> Self {
        JoinLimiter {
            buckets: Mutex::new(Limiter {
                by_source: HashMap::new(),
                overflow: Bucket::full(Instant::now()),
            }),
        }
    }
}

impl JoinLimiter {
    /// Admits one join from `ip` at `now`, or says how long to wait.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut l = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = source_key(ip);
        if !l.by_source.contains_key(&key) && l.by_source.len() >= MAX_SOURCES {
            // Forget the sources that are back to a full bucket: they lose nothing.
            l.by_source.retain(|_, b| {
                b.refill(now);
                b.tokens < BURST
            });
        }
        if l.by_source.len() < MAX_SOURCES {
            l.by_source
                .entry(key)
                .or_insert_with(|| Bucket::full(now))
                .take(now)
        } else {
            l.overflow.take(now)
        }
    }
}

/// At most 32 characters of `s`, and its length when longer: for errors about a field.
fn shown(s: &str) -> String {
    if s.len() <= 32 {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(32).collect();
        format!("{head:?}… ({} bytes)", s.len())
    }
}

fn too_long(field: &str, value: &str, max: usize) -> Status {
    Status::invalid_argument(format!(
        "{field} is {} bytes; at most {max} are accepted (starts {})",
        value.len(),
        shown(value)
    ))
}

impl ApiService {
    pub(super) async fn do_join(&self, req: Request<JoinRequest>) -> Reply<JoinReply> {
        // A node forwarding a join it checked is not rate-limited as a source.
        let from_node = matches!(self.auth.check(&req.peer_certs()), Ok(Role::Node(_)));
        if !from_node {
            if let Some(addr) = req.remote_addr() {
                if let Err(wait) = self.join_limiter.admit(addr.ip(), Instant::now()) {
                    let ms = wait.as_millis().max(1) as u64;
                    let mut s = Status::resource_exhausted(format!(
                        "too many joins from {}; try again in {ms} ms",
                        addr.ip()
                    ));
                    if let Ok(v) = ms.to_string().parse() {
                        s.metadata_mut().insert(RETRY_AFTER_MS, v);
                    }
                    return Err(s);
                }
            }
        }
        let req = req.into_inner();
        // Sizes first, so nothing below handles (or echoes) more than these.
        if req.token.len() > MAX_TOKEN_LEN {
            return Err(too_long("the token", &req.token, MAX_TOKEN_LEN));
        }
        if req.name.len() > MAX_NAME_LEN {
            return Err(too_long("--name", &req.name, MAX_NAME_LEN));
        }
        if req.addr.len() > MAX_ADDR_LEN {
            return Err(too_long("the address", &req.addr, MAX_ADDR_LEN));
        }
        if req.csr_pem.len() > MAX_CSR_LEN {
            return Err(too_long(
                "the certificate signing request",
                &req.csr_pem,
                MAX_CSR_LEN,
            ));
        }
        let token =
            JoinToken::parse(&req.token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if token.ca_fingerprint != self.ca_fingerprint {
            return Err(Status::permission_denied(format!(
                "the token names CA {}, but this cluster's CA is {}",
                token.ca_fingerprint, self.ca_fingerprint
            )));
        }
        let secret_hash = hash_join_secret(&token.secret);
        {
            let a = self.cluster.view.read();
            if a.cluster.cluster_id.is_empty() {
                return Err(Status::unavailable(
                    "this node has not applied the cluster's first entry yet; try again",
                ));
            }
            // Constant time; apply checks again, against the secret in effect then.
            if !a.cluster.join_secret_matches(&secret_hash) {
                return Err(
                    ClusterError::from(flock_scheduler::ApplyError::WrongJoinSecret).into(),
                );
            }
            if !req.name.is_empty() {
                validate_name(&req.name)
                    .map_err(|e| Status::invalid_argument(format!("--name: {e}")))?;
                if a.cluster.node_by_name(&req.name).is_some() {
                    return Err(ClusterError::from(flock_scheduler::ApplyError::NameTaken {
                        name: req.name.clone(),
                    })
                    .into());
                }
            }
        }
        validate_addr(&req.addr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem).map_err(|e| {
            Status::invalid_argument(format!("bad certificate signing request: {e}"))
        })?;
        let Some(ca) = &self.ca else {
            return self.ca_holder()?.join(req).await.map_err(unreachable_ca);
        };
        let cmd = Command::RegisterNodeHashed {
            secret_hash,
            name: (!req.name.is_empty()).then_some(req.name),
            addr: req.addr,
        };
        match self.cluster.propose(cmd).await? {
            CommandResult::NodeRegistered { id, name } => {
                let cert_pem = ca
                    .sign_csr(&req.csr_pem, &Role::Node(id))
                    .map_err(|e| Status::internal(e.to_string()))?;
                tracing::info!(id, %name, "node registered");
                Ok(Response::new(JoinReply {
                    cluster_id: self.cluster.cluster_id.clone(),
                    node_id: id,
                    name,
                    cert_pem,
                    ca_pem: self.ca_pem.clone(),
                }))
            }
            CommandResult::Rejected(e) => Err(ClusterError::from(e).into()),
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_a_burst_then_one_per_interval() {
        let l = JoinLimiter::default();
        let t0 = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..BURST as usize {
            assert!(l.admit(ip, t0).is_ok());
        }
        let wait = l.admit(ip, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= REFILL_EVERY, "{wait:?}");
        // Another source is not affected.
        assert!(l.admit("10.0.0.2".parse().unwrap(), t0).is_ok());
        assert!(l.admit(ip, t0 + wait).is_ok());
        assert!(l.admit(ip, t0 + wait).is_err());
    }

    #[test]
    fn ipv6_sources_count_by_64_prefix() {
        let l = JoinLimiter::default();
        let t0 = Instant::now();
        for i in 0..BURST as u16 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, i + 1));
            assert!(l.admit(ip, t0).is_ok());
        }
        assert!(l.admit("2001:db8:1:2::ffff".parse().unwrap(), t0).is_err());
        assert!(l.admit("2001:db8:1:3::1".parse().unwrap(), t0).is_ok());
    }

    #[test]
    fn the_map_stays_bounded() {
        let l = JoinLimiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 100) {
            let _ = l.admit(IpAddr::V4(std::net::Ipv4Addr::from(i)), t0);
        }
        assert!(l.buckets.lock().unwrap().by_source.len() <= MAX_SOURCES);
        // Once their buckets refill, old sources make room for new ones.
        let later = t0 + REFILL_EVERY * (BURST as u32 + 1);
        assert!(l.admit("192.0.2.1".parse().unwrap(), later).is_ok());
        assert!(l
            .buckets
            .lock()
            .unwrap()
            .by_source
            .contains_key(&"192.0.2.1".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn long_fields_are_shown_bounded() {
        let e = too_long("--name", &"x".repeat(100_000), MAX_NAME_LEN);
        assert!(e.message().len() < 200, "{}", e.message());
        assert!(e.message().contains("100000 bytes"), "{}", e.message());
    }
}
