#!/usr/bin/env bash
# Runs one set-up step quietly: one progress line on the terminal, the step's whole output
# appended to a log file, and that output shown when the step fails. `make setup`, `make binary`,
# `make cnitool` and .ci/run call it, so a newcomer's `make demo` / `make test` on a fresh machine
# prints a handful of lines instead of pages of apt, pip and PyInstaller output.
#
# Usage: scripts/step.sh LABEL COMMAND [ARGS...]
# Environment:
#   STEP_LOG   the log file (default build/logs/setup.log)
#   STEP_TAIL  how many lines of the failed step's output to show (default 40; "all")
#   V=1        no capture: the command's output goes to the terminal (as before)
set -uo pipefail

label=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
log=${STEP_LOG:-$root/build/logs/setup.log}

if [[ "${V:-}" == 1 ]]; then
  echo "==> $label"
  exec "$@"
fi

mkdir -p "$(dirname "$log")"
touch "$log"
first=$(($(wc -l <"$log") + 1))
printf '==> %s ... ' "$label"
echo "===== $(date -u +%Y-%m-%dT%H:%M:%SZ) $label: $*" >>"$log"
start=$(date +%s%N)
"$@" </dev/null >>"$log" 2>&1
rc=$?
elapsed=$((($(date +%s%N) - start) / 100000000))
took="$((elapsed / 10)).$((elapsed % 10))s"
if ((rc == 0)); then
  echo "ok ($took)"
  exit 0
fi
echo "FAILED (exit $rc after $took)"
{
  if [[ "${STEP_TAIL:-40}" == all ]]; then
    echo "---- output of this step ($log from line $first) ----"
    tail -n "+$first" "$log"
  else
    echo "---- last ${STEP_TAIL:-40} lines of its output (all of it: $log from line $first) ----"
    tail -n "+$first" "$log" | tail -n "${STEP_TAIL:-40}"
  fi
  echo "----"
} >&2
exit "$rc"
