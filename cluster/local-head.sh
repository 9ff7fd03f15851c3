#!/usr/bin/env bash
# A single-node Ray head on this machine, for trying job submission before a cluster:
#
#   cluster/local-head.sh start     # head on 127.0.0.1, job API at http://127.0.0.1:8265, token auth on
#   jepa-ray submit --wait -- pretrain --config jobs/configs/demo-cpu.yaml train.shards=$PWD/demo/shards
#   cluster/local-head.sh status
#   cluster/local-head.sh stop      # stops this head only (not other Ray instances on the machine)
#
# The dashboard and job API listen on 127.0.0.1 only. Token authentication is on (RAY_AUTH_MODE=token):
# the token is RAY_AUTH_TOKEN if set, else the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (created
# when missing); `jepa-ray submit` reads it from the same places.
#
# Settings (environment): JEPA_RAY_HEAD_DIR (state and logs, default /tmp/jepa-ray-head; keep it short,
# Ray puts sockets under it), JEPA_RAY_HEAD_PORT (GCS, default 6390), JEPA_RAY_DASHBOARD_PORT (default
# 8265), JEPA_RAY_HEAD_CPUS (default: all), JEPA_RAY_HEAD_GPUS (default: all), JEPA_RAY_HEAD_TIMEOUT
# (seconds to wait for the job API, default 90), JEPA_RAY_HEAD_ARGS (more `ray start` flags, e.g.
# --dashboard-agent-listen-port=52366 beside another Ray on the same machine).
set -euo pipefail

DIR="${JEPA_RAY_HEAD_DIR:-/tmp/jepa-ray-head}"
PORT="${JEPA_RAY_HEAD_PORT:-6390}"
DASH="${JEPA_RAY_DASHBOARD_PORT:-8265}"
TIMEOUT="${JEPA_RAY_HEAD_TIMEOUT:-90}"
PIDFILE="$DIR/head.pid"
LOG="$DIR/head.log"
URL="http://127.0.0.1:$DASH"
PYTHON="${PYTHON:-python3}"

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

token_path() {
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then echo "RAY_AUTH_TOKEN (environment)"; return; fi
  echo "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
}

answers() {  # the job API answers with this head's token
  "$PYTHON" - "$URL" <<'PY'
import os, sys, urllib.request
from pathlib import Path
token = os.environ.get("RAY_AUTH_TOKEN") or Path(
    os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").read_text().strip()
req = urllib.request.Request(sys.argv[1] + "/api/version", headers={"Authorization": f"Bearer {token}"})
try:
    urllib.request.urlopen(req, timeout=2).read()
except Exception:
    sys.exit(1)
PY
}

start() {
  if running; then
    echo "a jepa-ray head is already running (pid $(cat "$PIDFILE")): job API $URL"
    return 0
  fi
  command -v ray >/dev/null || { echo "error: 'ray' is not on PATH: activate the environment jepa-ray is installed in" >&2; exit 2; }
  mkdir -p "$DIR"
  export RAY_AUTH_MODE=token
  if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "$(token_path)" ]]; then
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
      echo "error: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH: no token in that file" >&2; exit 2
    fi
    ray get-auth-token --generate >/dev/null
  fi
  local args=(--head --block --node-ip-address=127.0.0.1 --port="$PORT"
              --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --include-dashboard=true
              --temp-dir="$DIR/ray" --disable-usage-stats)
  [[ -n "${JEPA_RAY_HEAD_CPUS:-}" ]] && args+=(--num-cpus="$JEPA_RAY_HEAD_CPUS")
  [[ -n "${JEPA_RAY_HEAD_GPUS:-}" ]] && args+=(--num-gpus="$JEPA_RAY_HEAD_GPUS")
  # shellcheck disable=SC2206
  [[ -n "${JEPA_RAY_HEAD_ARGS:-}" ]] && args+=(${JEPA_RAY_HEAD_ARGS})
  # --block keeps one process that owns the head: SIGTERM to it stops exactly this head. Ray first
  # drains the node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (default 30 s), which is for Serve
  # proxies on multi-node clusters; a single local head has nothing to hand over, so 2 s here.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-2}"
  nohup ray start "${args[@]}" >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  local waited=0
  until answers; do
    if ! running; then
      echo "error: the Ray head exited while starting; last lines of $LOG:" >&2
      tail -n 30 "$LOG" >&2
      rm -f "$PIDFILE"
      exit 1
    fi
    if (( waited >= TIMEOUT )); then
      echo "error: the job API did not answer at $URL within ${TIMEOUT} s; see $LOG" >&2
      stop >/dev/null
      exit 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  echo "Ray head running (pid $(cat "$PIDFILE"), logs $LOG)"
  echo "  job API and dashboard: $URL (127.0.0.1 only)"
  echo "  token: $(token_path)"
  echo "  export RAY_ADDRESS=$URL   # then: jepa-ray submit --wait -- pretrain --config ..."
}

stop() {
  if ! running; then
    echo "no jepa-ray head is running (state in $DIR)"
    rm -f "$PIDFILE"
    return 0
  fi
  local pid; pid="$(cat "$PIDFILE")"
  kill -TERM "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "the head did not stop within 60 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  echo "Ray head stopped"
}

status() {
  if running; then
    echo "running (pid $(cat "$PIDFILE")): job API $URL"
  else
    echo "not running"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
