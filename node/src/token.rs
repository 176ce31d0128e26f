//! Join tokens: `FLOCK-1-<CA fingerprint>-<secret>`, after Docker Swarm's `SWMTKN-1-...`.
//!
//! The fingerprint (hex SHA-256 of the cluster CA certificate) lets a joining node check that it
//! talks to the cluster it means to join before it sends anything; the secret admits it. The
//! replicated state holds only the secret's hash ([`flock_scheduler::hash_join_secret`]): the
//! node that takes a join checks it before proposing anything, and `ClusterState::apply` checks
//! it again (a rotated secret is refused by every leader alike). The plaintext, which `flockctl
//! cluster token` prints, lives only on the CA holder, in a 0600 file ([`JoinSecretFile`]).

use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::pki::{read_private, write_private, PkiError};

const PREFIX: &str = "FLOCK-1-";

/// A parsed join token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_fingerprint: String,
    pub secret: String,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed join token {shown:?}: expected FLOCK-1-<CA fingerprint>-<secret> as printed by `flockctl cluster token`")]
pub struct BadToken {
    shown: String,
}

impl JoinToken {
    pub fn parse(token: &str) -> Result<Self, BadToken> {
        let bad = || BadToken {
            // Never echo a whole secret back into logs or terminals.
            shown: token.chars().take(24).collect::<String>()
                + if token.len() > 24 { "…" } else { "" },
        };
        let rest = token.trim().strip_prefix(PREFIX).ok_or_else(bad)?;
        let (fp, secret) = rest.split_once('-').ok_or_else(bad)?;
        let hex = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit());
        if fp.len() != 64 || !hex(fp) || !hex(secret) {
            return Err(bad());
        }
        Ok(JoinToken {
            ca_fingerprint: fp.to_ascii_lowercase(),
            secret: secret.to_string(),
        })
    }

    pub fn render(&self) -> String {
        format!("{PREFIX}{}-{}", self.ca_fingerprint, self.secret)
    }
}

/// The bytes of randomness in a join secret (128 bits; see `hash_join_secret` for why a fast
/// hash of it is enough).
pub const SECRET_BYTES: usize = 16;

/// A new join secret.
pub fn new_secret() -> String {
    random_hex(SECRET_BYTES)
}

/// The CA holder's copy of the join secret in plain text: `DATA_DIR/tls/join.secret`, 0600.
/// Nothing else on any node holds it.
#[derive(Clone, Debug)]
pub struct JoinSecretFile {
    path: PathBuf,
}

impl JoinSecretFile {
    pub fn new(data_dir: &Path) -> Self {
        JoinSecretFile {
            path: data_dir.join("tls").join("join.secret"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The secret, or `None` when the file does not exist (a cluster made by a flockd that kept
    /// the secret in the replicated state).
    pub fn read(&self) -> Result<Option<String>, PkiError> {
        if !self.path.exists() {
            return Ok(None);
        }
        Ok(Some(read_private(&self.path)?.trim().to_string()))
    }

    /// Replaces the secret (atomically, 0600).
    pub fn write(&self, secret: &str) -> Result<(), PkiError> {
        write_private(&self.path, secret)
    }

    /// The secret in effect: the file's, checked against `state_hash`, the hash the replicated
    /// state holds.
    pub fn current(&self, state_hash: &str) -> Result<String, SecretError> {
        if state_hash.is_empty() {
            return Err(SecretError::NotInitialized);
        }
        let Some(secret) = self.read()? else {
            return Err(SecretError::NotKept {
                path: self.path.display().to_string(),
            });
        };
        if flock_scheduler::hash_join_secret(&secret) != state_hash {
            return Err(SecretError::Stale {
                path: self.path.display().to_string(),
            });
        }
        Ok(secret)
    }
}

/// Why the CA holder cannot tell the join secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the cluster is still initializing (its first entry is not applied yet); try again")]
    NotInitialized,
    #[error("this cluster's join secret was made by an older flockd, which kept it in the replicated state; this node keeps it in {path} only from a rotation on: run `flockctl cluster token --rotate` (once every node runs this version) for a new token; until then the old token keeps working")]
    NotKept { path: String },
    #[error("{path} does not hold the cluster's current join secret (a rotation did not finish); run `flockctl cluster token --rotate` for a new token")]
    Stale { path: String },
    #[error(transparent)]
    Io(#[from] PkiError),
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let t = JoinToken {
            ca_fingerprint: random_hex(32),
            secret: random_hex(16),
        };
        assert_eq!(JoinToken::parse(&t.render()).unwrap(), t);
    }

    #[test]
    fn malformed_tokens_are_refused_without_echoing_the_secret() {
        let fp = "ab".repeat(32);
        for bad in [
            "".to_string(),
            "FLOCK-1-".into(),
            format!("FLOCK-1-{fp}"),
            format!("FLOCK-2-{fp}-cd"),
            format!("FLOCK-1-{fp}-zz"),
            "FLOCK-1-abcd-00".into(),
            format!("SWMTKN-1-{fp}-cd"),
        ] {
            assert!(JoinToken::parse(&bad).is_err(), "{bad} accepted");
        }
        let e = JoinToken::parse(&format!("FLOCK-1-{fp}-0123456789abcdef0123456789abcdefXYZ"))
            .unwrap_err();
        assert!(
            !e.to_string().contains("0123456789abcdef0123456789abcdef"),
            "{e}"
        );
    }
}
