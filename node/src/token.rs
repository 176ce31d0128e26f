//! Join tokens: `FLOCK-1-<cluster id>-<secret>`.
//!
//! The cluster id lets a joining node check it is talking to the cluster it means to join; the
//! secret admits it (checked by the leader, inside `ClusterState::apply`).

use rand::RngCore;

const PREFIX: &str = "FLOCK-1-";

/// A parsed join token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub cluster_id: String,
    pub secret: String,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed join token {shown:?}: expected FLOCK-1-<cluster id>-<secret> as printed by `flockctl cluster token`")]
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
        let (cluster_id, secret) = rest.split_once('-').ok_or_else(bad)?;
        let hex = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit());
        if !hex(cluster_id) || !hex(secret) {
            return Err(bad());
        }
        Ok(JoinToken {
            cluster_id: cluster_id.to_string(),
            secret: secret.to_string(),
        })
    }

    pub fn render(&self) -> String {
        format!("{PREFIX}{}-{}", self.cluster_id, self.secret)
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
            cluster_id: random_hex(8),
            secret: random_hex(16),
        };
        assert_eq!(JoinToken::parse(&t.render()).unwrap(), t);
    }

    #[test]
    fn malformed_tokens_are_refused_without_echoing_the_secret() {
        for bad in [
            "",
            "FLOCK-1-",
            "FLOCK-1-abc",
            "FLOCK-2-ab-cd",
            "FLOCK-1-ab-zz",
            "SWMTKN-1-ab-cd",
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad} accepted");
        }
        let e = JoinToken::parse("FLOCK-1-abcd-0123456789abcdef0123456789abcdefXYZ").unwrap_err();
        assert!(
            !e.to_string().contains("0123456789abcdef0123456789abcdef"),
            "{e}"
        );
    }
}
