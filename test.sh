#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, then runs them.
# Usage: ./test.sh [extra cargo-nextest arguments]
set -euo pipefail
cd "$(dirname "$0")"

need() { command -v "$1" >/dev/null 2>&1; }

if ! need cargo; then
  echo "test.sh: cargo is missing; install Rust (https://rustup.rs)" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi

# Format and lint are part of the suite: CI fails on either.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

cargo nextest run --workspace --locked --no-fail-fast "$@"
