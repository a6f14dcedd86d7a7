#!/usr/bin/env bash
# A review's round trip through a real Label Studio: score the bundled sample with the bundled tiny
# model (grades and three samples), `rank1-batch review export` its least certain pairs, then
# label_studio_round_trip.py creates a project from the written labeling configuration, imports
# the tasks, annotates some, exports the project and checks what `rank1-batch review import`
# makes of it. Exits non-zero if any step fails or the qrels are not exactly the decisions made.
#
# Label Studio's dependencies conflict with vLLM's, so it lives in a virtual environment of its own,
# .label-studio-venv/ (made on the first run). Its server listens on 127.0.0.1 only, with a
# throwaway SQLite data directory, and is stopped at the end.
#
#   scripts/label_studio_round_trip.sh                     # check the round trip
#   scripts/label_studio_round_trip.sh --save-test-data    # also refresh tests/data/ from it
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.label-studio-venv"
LABEL_STUDIO=label-studio==1.23.2
# sentry-sdk 3 refuses the option `send_default_pii` that Label Studio 1.23.2 passes at start-up.
SENTRY='sentry-sdk<3'
PYTHON="$ROOT/.venv/bin/python"
RANK1_BATCH="$ROOT/.venv/bin/rank1-batch"
SAVE=${1:-}

if [[ -n "$SAVE" && "$SAVE" != --save-test-data ]]; then
    echo "usage: $0 [--save-test-data]" >&2
    exit 2
fi
if [[ ! -x "$VENV/bin/label-studio" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "$LABEL_STUDIO" "$SENTRY"
fi

WORK=$(mktemp -d -t label-studio-round-trip.XXXXXX)
SERVER=
stop() {
    if [[ -n "$SERVER" ]]; then
        kill -- "-$SERVER" 2>/dev/null || true  # its own process group (setsid below)
        wait "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap stop EXIT

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(20))')
PASSWORD=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(16))')
# Started first: it takes about 50 s to answer, while the run scores.
setsid "$VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 --port "$PORT" \
    --data-dir "$WORK/label-studio" --username reviewer@example.com --password "$PASSWORD" \
    --user-token "$TOKEN" --enable-legacy-api-token > "$WORK/label-studio.log" 2>&1 &
SERVER=$!

cd "$ROOT"
"$RANK1_BATCH" run --input rank1_batch/assets/sample --output "$WORK/run" --model tiny --dtype bfloat16 \
    --max-model-len 2048 --max-reasoning-tokens 128 --enforce-eager --grades 0.2,0.5,0.8 --samples 3 \
    --temperature 0.8 --quiet
"$RANK1_BATCH" review export "$WORK/run" --to "$WORK/tasks.json" --limit 8

SAVED=()
if [[ -n "$SAVE" ]]; then
    mkdir -p "$ROOT/tests/data"
    SAVED=(--save-export "$ROOT/tests/data/label-studio-export.json")
fi
"$PYTHON" "$ROOT/scripts/label_studio_round_trip.py" --url "http://127.0.0.1:$PORT" --token "$TOKEN" \
    --tasks "$WORK/tasks.json" --work "$WORK" --rank1-batch "$RANK1_BATCH" "${SAVED[@]}"

if [[ -n "$SAVE" ]]; then
    # The run the export came from, as much of it as `review import --run` reads.
    rm -rf "$ROOT/tests/data/review-run"
    mkdir -p "$ROOT/tests/data/review-run"
    cp -r "$WORK/run/scores" "$WORK/run/_job.json" "$WORK/run/_manifest.json" "$ROOT/tests/data/review-run/"
    echo "saved tests/data/label-studio-export.json and tests/data/review-run/"
fi
