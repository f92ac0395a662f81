#!/usr/bin/env bash
# Smoke test of the CPU image (`make docker-test`), with no Docker Hub:
#   1. a Docker engine: installs Debian's docker.io and debootstrap if missing (root), starts
#      dockerd if none answers;
#   2. the local base image (docker/base_image.sh; cached: skipped when it exists);
#   3. the wheelhouse (docker/wheelhouse.sh serve) and the CPU image (docker/Dockerfile);
#   4. checks the image: no torch, no compiler, a non-root user;
#   5. exports a small demo model repository with the project's venv and runs the image with it
#      mounted read-only; waits for /v2/health/ready and for the HEALTHCHECK to say healthy;
#      scores a request; checks /metrics;
#   6. `docker stop` (SIGTERM): the server drains and exits 0;
#   7. reports the image size and the timings, and removes its container and images.
#
# Kept on purpose: the base image (KEEP_BASE=0 removes it too) and docker/wheelhouse/*.whl
# (ignored by git), so that a second run skips the debootstrap and the download. A dockerd this
# script started is stopped at the end (KEEP_DOCKERD=1 keeps it).
#
# Environment: PYTHON (the project's venv python, default .venv/bin/python, used to export the
# demo models and write the request), MODELS_DIR (use this repository instead of a fresh demo),
# BASE_IMAGE (default mldcn-base:bookworm; made by docker/base_image.sh unless it is another
# image that exists), TIMINGS_OUT (also write the results there as JSON).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
BASE_IMAGE="${BASE_IMAGE:-mldcn-base:bookworm}"
IMAGE="mldcn-serve:smoke-$$"
CONTAINER="mldcn-smoke-$$"
work="$(mktemp -d /tmp/mldcn-docker-smoke.XXXXXX)"
dockerd_pid=""
t_start=$EPOCHREALTIME
declare -A timing

since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '[docker-test %6ss] %s\n' "$(since "$t_start")" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if docker inspect "$CONTAINER" >/dev/null 2>&1; then
        [[ $rc -ne 0 ]] && { log "container log (last 40 lines):"; docker logs --tail 40 "$CONTAINER" 2>&1 | sed 's/^/    /' >&2; }
        docker rm -f "$CONTAINER" >/dev/null
    fi
    docker image inspect "$IMAGE" >/dev/null 2>&1 && docker rmi -f "$IMAGE" >/dev/null
    # the builder stage's image (legacy builder) and any layer left without a tag
    docker image prune -f --filter label=org.mldcn.stage=builder >/dev/null 2>&1
    if [[ "${KEEP_BASE:-1}" == 0 && "$BASE_IMAGE" == mldcn-base:* ]]; then
        docker rmi "$BASE_IMAGE" >/dev/null 2>&1
    fi
    if [[ -n "$dockerd_pid" && -z "${KEEP_DOCKERD:-}" ]]; then
        kill "$dockerd_pid" 2>/dev/null && timeout 30 tail --pid="$dockerd_pid" -f /dev/null
    fi
    rm -rf "$work"
    [[ $rc -eq 0 ]] || log "failed (exit $rc); cleaned up"
    exit $rc
}
trap cleanup EXIT

# -- 1. a Docker engine ---------------------------------------------------------------------------
t=$EPOCHREALTIME
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || fail "missing ${missing[*]}: install them (apt-get) or run as root"
    log "installing ${missing[*]} from Debian"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    [[ $(id -u) -eq 0 ]] || fail "no Docker engine answers and this is not root: start dockerd"
    log "starting dockerd (log: /tmp/mldcn-dockerd.log)"
    dockerd >/tmp/mldcn-dockerd.log 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 /tmp/mldcn-dockerd.log >&2; fail "dockerd did not start"; }
fi
timing[engine_s]=$(since "$t")
log "engine: $(docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}')"

# -- 2. base image ----------------------------------------------------------------------------------
t=$EPOCHREALTIME
if [[ "$BASE_IMAGE" == mldcn-base:* ]]; then
    docker/base_image.sh "$BASE_IMAGE" >&2
elif ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    fail "BASE_IMAGE $BASE_IMAGE does not exist here"
fi
timing[base_image_s]=$(since "$t")

# -- 3. wheelhouse and image --------------------------------------------------------------------------
t=$EPOCHREALTIME
docker/wheelhouse.sh serve 2>&1 | grep -v 'is ignored: it is neither' >&2
timing[wheelhouse_s]=$(since "$t")
t=$EPOCHREALTIME
log "building $IMAGE from $BASE_IMAGE"
docker build --quiet -f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" . \
    >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; fail "docker build failed"; }
timing[build_s]=$(since "$t")
size_bytes=$(docker image inspect --format '{{.Size}}' "$IMAGE")
size_mb=$((size_bytes / 1000000))
log "built in ${timing[build_s]} s; image size ${size_mb} MB"

# -- 4. what the image holds ------------------------------------------------------------------------------
user=$(docker image inspect --format '{{.Config.User}}' "$IMAGE")
[[ -n "$user" && "$user" != root && "$user" != 0* ]] || fail "image runs as root (User=$user)"
docker run --rm --entrypoint python "$IMAGE" -c '
import importlib.util, shutil, sys
bad = [m for m in ("torch", "onnx") if importlib.util.find_spec(m)]
bad += [c for c in ("gcc", "cc", "g++", "clang") if shutil.which(c)]
import service.app, model.cli  # the serving path imports without torch
bad += [m for m in ("torch",) if m in sys.modules]
sys.exit("unexpected in the image: " + ", ".join(bad) if bad else 0)
' || fail "the image holds torch, onnx or a compiler"
log "image: user $user, no torch, no compiler"

