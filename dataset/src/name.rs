//! Validated names for datasets and snapshots.
//!
//! Both backends put these names into paths (`dir`) or zfs dataset names (`zfs`), so they are
//! checked once, here, and the backends trust them: ASCII letters, digits and `_ . : -`, starting
//! with a letter or digit, at most [`MAX_NAME_LEN`] bytes. That keeps them valid zfs name
//! components, harmless as file names, and short enough that `root/name/data@snap` stays under
//! zfs's 256-byte name limit.

use std::fmt;
use std::str::FromStr;

use crate::error::DatasetError;

/// Longest dataset or snapshot name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

fn check(what: &'static str, name: &str) -> Result<(), DatasetError> {
    let invalid = |reason: &str| DatasetError::InvalidName {
        what,
        name: name.to_string(),
        reason: reason.to_string(),
    };
    let first = name.chars().next().ok_or_else(|| invalid("it is empty"))?;
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(&format!("it is longer than {MAX_NAME_LEN} bytes")));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(invalid("it must start with a letter or a digit"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(invalid(&format!(
            "{bad:?} is not allowed (use letters, digits, '_', '.', ':' and '-')"
        )));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(String);

        impl $ty {
            /// Checks `name` and wraps it.
            pub fn new(name: impl Into<String>) -> Result<Self, DatasetError> {
                let name = name.into();
                check($what, &name)?;
                Ok(Self(name))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $ty {
            type Err = DatasetError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The name a backend knows a dataset by (flock passes the dataset's name or id).
    DatasetName,
    "dataset"
);
name_type!(
    /// The name of one snapshot of a dataset (unique within the dataset).
    SnapshotName,
    "snapshot"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["db", "db-1", "a.b_c:d", "9lives", &"x".repeat(MAX_NAME_LEN)] {
            assert!(DatasetName::new(ok).is_ok(), "{ok}");
            assert!(SnapshotName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_names_that_would_escape_or_break_zfs() {
        for bad in [
            "",
            ".",
            "..",
            "-x",
            "_x",
            "a/b",
            "a@b",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            let err = DatasetName::new(bad).expect_err(bad);
            assert!(err.to_string().contains("dataset name"), "{err}");
            assert!(SnapshotName::new(bad).is_err(), "{bad}");
        }
    }
}
