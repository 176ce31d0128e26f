//! The cluster's public key infrastructure: a CA made at `flockd init`, one certificate per node
//! and per admin, a node's TLS files, and the TLS configurations every connection of flock uses
//! (gRPC between nodes, flockctl to nodes; QUIC's are in flock-transport). Private files (keys,
//! client configs, join secrets) are written and read here only, 0600.
//!
//! Identity lives in the certificate's common name: `node-<id>` or `admin-<label>`. Every node
//! certificate also names [`SERVER_NAME`] and may serve (server-auth usage); an admin
//! certificate may only be a client. Clients check the CN of the server they reach
//! ([`crate`]): node to node, the node they meant; flockctl, any node. Node ids are
//! never reused, so a removed node is refused by id, and a revoked admin by label (flock-node's
//! `pki::Authorizer`, which needs the replicated state).
//!
//! Certificates expire: nodes after [`NODE_CERT_VALIDITY`], admins after
//! [`ADMIN_CERT_VALIDITY`] (both overridden by the environment variable [`VALIDITY_ENV`] of the
//! CA holder's flockd, for tests). Every handshake refuses an expired certificate, and a node
//! renews its own before it expires (flock-node's `renew`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime};

pub use crate::{Peer, TlsIdentity, SERVER_NAME};

use flock_scheduler::NodeId;

/// How long a node certificate is valid; nodes renew theirs after two thirds of it.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long an admin certificate (`flockctl cluster admin-config`) is valid.
pub const ADMIN_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Overrides both validities (a duration such as `30s`, `20m`, `2h`, `7d`), read by the CA
/// holder's flockd when it signs. Meant for tests of expiry and renewal.
pub const VALIDITY_ENV: &str = "FLOCK_CERT_VALIDITY";

/// How long the certificates a CA signs are valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub node: Duration,
    pub admin: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Validity {
            node: NODE_CERT_VALIDITY,
            admin: ADMIN_CERT_VALIDITY,
        }
    }
}

impl Validity {
    /// The defaults, or both set to [`VALIDITY_ENV`] when it is set.
    pub fn from_env() -> Result<Validity, PkiError> {
        match std::env::var(VALIDITY_ENV) {
            Err(_) => Ok(Validity::default()),
            Ok(v) => {
                let shown: String = v.chars().take(40).collect();
                let d = humantime::parse_duration(v.trim())
                    .ok()
                    .filter(|d| *d >= Duration::from_secs(5))
                    .ok_or_else(|| {
                        bad(
                            VALIDITY_ENV,
                            format!("{shown:?} is not a duration of at least 5s (for example 30s, 20m, 90d)"),
                        )
                    })?;
                Ok(Validity { node: d, admin: d })
            }
        }
    }
}

/// Who a certificate speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Node(NodeId),
    Admin(String),
}

impl Role {
    fn common_name(&self) -> String {
        match self {
            Role::Node(id) => format!("node-{id}"),
            Role::Admin(label) => format!("admin-{label}"),
        }
    }
}

/// Errors of the PKI layer; messages name the file or input and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}); a private key must be private: chmod 600 {path}")]
    KeyTooOpen { path: String, mode: u32 },
    #[error("{what}: {reason}")]
    Bad { what: String, reason: String },
    #[error("cannot reach flockd at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
}

