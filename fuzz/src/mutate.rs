//! Mutations of an input, and the deterministic random numbers they draw.

/// splitmix64: small, fast, and the same sequence on every platform and version.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    /// A length biased towards small values (most interesting edits are short).
    pub fn small_len(&mut self, max: usize) -> usize {
        let max = max.max(1);
        match self.below(4) {
            0 => 1,
            1 => 1 + self.below(max.min(8)),
            2 => 1 + self.below(max.min(64)),
            _ => 1 + self.below(max),
        }
    }
}

/// Values that make length and count fields interesting.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX,
];

/// Applies one to four random mutations to `data` (in place), keeping it within `max_len`.
/// `other` is another corpus input, for splices; `dict` holds tokens of the target's format.
pub fn mutate(data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]], rng: &mut Rng, max_len: usize) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        mutate_once(data, other, dict, rng, max_len);
    }
    data.truncate(max_len);
}

fn mutate_once(data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]], rng: &mut Rng, max_len: usize) {
    let len = data.len();
    match rng.below(15) {
        // Flip a bit.
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        // Set a byte to a random or interesting value.
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = match rng.below(3) {
                0 => rng.byte(),
                1 => *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xff, b'\n', b'"', b':']),
                _ => data[i].wrapping_add(if rng.one_in(2) { 1 } else { 0xff }),
            };
        }
        // A big-endian length field: nudge it or set it to an interesting value.
        2 if len >= 2 => {
            let width = *rng.pick(&[2usize, 4, 8]);
            let width = width.min(len);
            let at = rng.below(len - width + 1);
            let mut v = 0u64;
            for b in &data[at..at + width] {
                v = (v << 8) | u64::from(*b);
            }
            let v = match rng.below(3) {
                0 => v.wrapping_add(1 + rng.below(16) as u64),
                1 => v.wrapping_sub(1 + rng.below(16) as u64),
                _ => *rng.pick(&INTERESTING),
            };
            for (k, b) in data[at..at + width].iter_mut().enumerate() {
                *b = (v >> (8 * (width - 1 - k))) as u8;
            }
        }
        // A varint (postcard's lengths and integers): replace one with a long or a huge one.
        3 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(4)).min(len);
            let new: Vec<u8> = match rng.below(4) {
                0 => vec![0xff, 0xff, 0xff, 0xff, 0x0f],
                1 => vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
                2 => vec![rng.byte() | 0x80, rng.byte() & 0x7f],
                _ => vec![rng.byte() & 0x7f],
            };
            data.splice(at..end, new);
        }
        // Insert random bytes.
        4 => {
            let at = rng.below(len + 1);
            let n = rng.small_len(32);
            let bytes = rng.bytes(n);
            data.splice(at..at, bytes);
        }
        // Delete a range.
        5 if len > 0 => {
            let at = rng.below(len);
            let n = rng.small_len(len - at);
            data.drain(at..at + n);
        }
        // Truncate.
        6 if len > 0 => {
            let keep = rng.below(len);
            data.truncate(keep);
        }
        // Repeat a slice several times (big counts, deep nesting, long names).
        7 if len > 0 => {
            let at = rng.below(len);
            let n = rng.small_len((len - at).min(256));
            let slice = data[at..at + n].to_vec();
            let cap = if rng.one_in(4) { 4096 } else { 16 };
            let times = 1 + rng.small_len(cap);
            let mut rep = Vec::with_capacity(slice.len() * times);
            for _ in 0..times {
                if rep.len() + slice.len() > max_len {
                    break;
                }
                rep.extend_from_slice(&slice);
            }
            data.splice(at..at, rep);
        }
        // Splice: our head, the other input's tail (or a piece of it inserted).
        8 if !other.is_empty() => {
            if rng.one_in(2) {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            } else {
                let at = rng.below(len + 1);
                let from = rng.below(other.len());
                let n = rng.small_len(other.len() - from);
                data.splice(at..at, other[from..from + n].iter().copied());
            }
        }
        // Insert or overwrite with a dictionary token.
        9 | 10 if !dict.is_empty() => {
            let tok = *rng.pick(dict);
            let at = rng.below(len + 1);
            if rng.one_in(2) || at + tok.len() > len {
                data.splice(at..at, tok.iter().copied());
            } else {
                data[at..at + tok.len()].copy_from_slice(tok);
            }
        }
        // Swap two ranges' contents by copying one over the other.
        11 if len > 2 => {
            let a = rng.below(len);
            let b = rng.below(len);
            let n = rng.small_len((len - a.max(b)).max(1)).min(len - a.max(b));
            let piece = data[a..a + n].to_vec();
            data[b..b + n].copy_from_slice(&piece);
        }
        // Duplicate a line (text formats: repeated keys, long lists).
        12 if len > 0 => {
            let at = rng.below(len);
            let start = data[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            let end = data[at..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(len, |p| at + p + 1);
            let line = data[start..end].to_vec();
            let times = 1 + rng.small_len(8);
            for _ in 0..times {
                data.splice(end..end, line.iter().copied());
            }
        }
        // Change the indentation of a line (text formats: nesting).
        13 if len > 0 => {
            let at = rng.below(len);
            let start = data[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            if rng.one_in(2) {
                let n = 1 + rng.below(4);
                data.splice(start..start, std::iter::repeat_n(b' ', n));
            } else if data.get(start) == Some(&b' ') {
                data.remove(start);
            }
        }
        // Replace everything after a point with random bytes.
        _ => {
            let at = rng.below(len + 1);
            data.truncate(at);
            let n = rng.small_len(64);
            data.extend(rng.bytes(n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_mutations_and_lengths_bounded() {
        let seed: Vec<u8> = (0..200u8).collect();
        let run = |s| {
            let mut rng = Rng::new(s);
            let mut out = Vec::new();
            for _ in 0..500 {
                let mut d = seed.clone();
                mutate(&mut d, b"other input", &[b"tok"], &mut rng, 1000);
                assert!(d.len() <= 1000);
                out.push(d);
            }
            out
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
