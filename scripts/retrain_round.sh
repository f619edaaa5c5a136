#!/usr/bin/env bash
# One retraining round, ready for cron: train a candidate, then promote whichever candidate
# has passed its gates and won enough Compare votes (with --set auto_promote=true).
#
#   */30 * * * *  /path/to/alignloop/scripts/retrain_round.sh --set auto_promote=true >/dev/null 2>&1
#
# Extra arguments go to `alignloop round` (e.g. --db, --base-model, --set ppo.iterations=40).
# Output is appended to $ALIGNLOOP_ROUNDS_LOG (default ~/.local/share/alignloop/rounds/cron.log).
# Exit codes: 0 candidate registered, 3 stopped (gate / too little data), 75 another round is
# still running (cron simply tries again next time), 1 failed.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
alignloop="${ALIGNLOOP_BIN:-}"
if [[ -z "$alignloop" ]]; then
  if [[ -x "$here/.venv/bin/alignloop" ]]; then alignloop="$here/.venv/bin/alignloop"; else alignloop="alignloop"; fi
fi
log="${ALIGNLOOP_ROUNDS_LOG:-$HOME/.local/share/alignloop/rounds/cron.log}"
mkdir -p "$(dirname "$log")"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

{
  echo "== $(date -u +%FT%TZ) round start: $*"
  "$alignloop" round "$@"
  status=$?
  # Promotion depends on votes that arrive between rounds, so check it on every run.
  if [[ $status -ne 75 ]]; then
    "$alignloop" round --promote-only "$@" || true
  fi
  echo "== $(date -u +%FT%TZ) round end: exit $status"
  exit $status
} >>"$log" 2>&1