fn bad(what: &str, reason: impl ToString) -> PkiError {
    PkiError::Bad {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

/// Hex SHA-256 of a DER certificate: the CA fingerprint carried in join tokens.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The DER of the first certificate in a PEM text.
pub fn pem_to_der(pem: &str, what: &str) -> Result<CertificateDer<'static>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(what, format!("not a PEM certificate: {e:?}")))
}

/// Roles of the certificates seen lately, by their DER bytes: every RPC is authorized from its
/// connection's certificate, and parsing X.509 for each one cost 2% of a node's CPU under a write
/// load (issue 20). A role is a function of the bytes alone; revocation and removal are checked
/// by the caller on every call, not cached here.
static ROLES: Mutex<Option<std::collections::HashMap<Box<[u8]>, Role>>> = Mutex::new(None);

/// How many certificates' roles [`ROLES`] keeps; it starts afresh when full (a cluster has a few
/// nodes and admins, and only certificates of this cluster get past the TLS handshake).
const ROLES_KEPT: usize = 256;

/// The role named in a DER certificate's common name.
pub fn role_of(der: &[u8]) -> Result<Role, PkiError> {
    let mut roles = ROLES.lock().unwrap_or_else(|p| p.into_inner());
    let roles = roles.get_or_insert_with(Default::default);
    if let Some(role) = roles.get(der) {
        return Ok(role.clone());
    }
    let role = parse_role(der)?;
    if roles.len() >= ROLES_KEPT {
        roles.clear();
    }
    roles.insert(der.into(), role.clone());
    Ok(role)
}

fn parse_role(der: &[u8]) -> Result<Role, PkiError> {
    let cn = crate::common_name(der).map_err(|e| bad("peer certificate", e))?;
    let cn = cn.as_str();
    if let Some(id) = cn.strip_prefix("node-") {
        return id
            .parse()
            .map(Role::Node)
            .map_err(|_| bad("peer certificate", format!("bad node id in {cn:?}")));
    }
    if let Some(label) = cn.strip_prefix("admin-") {
        return Ok(Role::Admin(label.to_string()));
    }
    Err(bad("peer certificate", format!("unknown role {cn:?}")))
}

/// The cluster's certificate authority, held by the node that created the cluster.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    /// How long the certificates it signs are valid.
    pub validity: Validity,
}

impl CertAuthority {
    /// A new CA for cluster `cluster_id`; returns it and its private key in PEM.
    pub fn create(cluster_id: &str) -> Result<(CertAuthority, String), PkiError> {
        let key = KeyPair::generate().map_err(|e| bad("CA key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("flock cluster {cluster_id} CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| bad("CA certificate", e))?;
        let key_pem = key.serialize_pem();
        Ok((
            CertAuthority {
                issuer: Issuer::new(params, key),
                cert_pem: cert.pem(),
                validity: Validity::from_env()?,
            },
            key_pem,
        ))
    }

    /// The CA kept in PEM files.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<CertAuthority, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad("CA key", e))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| bad("CA certificate", e))?;
        Ok(CertAuthority {
            issuer,
            cert_pem: cert_pem.to_string(),
            validity: Validity::from_env()?,
        })
    }

    /// Signs a certificate for `role` over the public key of a PEM certificate signing request.
    /// Only the key is taken from the request; names and usages are the CA's choice.
    pub fn sign_csr(&self, csr_pem: &str, role: &Role) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| bad("certificate signing request", e))?;
        self.issue(&csr.public_key, role)
    }

    /// Signs a certificate for `role` over `public_key`, valid from a little before now (for
    /// clocks slightly behind) for the role's [`Validity`]. A node's may serve and be a client
    /// and names [`SERVER_NAME`]; an admin's may only be a client.
    pub fn issue(&self, public_key: &impl PublicKeyData, role: &Role) -> Result<String, PkiError> {
        let (names, usages, lifetime) = match role {
            Role::Node(_) => (
                vec![SERVER_NAME.to_string()],
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
                self.validity.node,
            ),
            Role::Admin(_) => (
                vec![],
                vec![ExtendedKeyUsagePurpose::ClientAuth],
                self.validity.admin,
            ),
        };
        let mut params = CertificateParams::new(names).map_err(|e| bad("certificate", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, role.common_name());
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        let now = SystemTime::now();
        let skew = (lifetime / 10).min(Duration::from_secs(300));
        params.not_before = time::OffsetDateTime::from(now - skew);
        params.not_after = time::OffsetDateTime::from(now + lifetime);
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| bad("certificate", e))?;
        Ok(cert.pem())
    }
}

/// A fresh key pair and a certificate signing request for it, in PEM.
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(|e| bad("key", e))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| bad("certificate signing request", e))?;
    let csr_pem = csr
        .pem()
        .map_err(|e| bad("certificate signing request", e))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename) as a 0600 file, whatever the
/// umask: the one writer of private files (keys, configs, the node's records).
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A temp file left by an older flockd keeps its mode through open: set it.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Writes a file readable by its owner only (0600), atomically ([`write_private_atomic`]).
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_private_atomic(path, contents.as_bytes()).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes a public file (certificates), atomically.
pub fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Reads a private file, refusing one that group or others can read.
pub fn read_private(path: &Path) -> Result<String, PkiError> {
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(PkiError::KeyTooOpen {
            path: path.display().to_string(),
            mode: mode & 0o777,
        });
    }
    fs::read_to_string(path).map_err(io)
}

