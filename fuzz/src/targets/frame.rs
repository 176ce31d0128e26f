//! The snapshot stream framing (`flock_dataset::frame`): what a node receives over QUIC.
//!
//! The input goes through the sans-IO [`Decoder`] whole, one byte at a time and in 7-byte
//! pieces, and through [`FramedReader`]: all four must agree (payload chunks, error, bytes
//! consumed). A stream the decoder accepts must be exactly what the [`Encoder`] writes for
//! its header and frames.

use std::io::Read;

use flock_dataset::frame::{Decoder, Encoder, FramedReader, StreamHeader, MAGIC};
use flock_dataset::{BackendKind, DatasetName, SnapshotName, StreamSpec};

use super::{Outcome, Target};
use crate::mutate::Rng;

pub fn target() -> Target {
    Target {
        name: "frame",
        about:
            "snapshot stream framing: header, data frames, trailer, abort (dataset/src/frame.rs)",
        run,
        seeds,
        fixup,
        generate: Some(generate),
        dict: &[
            b"FLKSTRM\0",
            b"\x00\x01",
            b"D",
            b"E",
            b"A",
            b"\x00\x00\x00\x00",
            b"\xff\xff\xff\xff",
        ],
        max_len: 64 << 10,
        known: &[],
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    header: Option<StreamHeader>,
    chunks: Vec<Vec<u8>>,
    result: Result<(), String>,
    consumed: u64,
}

fn decode_in_steps(bytes: &[u8], step: usize) -> Decoded {
    let mut dec = Decoder::new();
    let mut chunks = Vec::new();
    let mut pos = 0;
    let mut idle = 0;
    let result = loop {
        if dec.is_done() {
            break Ok(());
        }
        if pos >= bytes.len() {
            break dec.finish().map_err(|e| e.to_string());
        }
        let end = bytes.len().min(pos.saturating_add(step));
        let n = match dec.feed(&bytes[pos..end]) {
            Ok(n) => n,
            Err(e) => break Err(e.to_string()),
        };
        pos += n;
        let mut took = false;
        while let Some(c) = dec.take() {
            assert!(!c.is_empty(), "the decoder released an empty chunk");
            chunks.push(c);
            took = true;
        }
        if n == 0 && !took && !dec.is_done() {
            idle += 1;
            assert!(
                idle < 3,
                "the decoder takes no bytes and releases nothing at offset {pos}"
            );
        } else {
            idle = 0;
        }
    };
    Decoded {
        header: dec.header().cloned(),
        chunks,
        result,
        consumed: dec.offset(),
    }
}

fn run(data: &[u8]) -> Outcome {
    let whole = decode_in_steps(data, usize::MAX);
    for step in [1, 7] {
        let other = decode_in_steps(data, step);
        assert_eq!(
            (&whole.result, &whole.chunks, &whole.header, whole.consumed),
            (&other.result, &other.chunks, &other.header, other.consumed),
            "decoding whole and in {step}-byte pieces disagree"
        );
    }
    // The blocking reader agrees on the payload and on acceptance.
    let reader = FramedReader::new(data)
        .map_err(|e| e.to_string())
        .and_then(|mut r| {
            let mut out = Vec::new();
            r.read_to_end(&mut out).map_err(|e| e.to_string())?;
            Ok((out, r.wire_offset()))
        });
    match (&whole.result, &reader) {
        (Ok(()), Ok((payload, offset))) => {
            assert_eq!(
                *payload,
                whole.chunks.concat(),
                "reader and decoder payloads differ"
            );
            assert_eq!(*offset, whole.consumed);
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "decoder and reader disagree: decoder {a:?}, reader {:?}",
            b.as_ref().map(|(p, o)| (p.len(), o))
        ),
    }
    match whole.result {
        Ok(()) => {
            let header = whole.header.expect("a finished stream has a header");
            // The header: what the encoder writes, but for bytes after the known fields, which
            // a reader ignores (a later version may append fields).
            let (mut enc, head) = Encoder::new(&header);
            let body_len = u32::from_be_bytes([data[10], data[11], data[12], data[13]]) as usize;
            let head_len = 14 + body_len + 32;
            assert_eq!(
                head[..10],
                data[..10],
                "an accepted header's prefix differs"
            );
            assert!(
                data[14..14 + body_len].starts_with(&head[14..head.len() - 32]),
                "an accepted header's fields are not what the encoder writes"
            );
            // The records: exactly what the encoder writes for the frames, up to the checksum.
            let mut bytes = Vec::new();
            for c in &whole.chunks {
                bytes.extend_from_slice(&enc.frame_prefix(c));
                bytes.extend_from_slice(c);
            }
            let (trailer, _) = enc.trailer();
            bytes.extend_from_slice(&trailer[..trailer.len() - 32]);
            let consumed = usize::try_from(whole.consumed).expect("consumed fits");
            assert_eq!(
                bytes,
                &data[head_len..consumed - 32],
                "an accepted stream's records are not what the encoder writes for them"
            );
            Outcome::ok(format!("{} frames", whole.chunks.len().min(3)))
        }
        Err(e) => Outcome::err(e),
    }
}

fn header(kind: BackendKind, base: Option<&str>, limit: Option<u64>) -> StreamHeader {
    let ds = DatasetName::new("db").expect("valid");
    let target = SnapshotName::new("s2").expect("valid");
    StreamHeader {
        kind,
        spec: match base {
            Some(b) => StreamSpec::incremental(ds, SnapshotName::new(b).expect("valid"), target),
            None => StreamSpec::full(ds, target),
        },
        limit,
        size_hint: Some(1000),
    }
}

/// A framed stream of `payload` in frames of `frame_len`, made by the real encoder.
pub fn framed(h: &StreamHeader, payload: &[u8], frame_len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    flock_dataset::frame::write_framed(h, &mut &payload[..], &mut out, frame_len, &mut |_| {})
        .expect("writing to a Vec does not fail");
    out
}

fn seeds() -> Vec<Vec<u8>> {
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut out = vec![
        framed(
            &header(BackendKind::Dir, Some("s1"), Some(1 << 30)),
            &payload,
            700,
        ),
        framed(&header(BackendKind::Zfs, None, None), &payload[..10], 4),
        framed(&header(BackendKind::Dir, None, None), &[], 16),
        framed(&header(BackendKind::Dir, None, Some(5)), b"x", 1),
    ];
    // A stream that ends with an abort record.
    let (mut enc, mut bytes) = Encoder::new(&header(BackendKind::Dir, None, None));
    let p = enc.frame_prefix(b"abc");
    bytes.extend_from_slice(&p);
    bytes.extend_from_slice(b"abc");
    bytes.extend_from_slice(&enc.abort("zfs send failed: pool I/O error"));
    out.push(bytes);
    out
}

/// Recomputes the header's checksum and the trailer's (and, sometimes, its counts).
#[allow(clippy::ptr_arg)] // the signature of `Target::fixup`
fn fixup(data: &mut Vec<u8>, rng: &mut Rng) {
    if data.len() < 14 || data[..8] != MAGIC {
        return;
    }
    let body_len = u32::from_be_bytes([data[10], data[11], data[12], data[13]]) as usize;
    let signed = 14 + body_len;
    if signed + 32 > data.len() {
        return;
    }
    let h = blake3::hash(&data[..signed]);
    data[signed..signed + 32].copy_from_slice(h.as_bytes());
    let mut pos = signed + 32;
    let (mut frames, mut total) = (0u64, 0u64);
    while pos < data.len() {
        match data[pos] {
            b'D' if pos + 5 <= data.len() => {
                let len = u32::from_be_bytes([
                    data[pos + 1],
                    data[pos + 2],
                    data[pos + 3],
                    data[pos + 4],
                ]) as usize;
                pos += 5 + len;
                frames += 1;
                total += len as u64;
            }
            b'E' if pos + 49 <= data.len() => {
                if !rng.one_in(4) {
                    data[pos + 1..pos + 9].copy_from_slice(&total.to_be_bytes());
                    data[pos + 9..pos + 17].copy_from_slice(&frames.to_be_bytes());
                }
                let h = blake3::hash(&data[..pos + 17]);
                data[pos + 17..pos + 49].copy_from_slice(h.as_bytes());
                return;
            }
            _ => return,
        }
    }
}

fn generate(u: &mut arbitrary::Unstructured) -> Vec<u8> {
    let name = |u: &mut arbitrary::Unstructured, fallback: &str| -> String {
        let s: String = u.arbitrary().unwrap_or_default();
        if s.is_empty() {
            fallback.to_string()
        } else {
            s
        }
    };
    let ds =
        DatasetName::new(name(u, "db")).unwrap_or_else(|_| DatasetName::new("db").expect("valid"));
    let target = SnapshotName::new(name(u, "s2"))
        .unwrap_or_else(|_| SnapshotName::new("s2").expect("valid"));
    let base = if u.arbitrary().unwrap_or(false) {
        SnapshotName::new(name(u, "s1")).ok()
    } else {
        None
    };
    let h = StreamHeader {
        kind: if u.arbitrary().unwrap_or(true) {
            BackendKind::Dir
        } else {
            BackendKind::Zfs
        },
        spec: StreamSpec {
            dataset: ds,
            base,
            target,
            deltas: false,
        },
        limit: u.arbitrary().unwrap_or(None),
        size_hint: u.arbitrary().unwrap_or(None),
    };
    let len = u.int_in_range(0..=4096usize).unwrap_or(0);
    let payload = u.bytes(len.min(u.len())).unwrap_or_default().to_vec();
    let frame_len = u.int_in_range(1..=600usize).unwrap_or(64);
    let mut out = framed(&h, &payload, frame_len);
    if u.arbitrary().unwrap_or(false) {
        // Cut before the trailer and abort instead.
        let cut = out.len() - 49;
        out.truncate(cut);
        let reason: String = u.arbitrary().unwrap_or_default();
        out.push(b'A');
        out.extend_from_slice(&(reason.len() as u32).to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
    }
    out
}
