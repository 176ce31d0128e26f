#!/bin/sh
# The test nodes' entrypoint (docker-compose.test.yml mounts it at /flock/supervise.sh, under
# docker's init, which is the container's pid 1 and reaps every orphan): runs the image's
# entrypoint (/flock/entrypoint.sh, which execs flockd) and, when flockd alone dies (the jepsen
# nemesis `kill-flockd` SIGKILLs it from the host while the apps it started and its fencing
# watchdog keep running), waits until the harness allows a restart by creating /tmp/flockd-go
# (it writes it from the host through /proc/PID/root: no docker exec), then runs it again, as
# an init system would restart a crashed daemon. A kill of the whole container (`docker kill`
# kills pid 1, so every process of the container) is unchanged.
set -u
stop=0
pid=
trap 'stop=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM INT
while :; do
  rm -f /tmp/flockd-go
  /bin/sh /flock/entrypoint.sh &
  pid=$!
  # wait returns early when a trapped signal arrives; go on waiting for flockd to exit.
  while :; do
    wait "$pid"
    code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  pid=
  [ "$stop" = 1 ] && exit 0
  echo "supervise: flockd exited ($code); it runs again once /tmp/flockd-go exists"
  until [ -e /tmp/flockd-go ] || [ "$stop" = 1 ]; do sleep 0.2; done
  [ "$stop" = 1 ] && exit 0
  echo "supervise: starting flockd again"
done