/// Reads a public file (certificates).
pub fn read_public(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// A node's TLS material, in its data dir under `tls/`.
#[derive(Clone)]
pub struct NodeTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Paths of a node's TLS files.
pub struct TlsPaths {
    pub dir: PathBuf,
}

impl TlsPaths {
    pub fn new(data_dir: &Path) -> Self {
        TlsPaths {
            dir: data_dir.join("tls"),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.dir.join("node.crt")
    }
    pub fn node_key(&self) -> PathBuf {
        self.dir.join("node.key")
    }
}

impl NodeTls {
    /// Loads a node's TLS files, refusing a key that others can read.
    pub fn load(paths: &TlsPaths) -> Result<NodeTls, PkiError> {
        Ok(NodeTls {
            ca_pem: read_public(&paths.ca_cert())?,
            cert_pem: read_public(&paths.node_cert())?,
            key_pem: read_private(&paths.node_key())?,
        })
    }

    /// Writes a node's TLS files (the key 0600).
    pub fn save(&self, paths: &TlsPaths) -> Result<(), PkiError> {
        fs::create_dir_all(&paths.dir).map_err(|source| PkiError::Io {
            path: paths.dir.display().to_string(),
            source,
        })?;
        fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            PkiError::Io {
                path: paths.dir.display().to_string(),
                source,
            }
        })?;
        write_public(&paths.ca_cert(), &self.ca_pem)?;
        write_public(&paths.node_cert(), &self.cert_pem)?;
        write_private(&paths.node_key(), &self.key_pem)
    }

    /// Fingerprint of the cluster CA.
    pub fn ca_fingerprint(&self) -> Result<String, PkiError> {
        Ok(fingerprint(&pem_to_der(&self.ca_pem, "CA certificate")?))
    }

    /// This node's TLS identity, for every connection it makes and serves (the CA is sent after
    /// the certificate, so a joining node can pin it). Replace its certificate on renewal.
    pub fn identity(&self) -> Result<TlsIdentity, PkiError> {
        TlsIdentity::from_pem(&self.ca_pem, Some((&self.cert_pem, &self.key_pem)))
            .map_err(|e| bad("node TLS", e))
    }

    /// gRPC server TLS: presents `identity`'s certificate of the moment, accepts client
    /// certificates signed by the CA (chain, expiry, client-auth usage), and lets clients without
    /// one reach the handlers, which refuse them with "not a member" (all but Join).
    pub fn grpc_server(identity: &TlsIdentity) -> Result<rustls::ServerConfig, PkiError> {
        identity
            .server_config(false, &[crate::ALPN_H2])
            .map_err(|e| bad("gRPC TLS", e))
    }

    /// rustls server config for node-to-node streams: a client certificate of this CA required
    /// (mutual TLS), no ALPN. The QUIC endpoint's is the same with flock-transport's `QUIC_ALPN`; over TCP it
    /// is what stream benchmarks compare QUIC against.
    pub fn tls13_server(&self) -> Result<rustls::ServerConfig, PkiError> {
        self.identity()?
            .server_config(true, &[])
            .map_err(|e| bad("stream TLS", e))
    }

    /// rustls client config for node-to-node streams: accepts any node of the CA, presents this
    /// node's certificate; no ALPN.
    pub fn tls13_client(&self) -> Result<rustls::ClientConfig, PkiError> {
        self.identity()?
            .client_config(Peer::AnyNode, &[])
            .map_err(|e| bad("stream TLS", e))
    }
}

