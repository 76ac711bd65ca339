#!/usr/bin/env bash
# Build the callbridge image with podman and prove it serves, on a machine without a registry:
#   docker/smoke.sh [--rm-image]
# 1. a Debian bookworm base image from Debian's own packages (mmdebstrap), unless present;
# 2. a wheelhouse in docker/wheels from the host's pip (whatever index it is configured with);
# 3. the image from docker/Dockerfile on that base;
# 4. a container on the host network on a free port: /healthz 200, a real stream transcription
#    of the model's check clip with the repository's own client (a final with the words), the
#    image's HEALTHCHECK healthy, the service not running as root;
# then the container is removed (the image too with --rm-image). Each step's seconds are printed.
#
# Environment: PODMAN (podman), CALLBRIDGE_PODMAN_RUNTIME (runc when installed: crun refuses
# cgroups in hybrid mode), CONTAINERS_CONF (docker/podman/containers.conf), CALLBRIDGE_IMAGE_BASE
# (localhost/debian-base:bookworm; any bookworm image with python3.11 and venv), CALLBRIDGE_IMAGE
# (localhost/callbridge:smoke), CALLBRIDGE_SMOKE_WHEELS (1; 0 = the build uses PyPI itself),
# PYTHON (the repository's .venv python, else python3: runs pip wheel and the client).
# docs/deploy.md explains each choice.
set -euo pipefail
ROOT=$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
PODMAN=${PODMAN:-podman}
RUNTIME=${CALLBRIDGE_PODMAN_RUNTIME:-$(command -v runc >/dev/null && echo runc || echo "")}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/docker/podman/containers.conf}
BASE=${CALLBRIDGE_IMAGE_BASE:-localhost/debian-base:bookworm}
IMAGE=${CALLBRIDGE_IMAGE:-localhost/callbridge:smoke}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
RM_IMAGE=0
[ "${1:-}" = "--rm-image" ] && RM_IMAGE=1
pod() { if [ -n "$RUNTIME" ]; then "$PODMAN" --runtime "$RUNTIME" "$@"; else "$PODMAN" "$@"; fi; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs() { printf '%d.%d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }
T0=$(ms)
step_start=$T0
step() {  # step NAME: prints the seconds the previous step took
  local now; now=$(ms)
  printf 'smoke: %-28s %6s s\n' "$1" "$(secs $(( now - step_start )))"
  step_start=$now
}
fail() { echo "smoke: FAILED: $*" >&2; exit 1; }

NAME=callbridge-smoke-$$
WORK=$(mktemp -d)
cleanup() {
  pod rm -f -t 5 "$NAME" >/dev/null 2>&1 || true
  [ "$RM_IMAGE" = 1 ] && { pod rmi -f "$IMAGE" >/dev/null 2>&1 || true; }
  rm -rf "$WORK"
}
trap cleanup EXIT

# 1. base image
if ! pod image exists "$BASE"; then
  [ "$BASE" = localhost/debian-base:bookworm ] || fail "base image $BASE is not present (pull or build it first)"
  command -v mmdebstrap >/dev/null || fail "no $BASE and no mmdebstrap to build it (apt-get install mmdebstrap)"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs.tar"
  pod import "$WORK/rootfs.tar" "$BASE" >/dev/null
  rm -f "$WORK/rootfs.tar"
  step "base image (mmdebstrap)"
fi

# 2. wheelhouse (the build's pip cannot see the host's index configuration)
if [ "${CALLBRIDGE_SMOKE_WHEELS:-1}" = 1 ]; then
  # async-timeout: redis needs it below Python 3.11.3 (bookworm's python3 is 3.11.2); the host's
  # newer Python would leave it out of the wheelhouse
  if ! "$PYTHON" -m pip wheel -q -w "$ROOT/docker/wheels" "$ROOT[postgres,cluster]" setuptools \
      "async-timeout>=4.0.3" >"$WORK/pip.log" 2>&1; then
    tail -20 "$WORK/pip.log" >&2
    fail "pip wheel failed"
  fi
  rm -f "$ROOT"/docker/wheels/callbridge-*.whl  # the image builds callbridge from the tree itself
  step "wheelhouse"
fi

# 3. the image (docker format: OCI images drop HEALTHCHECK)
pod build -q --format docker --network=host -t "$IMAGE" -f "$ROOT/docker/Dockerfile" \
  --build-arg BASE="$BASE" "$ROOT" >/dev/null
step "image build"
# the cluster drivers are in it (a node with a postgresql:// or redis:// URL must start)
pod run --rm --network=host --entrypoint /opt/callbridge/bin/python "$IMAGE" \
  -c "import psycopg, psycopg_pool, redis" 2>"$WORK/drivers.err" \
  || { cat "$WORK/drivers.err" >&2; fail "the image lacks psycopg or redis"; }
step "cluster drivers import"

# 4. run it
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SIP_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KEY=cbk_smoke_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
pod run -d --rm --name "$NAME" --network=host \
  -e CALLBRIDGE_HOST=127.0.0.1 -e CALLBRIDGE_HTTP_PORT="$PORT" -e CALLBRIDGE_API_KEYS="$KEY" \
  -e CALLBRIDGE_SIP_PORT=0 -e CALLBRIDGE_SIP_WORKERS=1 -e CALLBRIDGE_SIP_RTP_PORT_START=$((40000 + SIP_PORT % 20000)) \
  -e CALLBRIDGE_MODEL_POOL_SIZE=1 "$IMAGE" >/dev/null 2>"$WORK/run.err" \
  || { cat "$WORK/run.err" >&2; fail "podman run failed"; }  # (without systemd podman logs that it cannot time healthchecks)
deadline=$(( $(date +%s) + 180 ))
until "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/healthz', timeout=2)" 2>/dev/null; do
  if [ "$(pod inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" != true ]; then
    pod logs "$NAME" 2>&1 | tail -20 >&2 || true
    fail "the container exited before /healthz answered 200"
  fi
  [ "$(date +%s)" -lt "$deadline" ] || { pod logs "$NAME" 2>&1 | tail -20 >&2; fail "/healthz not 200 within 180 s"; }
  sleep 0.5
done
step "start until /healthz 200"

uid=$(pod exec "$NAME" id -u)
[ "$uid" != 0 ] || fail "the service runs as root"
pod healthcheck run "$NAME" >/dev/null || fail "the image's HEALTHCHECK is not healthy"
CLIP="$ROOT/bridge/models/data/check.wav"
out=$(cd "$ROOT" && PYTHONPATH="$ROOT" "$PYTHON" -m bridge stream "$CLIP" --url "http://127.0.0.1:$PORT" \
      --api-key "$KEY" --json --no-interim --fast) || fail "callbridge stream failed: $out"
echo "$out" | "$PYTHON" -c '
import json, sys
finals = [m["text"] for m in map(json.loads, filter(str.strip, sys.stdin)) if m.get("type") == "final"]
text = " ".join(finals).lower()
assert all(w in text for w in ("call", "back", "tomorrow")), f"no final with the clip words: {finals}"
print("smoke: final:", " ".join(finals))' || fail "no final from the container"
step "stream transcription"
pod stop -t 40 "$NAME" >/dev/null 2>&1
step "stop (drain)"
printf 'smoke: %-28s %6s s\n' "total" "$(secs $(( $(ms) - T0 )))"
echo "smoke: OK ($IMAGE, user $uid)"
