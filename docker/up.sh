#!/bin/sh
# Builds the flock-test image and starts the 5-node test cluster (docker-compose.test.yml),
# fresh. Then, from the host (flockctl talks mutual TLS with the admin config n1 wrote):
#   docker cp flock-jepsen_n1_1:/data/admin.conf /tmp/admin.conf
#   FLOCK_CONFIG=/tmp/admin.conf target/release/flockctl --addr 172.31.77.11:7801 status
# Stop it with: docker-compose -f docker-compose.test.yml -p flock-jepsen down -v
set -eu
cd "$(dirname "$0")/.."
docker/build-image.sh
docker-compose -f docker-compose.test.yml -p flock-jepsen down -v --remove-orphans -t 5
docker-compose -f docker-compose.test.yml -p flock-jepsen up -d --force-recreate
echo "up.sh: cluster starting: n1..n5 at 172.31.77.11..15:7801; admin config: docker cp flock-jepsen_n1_1:/data/admin.conf ."