/// Connects to `addr` over TLS without trusting anything, only to read the certificates the server
/// presents, and returns the one whose fingerprint is `pin`: the CA a join token names. Nothing
/// is sent but the TLS handshake.
pub async fn fetch_pinned_ca(addr: &str, pin: &str) -> Result<String, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen = Arc::new(CaptureChain {
        chain: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS", e))?
        .dangerous()
        .with_custom_certificate_verifier(seen.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| PkiError::Unreachable {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| bad("server name", e))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = connector.connect(name, tcp).await;
    let chain = seen.chain.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if chain.is_empty() {
        return Err(bad(
            addr,
            match handshake {
                Err(e) => format!("TLS handshake failed: {e}"),
                Ok(_) => "presented no certificate".to_string(),
            },
        ));
    }
    for der in &chain {
        if fingerprint(der) == pin {
            return Ok(pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())));
        }
    }
    Err(bad(
        addr,
        format!(
            "it belongs to another cluster: its CA fingerprint is {}, the token names {}",
            chain.last().map(|d| fingerprint(d)).unwrap_or_default(),
            pin
        ),
    ))
}

/// A certificate verifier that trusts nothing and records what the server presented; the
/// handshake signatures are still checked so the chain is at least the server's own.
#[derive(Debug)]
struct CaptureChain {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for CaptureChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_role_and_chain_to_the_ca() {
        let (ca, key_pem) = CertAuthority::create("c0ffee").unwrap();
        let ca = CertAuthority::load(&ca.cert_pem, &key_pem).unwrap();
        let (_, csr) = new_key_and_csr().unwrap();
        let node = ca.sign_csr(&csr, &Role::Node(7)).unwrap();
        assert_eq!(
            role_of(&pem_to_der(&node, "n").unwrap()).unwrap(),
            Role::Node(7)
        );
        let admin = ca.sign_csr(&csr, &Role::Admin("ops".into())).unwrap();
        assert_eq!(
            role_of(&pem_to_der(&admin, "a").unwrap()).unwrap(),
            Role::Admin("ops".into())
        );
        assert!(ca.sign_csr("garbage", &Role::Node(1)).is_err());
    }

    /// Remembered roles come back the same, each certificate its own; a certificate that does
    /// not parse is refused every time, and nothing grows past ROLES_KEPT.
    #[test]
    fn remembered_roles_are_each_certificates_own() {
        let (ca, _) = CertAuthority::create("c0ffee").unwrap();
        let (_, csr) = new_key_and_csr().unwrap();
        let ders: Vec<(Vec<u8>, Role)> = [Role::Node(3), Role::Admin("x".into()), Role::Node(4)]
            .into_iter()
            .map(|r| {
                (
                    pem_to_der(&ca.sign_csr(&csr, &r).unwrap(), "c")
                        .unwrap()
                        .to_vec(),
                    r,
                )
            })
            .collect();
        for _ in 0..3 {
            for (der, role) in &ders {
                assert_eq!(role_of(der).unwrap(), *role);
            }
            assert!(role_of(b"not a certificate").is_err());
        }
        for i in 0..(ROLES_KEPT + 10) {
            let mut der = ders[0].0.clone();
            der.extend_from_slice(&i.to_le_bytes());
            // Trailing bytes after the certificate: refused or parsed, never kept past the limit.
            let _ = role_of(&der);
        }
        let kept = ROLES.lock().unwrap().as_ref().map_or(0, |m| m.len());
        assert!(kept <= ROLES_KEPT, "{kept} roles kept");
    }

    #[test]
    fn admins_are_clients_only_and_certificates_expire() {
        let (ca, _) = CertAuthority::create("c0ffee").unwrap();
        let (_, csr) = new_key_and_csr().unwrap();
        let usages = |pem: &str| {
            let der = pem_to_der(pem, "c").unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let eku = cert.extended_key_usage().unwrap().unwrap().value.clone();
            let (from, to) = crate::validity(&der).unwrap();
            (
                eku.server_auth,
                eku.client_auth,
                to.duration_since(from).unwrap(),
            )
        };
        let skew = |d: Duration| (d / 10).min(Duration::from_secs(300));
        let node = ca.sign_csr(&csr, &Role::Node(3)).unwrap();
        assert_eq!(
            usages(&node),
            (true, true, NODE_CERT_VALIDITY + skew(NODE_CERT_VALIDITY))
        );
        let admin = ca.sign_csr(&csr, &Role::Admin("ops".into())).unwrap();
        assert_eq!(
            usages(&admin),
            (false, true, ADMIN_CERT_VALIDITY + skew(ADMIN_CERT_VALIDITY))
        );
    }

    #[test]
    fn open_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        write_private(&p, "secret").unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_private(&p).unwrap(), "secret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_private(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
