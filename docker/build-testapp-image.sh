#!/bin/sh
# Builds flock-test-busybox:latest, the image the docker driver's tests run, from local files
# only: FROM scratch + Debian's busybox-static as /bin/busybox, with a symlink in /bin for each
# of its applets (sh, echo, sleep, ...). No image is pulled. Idempotent: a rebuild from the
# same busybox reuses docker's cache.
#
#   docker/build-testapp-image.sh
#   FLOCK_TESTAPP_IMAGE=name:tag docker/build-testapp-image.sh   # image name
set -eu
cd "$(dirname "$0")/.."
IMAGE=${FLOCK_TESTAPP_IMAGE:-flock-test-busybox:latest}
# A context of its own per run: test processes may build at the same time.
CTX=target/flock-test-busybox-image.$$
trap 'rm -rf "$CTX"' EXIT

static_busybox() {
  for b in /bin/busybox /usr/bin/busybox; do
    if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then
      echo "$b"
      return 0
    fi
  done
  return 1
}

BUSYBOX=$(static_busybox || true)
if [ -z "$BUSYBOX" ]; then
  echo "build-testapp-image.sh: installing busybox-static" >&2
  apt-get install -y busybox-static >&2 || { apt-get update >&2 && apt-get install -y busybox-static >&2; }
  BUSYBOX=$(static_busybox) || { echo "build-testapp-image.sh: no static busybox after installing busybox-static" >&2; exit 1; }
fi

rm -rf "$CTX"
ROOT=$CTX/rootfs
mkdir -p "$ROOT/bin" "$ROOT/tmp" "$ROOT/data"
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$ROOT/bin/$applet"
done
chmod 1777 "$ROOT/tmp"
# Same mtimes every build, so docker's build cache makes a rebuild a no-op.
find "$ROOT" -exec touch -h -d @0 {} +
cat > "$CTX/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
CMD ["/bin/sh"]
DOCKERFILE

docker build -q -t "$IMAGE" "$CTX" >/dev/null
echo "build-testapp-image.sh: built $IMAGE from $BUSYBOX"
