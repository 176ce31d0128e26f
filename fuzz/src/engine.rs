//! Runs one target in this process: mutated inputs under `catch_unwind`, a watchdog for inputs
//! over the time limit, a counting allocator for inputs over the memory limit.
//!
//! A hang or an input over the memory limit cannot be unwound from: the watchdog (or the
//! allocator) ends the process with [`EXIT_HANG`] (or [`EXIT_MEMORY`]). The input being run is
//! always in the [`Slot`], a file mapped shared with the supervising `flock-fuzz run`, which
//! saves it as the finding's reproducer and starts a new worker for the time that is left.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::collections::HashSet;
use std::fs;
use std::hash::{Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::mutate::{self, Rng};
use crate::targets::Target;

/// A worker's exit status when an input ran over the time limit.
pub const EXIT_HANG: i32 = 70;
/// A worker's exit status when an input's memory went over the limit.
pub const EXIT_MEMORY: i32 = 71;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(0);

/// The global allocator of `flock-fuzz`: the system's, counting live bytes, and ending the
/// process with [`EXIT_MEMORY`] once they pass the limit set by [`set_memory_limit`].
pub struct CountingAlloc;

fn over_memory(now: usize) -> ! {
    let limit = LIMIT.load(Ordering::Relaxed);
    let (msg, len) = format_static(now >> 20, limit >> 20);
    // SAFETY: writing a buffer we own to fd 2, then ending the process without unwinding
    // (allocating or unwinding from inside the allocator is not possible).
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(EXIT_MEMORY)
    }
}

/// "... N MiB ... M MiB" without allocating.
fn format_static(now_mib: usize, limit_mib: usize) -> ([u8; 96], usize) {
    let mut out = [b' '; 96];
    let mut pos = 0;
    let mut put = |s: &[u8], out: &mut [u8; 96]| {
        for &b in s {
            if pos < out.len() {
                out[pos] = b;
                pos += 1;
            }
        }
    };
    let num = |mut n: usize| {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        (d, i)
    };
    put(b"\nflock-fuzz: the input allocated over ", &mut out);
    let (d, i) = num(now_mib);
    put(&d[i..], &mut out);
    put(b" MiB, over the limit of ", &mut out);
    let (d, i) = num(limit_mib);
    put(&d[i..], &mut out);
    put(b" MiB\n", &mut out);
    (out, pos)
}

#[inline]
fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    let limit = LIMIT.load(Ordering::Relaxed);
    if limit != 0 {
        if now > PEAK.load(Ordering::Relaxed) {
            PEAK.store(now, Ordering::Relaxed);
        }
        if now > limit {
            over_memory(now);
        }
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Ends the process once live heap bytes pass `bytes` (0: no limit). Takes effect only where
/// [`CountingAlloc`] is the global allocator (the `flock-fuzz` binary).
pub fn set_memory_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// The most live heap bytes seen while a limit was set.
pub fn peak_memory() -> usize {
    PEAK.load(Ordering::Relaxed)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// When the running input started, in µs since [`epoch`] (+1, so that 0 means idle).
static RUNNING_SINCE: AtomicU64 = AtomicU64::new(0);

fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64 + 1
}

/// Starts the watchdog thread: ends the process with [`EXIT_HANG`] when one input runs longer
/// than `limit`.
pub fn start_watchdog(limit: Duration) {
    epoch();
    let tick = (limit / 4).clamp(Duration::from_millis(5), Duration::from_millis(100));
    let limit_us = limit.as_micros() as u64;
    std::thread::spawn(move || loop {
        std::thread::sleep(tick);
        let since = RUNNING_SINCE.load(Ordering::Relaxed);
        if since != 0 && now_us().saturating_sub(since) > limit_us {
            let msg = format!(
                "\nflock-fuzz: the input ran longer than the limit of {} ms\n",
                limit.as_millis()
            );
            // SAFETY: write a buffer we own to fd 2; then end the process: the stuck input
            // cannot be stopped any other way.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(EXIT_HANG)
            }
        }
    });
}

/// Stops timing the running input (a panic's report, with a backtrace, is not the input's
/// time).
pub fn disarm() {
    RUNNING_SINCE.store(0, Ordering::Relaxed);
}

/// Runs `f` as one input under the watchdog.
pub fn timed<R>(f: impl FnOnce() -> R) -> R {
    RUNNING_SINCE.store(now_us(), Ordering::Relaxed);
    let r = f();
    RUNNING_SINCE.store(0, Ordering::Relaxed);
    r
}

/// The input being run, in a file mapped shared with the supervisor: `len:u64` then the bytes.
pub struct Slot {
    ptr: *mut u8,
    cap: usize,
}