# -- 5. run with a demo model repository ----------------------------------------------------------------
t=$EPOCHREALTIME
if [[ -n "${MODELS_DIR:-}" ]]; then
    models="$(realpath "$MODELS_DIR")"
    run_dir=""
else
    [[ -x "$PYTHON" ]] || fail "$PYTHON not found: make install (or set PYTHON / MODELS_DIR)"
    "$(dirname "$PYTHON")/mldcn" demo --out "$work/demo" --rows 3000 --epochs 1 --no-serve \
        >"$work/demo.log" 2>&1 || { tail -20 "$work/demo.log" >&2; fail "demo export failed"; }
    models="$work/demo/models"
    run_dir="$work/demo/runs/mldcn"
fi
chmod -R a+rX "$models" "$work"
"${PYTHON}" - "$models" "$run_dir" >"$work/request.json" <<'PY'
import json, sys
from pathlib import Path

models, run = Path(sys.argv[1]), sys.argv[2]
if run:
    from model.cli import demo_request
    body = demo_request(Path(run))
else:  # any model: three candidates, every feature missing (encoded as missing values)
    name = sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith("."))[0]
    body = {"model": name, "user": {}, "context": {}, "candidates": [{}, {}, {}]}
body["request_id"] = "docker-smoke"
print(json.dumps(body))
PY
timing[models_s]=$(since "$t")
model=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"])' "$work/request.json")

t=$EPOCHREALTIME
docker run -d --name "$CONTAINER" -p 127.0.0.1::8000 -v "$models:/models:ro" \
    -e MLDCN_WARMUP_RUNS=5 --health-interval 1s --health-start-period 60s "$IMAGE" >/dev/null
port=$(docker port "$CONTAINER" 8000/tcp | head -1 | sed 's/.*://')
base="http://127.0.0.1:$port"
log "container $CONTAINER on $base"
ready=""
for _ in $(seq 1 240); do
    [[ "$(docker inspect --format '{{.State.Running}}' "$CONTAINER")" == true ]] || fail "container exited"
    if curl -sf -o /dev/null "$base/v2/health/ready"; then ready=1; break; fi
    sleep 0.25
done
[[ -n "$ready" ]] || fail "not ready within 60 s"
timing[ready_s]=$(since "$t")
log "ready after ${timing[ready_s]} s"
health=""
for _ in $(seq 1 60); do
    health=$(docker inspect --format '{{.State.Health.Status}}' "$CONTAINER")
    [[ "$health" == healthy ]] && break
    sleep 0.5
done
[[ "$health" == healthy ]] || fail "HEALTHCHECK says $health"
timing[healthy_s]=$(since "$t")

code=$(curl -s -o "$work/response.json" -w '%{http_code}' "$base/v1/score" \
       -H 'Content-Type: application/json' --data-binary "@$work/request.json")
[[ "$code" == 200 ]] || { cat "$work/response.json" >&2; fail "POST /v1/score answered $code"; }
"$PYTHON" - "$work/request.json" "$work/response.json" <<'PY' || fail "bad /v1/score response"
import json, sys
req, resp = (json.load(open(p)) for p in sys.argv[1:])
c = req["candidates"]
n = len(c) if isinstance(c, list) else len(next(iter(c.values())))
scores = resp["scores"]
assert len(scores) == n and all(0.0 <= s <= 1.0 for s in scores), resp
assert resp["model"] == req["model"] and resp["request_id"] == req["request_id"], resp
print(f"scores {[round(s, 4) for s in scores]} from {resp['model']} v{resp['version']}",
      file=sys.stderr)
PY
curl -sf "$base/metrics" >"$work/metrics.txt" || fail "GET /metrics failed"
for pattern in "^mldcn_requests_total{.*model=\"$model\"" \
               "^mldcn_request_duration_seconds_bucket{" "^mldcn_batch_size_rows_bucket{" \
               "^mldcn_model_info{"; do
    grep -q "$pattern" "$work/metrics.txt" || fail "/metrics has no line matching $pattern"
done
log "scored a request; /metrics has the request, latency, batch and model series"

# -- 6. SIGTERM: drain and exit 0 -----------------------------------------------------------------------------
t=$EPOCHREALTIME
docker stop --time 30 "$CONTAINER" >/dev/null
timing[stop_s]=$(since "$t")
exit_code=$(docker inspect --format '{{.State.ExitCode}}' "$CONTAINER")
oom=$(docker inspect --format '{{.State.OOMKilled}}' "$CONTAINER")
[[ "$exit_code" == 0 && "$oom" == false ]] || { docker logs --tail 20 "$CONTAINER" >&2; fail "exit code $exit_code after SIGTERM"; }
docker logs "$CONTAINER" 2>&1 | grep -q "drain" || fail "no drain in the server's log after SIGTERM"
log "SIGTERM: drained and exited 0 in ${timing[stop_s]} s"

# -- 7. report ---------------------------------------------------------------------------------------------------
timing[total_s]=$(since "$t_start")
summary="image ${size_mb} MB; total ${timing[total_s]} s (engine ${timing[engine_s]}, base image ${timing[base_image_s]}, wheelhouse ${timing[wheelhouse_s]}, build ${timing[build_s]}, demo models ${timing[models_s]}, ready ${timing[ready_s]}, healthy ${timing[healthy_s]}, stop ${timing[stop_s]})"
if [[ -n "${TIMINGS_OUT:-}" ]]; then
    {
        printf '{"image_size_bytes": %s' "$size_bytes"
        for k in "${!timing[@]}"; do printf ', "%s": %s' "$k" "${timing[$k]}"; done
        printf '}\n'
    } >"$TIMINGS_OUT"
fi
echo "docker-test: passed: $summary"
