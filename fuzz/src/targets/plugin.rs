//! The Docker volume plugin's JSON requests (node/src/plugin): what any process that can reach
//! the plugin socket sends. The input is `CALL\nBODY` (`VolumeDriver.Create\n{"Name": "a"}`);
//! the body goes through the decoder the HTTP handler uses.
//!
//! Besides not panicking, an answer must never echo unbounded input: every refusal's message
//! stays under [`MAX_ANSWER`] bytes whatever the request's size, and an accepted request's
//! name and id are within the cluster's limits (so nothing oversized is proposed).

use flock_node::plugin::{decode_create, decode_mount, decode_name, CallError};
use flock_scheduler::mount::MAX_MOUNT_ID_LEN;

use super::{Outcome, Target};
use crate::mutate::Rng;

/// The longest refusal message allowed.
pub const MAX_ANSWER: usize = 1024;

const CALLS: &[&str] = &[
    "VolumeDriver.Create",
    "VolumeDriver.Remove",
    "VolumeDriver.Mount",
    "VolumeDriver.Unmount",
    "VolumeDriver.Path",
    "VolumeDriver.Get",
];

pub fn target() -> Target {
    Target {
        name: "plugin",
        about: "Docker volume plugin JSON requests: Create, Remove, Mount, Unmount, Path, Get (node/src/plugin)",
        run,
        seeds,
        fixup,
        generate: Some(generate),
        dict: &[
            b"{",
            b"}",
            b"\"Name\"",
            b"\"ID\"",
            b"\"Opts\"",
            b"\"size\"",
            b": ",
            b", ",
            b"null",
            b"[]",
            b"{}",
            b"\"\\u0000\"",
            b"\"\\ud800\"",
            b"1e999",
            b"-0",
            b"\"1G\"",
            b"\"../x\"",
        ],
        max_len: 16 << 10,
        known: &[],
    }
}

fn run(data: &[u8]) -> Outcome {
    let (call, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"VolumeDriver.Create"[..], data),
    };
    let call = String::from_utf8_lossy(call);
    let call = CALLS
        .iter()
        .find(|c| **c == call)
        .copied()
        .unwrap_or(CALLS[data.len() % CALLS.len()]);
    let result: Result<String, CallError> = match call {
        "VolumeDriver.Create" => decode_create(body).map(|(name, size)| {
            check_accepted(&name, "");
            format!("create {}", size.is_some())
        }),
        "VolumeDriver.Mount" | "VolumeDriver.Unmount" => {
            decode_mount(call, body).map(|(name, id)| {
                check_accepted(&name, &id);
                call.to_string()
            })
        }
        _ => decode_name(call, body).map(|name| {
            check_accepted(&name, "");
            call.to_string()
        }),
    };
    match result {
        Ok(what) => Outcome::ok(what),
        Err(e) => {
            let msg = e.message();
            assert!(
                msg.len() <= MAX_ANSWER,
                "a refusal of a {}-byte request is {} bytes long: {:?}...",
                body.len(),
                msg.len(),
                super::prefix(msg, 200)
            );
            // The label without the echoed part, so that every name is not a new outcome.
            Outcome::err(match e {
                CallError::Malformed(_) => "malformed".to_string(),
                CallError::Invalid(m) => m.split('"').next().unwrap_or("").to_string(),
            })
        }
    }
}

fn check_accepted(name: &str, id: &str) {
    assert!(
        !name.is_empty() && name.len() <= 64,
        "an accepted volume name of {} bytes",
        name.len()
    );
    assert!(
        id.len() <= MAX_MOUNT_ID_LEN,
        "an accepted mount id of {} bytes",
        id.len()
    );
}

fn seeds() -> Vec<Vec<u8>> {
    [
        "VolumeDriver.Create\n{\"Name\": \"demo\", \"Opts\": {\"size\": \"1G\"}}",
        "VolumeDriver.Create\n{\"Name\": \"demo\", \"Opts\": null}",
        "VolumeDriver.Create\n{\"Name\": \"demo\"}",
        "VolumeDriver.Remove\n{\"Name\": \"demo\"}",
        "VolumeDriver.Mount\n{\"Name\": \"demo\", \"ID\": \"0123456789abcdef\"}",
        "VolumeDriver.Unmount\n{\"Name\": \"demo\", \"ID\": \"0123456789abcdef\"}",
        "VolumeDriver.Path\n{\"Name\": \"demo\"}",
        "VolumeDriver.Get\n{\"Name\": \"demo\"}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Puts a known call name first.
fn fixup(data: &mut Vec<u8>, rng: &mut Rng) {
    if rng.one_in(2) {
        let body = match data.iter().position(|&b| b == b'\n') {
            Some(i) => data[i + 1..].to_vec(),
            None => data.clone(),
        };
        let mut out = rng.pick(CALLS).as_bytes().to_vec();
        out.push(b'\n');
        out.extend(body);
        *data = out;
    }
}

/// A request whose fields are `arbitrary` strings, sometimes very long.
fn generate(u: &mut arbitrary::Unstructured) -> Vec<u8> {
    let call = CALLS[u.choose_index(CALLS.len()).unwrap_or(0)];
    let mut s = || -> String {
        let base: String = u.arbitrary().unwrap_or_default();
        let times = *u.choose(&[1usize, 1, 2, 100, 5000]).unwrap_or(&1);
        base.repeat(times)
    };
    let name = s();
    let id = s();
    let key = s();
    let value = s();
    let mut obj = serde_json::Map::new();
    obj.insert("Name".into(), serde_json::Value::String(name));
    obj.insert("ID".into(), serde_json::Value::String(id));
    let mut opts = serde_json::Map::new();
    opts.insert(key, serde_json::Value::String(value));
    obj.insert("Opts".into(), serde_json::Value::Object(opts));
    let mut out = call.as_bytes().to_vec();
    out.push(b'\n');
    out.extend(serde_json::Value::Object(obj).to_string().into_bytes());
    out
}
