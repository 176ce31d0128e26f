//! The config readers' bounds: a file over the size cap is refused before it is parsed, and a
//! large file with many keys is read in linear time.

use std::time::{Duration, Instant};

use flock_scheduler::config::{parse_application, parse_deployment};
use flock_scheduler::limits::MAX_CONFIG_FILE_BYTES;

/// A compose file with one service whose environment has about `bytes` bytes of variables.
fn compose_with_env(bytes: usize) -> String {
    let mut t = String::with_capacity(bytes + 100);
    t.push_str("services:\n  web:\n    image: busybox\n    environment:\n");
    let mut i = 0;
    while t.len() < bytes {
        t.push_str(&format!("      VAR_{i:08}: value\n"));
        i += 1;
    }
    t
}

#[test]
fn a_50_mb_config_is_refused_at_once_naming_file_size_and_cap() {
    let text = compose_with_env(50 << 20);
    for parse in [
        |t: &str| parse_application("big.yml", t).map(|_| ()),
        |t: &str| parse_deployment("big.yml", t).map(|_| ()),
    ] {
        let start = Instant::now();
        let e = parse(&text).unwrap_err().to_string();
        let took = start.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(e.starts_with("big.yml:1:1: "), "{e}");
        assert!(e.contains(&format!("{} bytes", text.len())), "{e}");
        assert!(e.contains(&format!("{MAX_CONFIG_FILE_BYTES} bytes")), "{e}");
    }
}

/// 4 MB of environment variables takes about 8 times as long as 512 KB (quadratic: 64 times).
#[test]
fn many_keys_read_in_linear_time() {
    let time = |text: &str| {
        (0..3)
            .map(|_| {
                let start = Instant::now();
                let apps = parse_application("env.yml", text).unwrap();
                assert!(apps.apps["web"].environment.len() > 20_000);
                start.elapsed()
            })
            .min()
            .unwrap()
    };
    let small = time(&compose_with_env(512 << 10));
    let large = time(&compose_with_env(4 << 20));
    let ratio = large.as_secs_f64() / small.as_secs_f64();
    assert!(
        ratio < 24.0,
        "512 KB: {small:?}, 4 MB: {large:?}, ratio {ratio:.1}"
    );
}

#[test]
fn errors_quote_long_input_bounded() {
    let name = "x".repeat(100_000);
    let text = format!("services:\n  web:\n    image: busybox\n    restart: {name}\n");
    let e = parse_application("c.yml", &text).unwrap_err().to_string();
    assert!(e.len() < 400, "{} bytes: {:.300}", e.len(), e);
    assert!(e.contains("(100000 bytes)"), "{e:.300}");
}
