#!/bin/sh
# Starts flockd as node $FLOCK_NAME (default: the container's hostname) of the compose cluster.
# - A data dir with an identity (after kill -9, docker restart): `flockd run` from it.
# - Otherwise the seed node ($FLOCK_SEED, default n1) creates the cluster with `flockd init` and
#   puts the admin config init writes (DATA/admin.conf) on the shared volume; every other node
#   uses it to fetch the join token from the seed (`flockctl cluster token`, retried until the
#   seed answers) and runs `flockd join`.
# flockd replaces the shell (exec), so docker's signals and kill -9 reach it directly.
set -eu
DATA=${FLOCK_DATA:-/data}
SHARED=${FLOCK_SHARED:-/shared}
NAME=${FLOCK_NAME:-$(hostname)}
SEED=${FLOCK_SEED:-n1}
PORT=${FLOCK_PORT:-7801}
set -- --heartbeat-ms "${FLOCK_HEARTBEAT_MS:-50}" --election-timeout-ms "${FLOCK_ELECTION_TIMEOUT_MS:-150}"

mkdir -p "$DATA" "$SHARED"
if [ -f "$DATA/identity.json" ]; then
  echo "entrypoint: restarting $NAME from $DATA"
  exec flockd run --data-dir "$DATA" "$@"
fi

if [ "$NAME" = "$SEED" ]; then
  echo "entrypoint: creating the cluster as $NAME"
  # An admin config on the shared volume from an earlier cluster would mislead the joiners.
  rm -f "$SHARED/admin.conf" "$SHARED/admin.conf.tmp"
  (
    while [ ! -s "$DATA/admin.conf" ]; do sleep 0.2; done
    sleep 0.2
    cp "$DATA/admin.conf" "$SHARED/admin.conf.tmp"
    chmod 600 "$SHARED/admin.conf.tmp"
    mv "$SHARED/admin.conf.tmp" "$SHARED/admin.conf"
  ) &
  exec flockd init --data-dir "$DATA" --listen "0.0.0.0:$PORT" --advertise "$NAME:$PORT" --name "$NAME" "$@"
fi

# A well-formed token only: a seed that has not applied its own initialization yet may answer
# with empty parts (`FLOCK-1--`).
token_ok() {
  case "$1" in
    *--* | *-) return 1 ;;
    FLOCK-1-*-*) return 0 ;;
    *) return 1 ;;
  esac
}
tries=0
until [ -s "$SHARED/admin.conf" ] &&
  TOKEN=$(FLOCK_CONFIG="$SHARED/admin.conf" flockctl --addr "$SEED:$PORT" --timeout 3 cluster token 2>/dev/null) &&
  token_ok "$TOKEN"; do
  tries=$((tries + 1))
  if [ "$tries" -ge 120 ]; then
    echo "entrypoint: no join token from $SEED:$PORT in 120 attempts" >&2
    exit 1
  fi
  sleep 1
done
echo "entrypoint: joining $SEED as $NAME"
exec flockd join "$SEED:$PORT" --token "$TOKEN" --data-dir "$DATA" --listen "0.0.0.0:$PORT" --advertise "$NAME:$PORT" --name "$NAME" "$@"
