#!/usr/bin/env bash
# A single-node Ray head on this machine, for trying job submission before a cluster:
#
#   cluster/local-head.sh start     # head on 127.0.0.1, job API at http://127.0.0.1:8265, token auth on
#   jepa-ray submit --wait -- pretrain --config jepa_ray/configs/demo-cpu.yaml train.shards=$PWD/demo/shards
#   cluster/local-head.sh status
#   cluster/local-head.sh stop      # stops this head only (not other Ray instances on the machine)
#
# The dashboard and job API listen on 127.0.0.1 only. Token authentication is on (RAY_AUTH_MODE=token):
# the token is RAY_AUTH_TOKEN if set, else the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (created
# when missing); `jepa-ray submit` reads it from the same places.
#
# Its state (pid file, log, Ray's temp dir) is in a directory of this user's own: created 0700, and
# refused when it belongs to someone else, is a symlink, or others can write to it, so that nobody
# else can plant a pid file or a socket there. `stop` signals only the process the pid file names,
# and only when it is this user's and is this head's `ray start` (its --temp-dir is in that
# directory); anything else is left alone with a message.
#
# Settings (environment): JEPA_RAY_HEAD_DIR (the state directory, default $TMPDIR/jepa-ray-<uid> on
# Linux and /tmp/jepa-ray-<uid> elsewhere, as Ray chooses its own; keep it short, Ray puts sockets
# under it), JEPA_RAY_HEAD_PORT (GCS, default 6390), JEPA_RAY_DASHBOARD_PORT (default 8265),
# JEPA_RAY_HEAD_CPUS (default: all), JEPA_RAY_HEAD_GPUS (default: all), JEPA_RAY_HEAD_TIMEOUT
# (seconds to wait for the job API, default 90), JEPA_RAY_HEAD_ARGS (more `ray start` flags, e.g.
# --dashboard-agent-listen-port=52366 beside another Ray on the same machine).
set -euo pipefail

ME="$(id -u)"
if [[ "$(uname -s)" == Linux ]]; then BASE="${TMPDIR:-/tmp}"; else BASE=/tmp; fi  # macOS's TMPDIR is too long for sockets
DIR="${JEPA_RAY_HEAD_DIR:-${BASE%/}/jepa-ray-$ME}"
PORT="${JEPA_RAY_HEAD_PORT:-6390}"
DASH="${JEPA_RAY_DASHBOARD_PORT:-8265}"
TIMEOUT="${JEPA_RAY_HEAD_TIMEOUT:-90}"
PIDFILE="$DIR/head.pid"
LOG="$DIR/head.log"
URL="http://127.0.0.1:$DASH"
PYTHON="${PYTHON:-python3}"

owner_and_mode() {  # "UID OCTAL-MODE" of a path itself (a symlink is not followed)
  stat -c '%u %a' "$1" 2>/dev/null || stat -f '%u %Lp' "$1"
}

check_dir() {  # the state directory is ours alone, or we stop here
  if [[ -L "$DIR" || ! -d "$DIR" ]]; then
    echo "error: $DIR (the state directory) is not a directory (a symlink?): remove it or set JEPA_RAY_HEAD_DIR" >&2
    exit 2
  fi
  local owner mode
  read -r owner mode <<<"$(owner_and_mode "$DIR")"
  if [[ "$owner" != "$ME" ]]; then
    echo "error: $DIR (the state directory) belongs to uid $owner, not to you (uid $ME): refusing to use it; set JEPA_RAY_HEAD_DIR to a directory of your own" >&2
    exit 2
  fi
  if (( 8#$mode & 8#022 )); then
    echo "error: $DIR (the state directory) is writable by others (mode $mode): refusing to use it; chmod 700 it or set JEPA_RAY_HEAD_DIR" >&2
    exit 2
  fi
}

make_dir() {  # create the state directory 0700 (its parent as needed), then check it
  if [[ ! -e "$DIR" && ! -L "$DIR" ]]; then
    mkdir -p -- "$(dirname -- "$DIR")"
    mkdir -m 0700 -- "$DIR" 2>/dev/null || true  # someone may have made it first: check_dir decides
  fi
  check_dir
}

alive() { kill -0 "$1" 2>/dev/null; }

owner_and_args() {  # "UID COMMAND LINE" of a live process, or nothing
  local pid=$1
  if [[ -r "/proc/$pid/cmdline" ]]; then
    printf '%s %s\n' "$(awk '/^Uid:/ {print $3}' "/proc/$pid/status" 2>/dev/null)" \
      "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
  else
    ps -ww -o uid= -o args= -p "$pid" 2>/dev/null | sed 's/^ *//'
  fi
}

is_this_head() {  # the pid is a live `ray start` of this user's, with this state directory's temp dir
  local pid=$1 owner args
  if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! alive "$pid"; then return 1; fi
  read -r owner args <<<"$(owner_and_args "$pid")"
  [[ "$owner" == "$ME" && " $args " == *"ray start "* && " $args " == *" --temp-dir=$DIR/ray "* ]]
}

head_pid() { [[ -f "$PIDFILE" ]] && tr -d '[:space:]' <"$PIDFILE"; }

running() { local pid; pid="$(head_pid)" && is_this_head "$pid"; }

not_this_head() {  # the pid file names a live process that is not this head: say so, signal nothing
  local pid=$1 owner args
  read -r owner args <<<"$(owner_and_args "$pid")"
  echo "error: $PIDFILE names pid $pid, which is not this head's Ray process (uid ${owner:-?}: ${args:-?}):" \
    "not signalling it; the pid file is stale and was removed" >&2
  rm -f "$PIDFILE"
}

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
  make_dir
  if running; then
    echo "a jepa-ray head is already running (pid $(head_pid)): job API $URL"
    return 0
  fi
  command -v ray >/dev/null || { echo "error: 'ray' is not on PATH: activate the environment jepa-ray is installed in" >&2; exit 2; }
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
  local pid=$!
  echo "$pid" >"$PIDFILE"
  local waited=0
  until answers; do
    if ! alive "$pid"; then
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
  echo "Ray head running (pid $pid, logs $LOG)"
  echo "  job API and dashboard: $URL (127.0.0.1 only)"
  echo "  token: $(token_path)"
  echo "  export RAY_ADDRESS=$URL   # then: jepa-ray submit --wait -- pretrain --config ..."
}

stop() {
  if [[ ! -e "$DIR" && ! -L "$DIR" ]]; then
    echo "no jepa-ray head is running (no state in $DIR)"
    return 0
  fi
  check_dir
  local pid; pid="$(head_pid)" || pid=""
  if [[ -z "$pid" ]] || ! alive "$pid"; then
    echo "no jepa-ray head is running (state in $DIR)"
    rm -f "$PIDFILE"
    return 0
  fi
  if ! is_this_head "$pid"; then
    not_this_head "$pid"
    return 1
  fi
  kill -TERM "$pid"
  for _ in $(seq 1 60); do
    alive "$pid" || break
    sleep 1
  done
  if is_this_head "$pid"; then
    echo "the head did not stop within 60 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  echo "Ray head stopped"
}

status() {
  if [[ -e "$DIR" || -L "$DIR" ]]; then check_dir; fi
  if running; then
    echo "running (pid $(head_pid)): job API $URL"
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
