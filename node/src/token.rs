//! Join tokens: `FLOCK-1-<CA fingerprint>-<secret>`, after Docker Swarm's `SWMTKN-1-...`.
//!
//! The fingerprint (hex SHA-256 of the cluster CA certificate) lets a joining node check that it
//! talks to the cluster it means to join before it sends anything; the secret admits it (checked
//! inside `ClusterState::apply`, so a rotated secret is refused by every leader alike).

use rand::RngCore;

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
