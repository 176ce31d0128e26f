#!/bin/sh
# Builds the flock-test image that docker-compose.test.yml runs, from local files only:
# FROM scratch + flockd, flockctl and flock-testapp (release build; the jepsen app workload runs
# the test app under the process driver), every shared library `ldd` lists for them, and
# Debian's busybox-static for a shell (and the apps' `sh -c` commands). No image is pulled.
#
#   docker/build-image.sh                      # cargo build --release -p flock-node -p flock-testapp, then the image
#   FLOCK_BIN_DIR=DIR docker/build-image.sh    # use DIR/flockd, DIR/flockctl and DIR/flock-testapp as they are
#   FLOCK_TEST_IMAGE=name:tag                  # image name (default flock-test:latest)
set -eu
cd "$(dirname "$0")/.."
IMAGE=${FLOCK_TEST_IMAGE:-flock-test:latest}
CTX=target/flock-test-image

if [ -n "${FLOCK_BIN_DIR:-}" ]; then
  BIN=$FLOCK_BIN_DIR
else
  cargo build --release -p flock-node -p flock-testapp
  BIN=target/release
fi
BUSYBOX=$(command -v busybox || true)
if [ -z "$BUSYBOX" ] || ldd "$BUSYBOX" >/dev/null 2>&1; then
  echo "build-image.sh: a static busybox is needed: apt-get install busybox-static" >&2
  exit 1
fi

rm -rf "$CTX"
ROOT=$CTX/rootfs
mkdir -p "$ROOT/bin" "$ROOT/usr/local/bin" "$ROOT/flock" "$ROOT/data" "$ROOT/tmp" "$ROOT/etc"
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$ROOT/bin/$applet"
done
for b in flockd flockctl flock-testapp; do
  if [ ! -x "$BIN/$b" ]; then
    echo "build-image.sh: $BIN/$b is missing" >&2
    exit 1
  fi
  # Debug info makes the binary ten times larger; symbols stay for backtraces.
  objcopy --strip-debug "$BIN/$b" "$ROOT/usr/local/bin/$b" 2>/dev/null || cp "$BIN/$b" "$ROOT/usr/local/bin/$b"
  for lib in $(ldd "$BIN/$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    cp -L --parents "$lib" "$ROOT/"
  done
done
# glibc's name service switch, for resolving the other nodes' names through docker's DNS.
for lib in /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2 /lib/x86_64-linux-gnu/libresolv.so.2; do
  [ -e "$lib" ] && cp -L --parents "$lib" "$ROOT/"
done
printf 'hosts: files dns\n' > "$ROOT/etc/nsswitch.conf"
cp docker/entrypoint.sh "$ROOT/flock/entrypoint.sh"
chmod 755 "$ROOT/flock/entrypoint.sh"
chmod 1777 "$ROOT/tmp"

docker build -q -t "$IMAGE" -f docker/Dockerfile "$CTX"
echo "build-image.sh: built $IMAGE from $BIN"
