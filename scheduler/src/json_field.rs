//! A field of a postcard record kept as JSON text: `#[serde(with = "crate::json_field")]`.
//!
//! postcard writes fields by position, without names, so adding a field to a record changes
//! its layout and every older log entry and snapshot must then be read through a frozen copy
//! of the old layout ([`crate::legacy`]). Apps change most often, so from snapshot data
//! format 6 and [`crate::Command::Deploy`] on they are JSON inside the postcard record: a
//! field added with `#[serde(default)]` reads older records as they are, and an older build
//! ignores the fields it does not know.

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    let text = serde_json::to_string(value).map_err(S::Error::custom)?;
    s.serialize_str(&text)
}

pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    serde_json::from_str(&text).map_err(D::Error::custom)
}