impl Slot {
    /// Maps `path` (created, sized for inputs of `max_len` bytes).
    pub fn create(path: &Path, max_len: usize) -> std::io::Result<Slot> {
        use std::os::fd::AsRawFd;
        let cap = max_len + 8;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(cap as u64)?;
        // SAFETY: a fresh shared mapping of a file we sized to `cap`; the mapping outlives the
        // descriptor (as mmap allows) and is never unmapped (the process ends with it).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Slot {
            ptr: ptr.cast(),
            cap,
        })
    }

    /// Records `input` as the one being run.
    pub fn store(&self, input: &[u8]) {
        let n = input.len().min(self.cap - 8);
        // SAFETY: the mapping is `cap` bytes long and only this thread writes it.
        unsafe {
            std::ptr::copy_nonoverlapping(input.as_ptr(), self.ptr.add(8), n);
            std::ptr::copy_nonoverlapping((n as u64).to_le_bytes().as_ptr(), self.ptr, 8);
        }
    }

    /// The input a worker was running, from its slot file.
    pub fn read(path: &Path) -> Option<Vec<u8>> {
        let bytes = fs::read(path).ok()?;
        let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
        bytes.get(8..8 + len).map(<[u8]>::to_vec)
    }
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces the panic hook with one that records the message and location quietly.
pub fn quiet_panics() {
    panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "(non-string panic)".to_string()
        };
        let loc = info
            .location()
            .map_or_else(String::new, |l| format!("{}:{}", l.file(), l.line()));
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("panicked at {loc}: {msg}")));
    }));
}

/// `text` with runs of digits replaced by `#`, cut to `max` characters: what stays the same
/// across inputs that hit the same bug or the same error.
pub fn normalize(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut in_digits = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            in_digits = false;
            out.push(c);
        }
        if out.len() >= max {
            break;
        }
    }
    out
}

fn fingerprint(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..16].to_string()
}

/// Saves a reproducer as `DIR/KIND-HASH`; returns its path.
pub fn save_artifact(dir: &Path, kind: &str, input: &[u8]) -> std::io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let path = dir.join(format!("{kind}-{}", fingerprint(input)));
    fs::write(&path, input)?;
    Ok(path)
}

/// What one `run` of a worker is told.
pub struct RunConfig {
    pub time: Duration,
    pub seed: u64,
    pub max_len: usize,
    /// Inputs from files (the seed corpus); the target's built-in seeds are added.
    pub corpus_dir: PathBuf,
    /// Where reproducers go (`fuzz/artifacts/TARGET`).
    pub artifacts: PathBuf,
    pub slot: Option<Slot>,
    /// Written every second and at the end: `{"execs":N,"elapsed_ms":N,...}`.
    pub stats_file: Option<PathBuf>,
}

/// A crash found in-process (hangs and memory findings are seen by the supervisor).
#[derive(Clone, Debug)]
pub struct Finding {
    pub kind: String,
    pub file: PathBuf,
    pub message: String,
}

/// What a worker did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub execs: u64,
    pub elapsed: Duration,
    pub crashes: Vec<Finding>,
    pub corpus: usize,
    pub outcomes: usize,
    /// Inputs that hit one of the target's known (routed) findings.
    pub known: u64,
}

