//! What every flockctl command prints with: tables, JSON, gRPC errors and exit codes. Imports
//! nothing of the other ctl modules.

use clap::Args;
use serde::Serialize;

/// Exit code of a compare-and-set whose expected value did not match.
pub const EXIT_CAS_FAILED: i32 = 3;
/// Exit code when the key, dataset, snapshot, app or node named does not exist.
pub const EXIT_NOT_FOUND: i32 = 4;

/// `--json`, for commands that take no other argument.
#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// An error that flockctl exits with code 4 for: the named thing does not exist.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// The exit code for an error a command failed with: [`EXIT_NOT_FOUND`] for [`NotFound`], else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<NotFound>().is_some() {
        EXIT_NOT_FOUND
    } else {
        1
    }
}

/// A gRPC error as flockctl reports it: NOT_FOUND becomes [`NotFound`] (exit code 4); anything
/// else one line, the node's message (it already says what to do) and, for an error made on
/// this side, its sources.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::NotFound {
        return NotFound(s.message().to_string()).into();
    }
    // A refused handshake surfaces on the first call as a bare "transport error": the reason
    // is in the sources.
    let mut msg = s.message().to_string();
    let mut cur = std::error::Error::source(&s);
    while let Some(e) = cur {
        let t = e.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        cur = e.source();
    }
    if msg.contains("CertificateExpired") {
        msg.push_str(" (the certificate in this client config has expired: ask an administrator for a new one, flockctl cluster admin-config --out FILE)");
    }
    anyhow::anyhow!("{msg}")
}

/// Prints `v` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Left-aligned columns separated by two spaces. Cells of any width (padded by hand: a format
/// width is at most 65535).
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            line.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(c.chars().count()),
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The most characters of a key or value a table shows (`kv ls`, worker details) (`--json` shows them whole).
pub const CELL_CHARS: usize = 80;

/// A table cell for a key or value: cut to [`CELL_CHARS`] characters, with `…` and the length
/// when cut, and its line breaks and tabs shown as `\n` and `\t` (one row per entry).
pub fn cell(text: &str) -> String {
    let one_line = |s: &str| s.replace('\n', "\\n").replace('\t', "\\t");
    match text.char_indices().nth(CELL_CHARS) {
        None => one_line(text),
        Some((cut, _)) => format!("{}…({} bytes)", one_line(&text[..cut]), text.len()),
    }
}
