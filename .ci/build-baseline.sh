#!/usr/bin/env bash
# Builds the baseline of the upgrade test (node/tests/upgrade.rs): flockd and flockctl of the
# commit named in .ci/upgrade-baseline, into TARGET/baseline/ (TARGET is
# $CARGO_TARGET_DIR or ./target). Does nothing when that commit's build is already there.
# The source comes from this clone's history (git archive), so the clone must hold the commit.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(grep -v '^#' .ci/upgrade-baseline | grep -m1 .)
target=${CARGO_TARGET_DIR:-$PWD/target}
out=$target/baseline
if [ -x "$out/flockd" ] && [ "$(cat "$out/COMMIT" 2>/dev/null)" = "$commit" ]; then
  echo "build-baseline: $out holds the build of $commit" >&2
  exit 0
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
  # A shallow clone: fetch the history (or just that commit) from where it came.
  echo "build-baseline: commit $commit is not in this clone; fetching it" >&2
  if [ "$(git rev-parse --is-shallow-repository 2>/dev/null)" = true ]; then
    git fetch --quiet --unshallow 2>/dev/null || true
  fi
  git cat-file -e "$commit^{commit}" 2>/dev/null || git fetch --quiet origin "$commit" 2>/dev/null || true
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
  echo "build-baseline: commit $commit (.ci/upgrade-baseline) is not in this clone and could not be fetched; clone main with its history (not --depth)" >&2
  exit 1
fi
src=$target/baseline-src
rm -rf "$src" "$out"
mkdir -p "$src" "$out"
git archive "$commit" | tar -x -C "$src"
echo "build-baseline: building $commit in $src" >&2
# Its own target dir: sharing ours would make the two builds take turns replacing
# target/debug/flockd. Dependencies are built once and kept there for the next run.
(cd "$src" && CARGO_TARGET_DIR="$target/baseline-build" cargo build --locked -p flock-node --bins)
for bin in flockd flockctl; do
  cp "$target/baseline-build/debug/$bin" "$out/$bin"
done
echo "$commit" >"$out/COMMIT"
rm -rf "$src"
echo "build-baseline: $out holds the build of $commit" >&2