impl Stats {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "execs": self.execs,
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "corpus": self.corpus,
            "outcomes": self.outcomes,
            "known": self.known,
            "crashes": self.crashes.iter().map(|c| serde_json::json!({
                "kind": c.kind, "file": c.file, "message": c.message,
            })).collect::<Vec<_>>(),
        })
    }
    pub fn from_json(v: &serde_json::Value) -> Stats {
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        Stats {
            execs: u("execs"),
            elapsed: Duration::from_millis(u("elapsed_ms")),
            corpus: u("corpus") as usize,
            outcomes: u("outcomes") as usize,
            known: u("known"),
            crashes: v
                .get("crashes")
                .and_then(|c| c.as_array())
                .map(|a| {
                    a.iter()
                        .map(|c| Finding {
                            kind: c["kind"].as_str().unwrap_or("crash").to_string(),
                            file: PathBuf::from(c["file"].as_str().unwrap_or("")),
                            message: c["message"].as_str().unwrap_or("").to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// The seed inputs of `target`: the files in `dir` and its built-in seeds, at most `max_len`
/// bytes each, without duplicates.
pub fn seeds(target: &Target, dir: &Path, max_len: usize) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut seen = HashSet::new();
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let from_files = files
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| fs::read(p).ok());
    for mut s in from_files.chain((target.seeds)()) {
        s.truncate(max_len);
        if seen.insert(s.clone()) {
            out.push(s);
        }
    }
    if out.is_empty() {
        out.push(Vec::new());
    }
    out
}

/// Fuzzes `target` for `cfg.time`. Panics are caught, saved and reported; a hang or an input
/// over the memory limit ends the process (see the module documentation).
pub fn run(target: &Target, cfg: &RunConfig) -> Stats {
    quiet_panics();
    let start = Instant::now();
    let mut rng = Rng::new(cfg.seed);
    let mut corpus = seeds(target, &cfg.corpus_dir, cfg.max_len);
    let n_seeds = corpus.len();
    let mut outcomes: HashSet<u64> = HashSet::new();
    let mut crash_keys: HashSet<String> = HashSet::new();
    let mut stats = Stats::default();
    let mut last_report = Instant::now();
    let mut i = 0usize;
    let mut gen_buf = Vec::new();
    while start.elapsed() < cfg.time {
        // The seeds as they are first, then generated and mutated inputs.
        let input = if i < n_seeds {
            corpus[i].clone()
        } else if target.generate.is_some() && rng.one_in(8) {
            let n = 16 + rng.below(2048);
            gen_buf.clear();
            gen_buf.extend(rng.bytes(n));
            let mut u = arbitrary::Unstructured::new(&gen_buf);
            let mut input = (target.generate.expect("checked"))(&mut u);
            if rng.one_in(3) {
                let other = corpus[rng.below(corpus.len())].clone();
                mutate::mutate(&mut input, &other, target.dict, &mut rng, cfg.max_len);
            }
            input.truncate(cfg.max_len);
            input
        } else {
            let mut input = corpus[rng.below(corpus.len())].clone();
            let other = &corpus[rng.below(corpus.len())];
            mutate::mutate(&mut input, other, target.dict, &mut rng, cfg.max_len);
            if rng.below(4) != 0 {
                (target.fixup)(&mut input, &mut rng);
                input.truncate(cfg.max_len);
            }
            input
        };
        i += 1;
        if let Some(slot) = &cfg.slot {
            slot.store(&input);
        }
        let result = timed(|| panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input))));
        stats.execs += 1;
        match result {
            Ok(outcome) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                normalize(&outcome.0, 80).hash(&mut h);
                if outcomes.insert(h.finish()) && corpus.len() < 4096 && i > n_seeds {
                    corpus.push(input);
                }
            }
            Err(_) => {
                let msg = LAST_PANIC
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_else(|| "panicked".to_string());
                if let Some((_, finding)) = target.known.iter().find(|(k, _)| msg.contains(k)) {
                    if stats.known == 0 {
                        eprintln!("{}: known {finding} (not counted as a crash)", target.name);
                    }
                    stats.known += 1;
                } else if crash_keys.insert(normalize(&msg, 120)) {
                    let file = save_artifact(&cfg.artifacts, "crash", &input)
                        .unwrap_or_else(|e| PathBuf::from(format!("(not saved: {e})")));
                    eprintln!(
                        "{}: CRASH {msg}\n  reproducer: {}\n  replay: flock-fuzz replay {}",
                        target.name,
                        file.display(),
                        file.display()
                    );
                    stats.crashes.push(Finding {
                        kind: "crash".into(),
                        file,
                        message: msg,
                    });
                }
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            stats.elapsed = start.elapsed();
            stats.corpus = corpus.len();
            stats.outcomes = outcomes.len();
            write_stats(cfg, &stats);
        }
    }
    stats.elapsed = start.elapsed();
    stats.corpus = corpus.len();
    stats.outcomes = outcomes.len();
    write_stats(cfg, &stats);
    stats
}

fn write_stats(cfg: &RunConfig, stats: &Stats) {
    if let Some(path) = &cfg.stats_file {
        let tmp = path.with_extension("tmp");
        if fs::write(&tmp, stats.to_json().to_string()).is_ok() {
            let _ = fs::rename(&tmp, path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_folds_numbers() {
        assert_eq!(
            normalize("offset 123: frame of 9 bytes", 80),
            "offset #: frame of # bytes"
        );
        assert_eq!(normalize("abcdef", 3), "abc");
    }

    #[test]
    fn slot_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slot");
        let slot = Slot::create(&path, 16).expect("slot");
        slot.store(b"hello");
        assert_eq!(Slot::read(&path).as_deref(), Some(&b"hello"[..]));
        slot.store(b"a longer input than the slot holds");
        assert_eq!(Slot::read(&path).map(|v| v.len()), Some(16));
    }
}
