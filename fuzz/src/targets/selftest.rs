//! Targets with planted bugs, for the fuzzer's own tests (not in `list` or `all`): an input
//! starting with `P` panics, `H` hangs, `M` allocates without bound. The mutations find each
//! from the seed `ok` within a second or two.

use super::{Outcome, Target};
use crate::mutate::Rng;

fn seeds() -> Vec<Vec<u8>> {
    vec![b"ok".to_vec()]
}

fn fixup(_: &mut Vec<u8>, _: &mut Rng) {}

fn planted(data: &[u8], bug: u8) -> Outcome {
    if data.first() == Some(&bug) {
        match bug {
            b'P' => panic!("planted panic"),
            b'H' => loop {
                std::thread::sleep(std::time::Duration::from_millis(10));
            },
            _ => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Reserved, not touched: the allocator counts it at once.
                    hoard.push(Vec::with_capacity(64 << 20));
                    std::hint::black_box(&hoard);
                }
            }
        }
    }
    Outcome::ok(data.len().min(3))
}

fn target(name: &'static str, run: fn(&[u8]) -> Outcome) -> Target {
    Target {
        name,
        about: "a planted bug, for the fuzzer's own tests",
        run,
        seeds,
        fixup,
        generate: None,
        dict: &[b"P", b"H", b"M"],
        max_len: 64,
        known: &[],
    }
}

pub fn targets() -> Vec<Target> {
    vec![
        target("selftest_panic", |d| planted(d, b'P')),
        target("selftest_hang", |d| planted(d, b'H')),
        target("selftest_memory", |d| planted(d, b'M')),
    ]
}
