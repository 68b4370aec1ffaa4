#!/usr/bin/env bash
# The main job: a real zeroth-order fine-tune of the default model on a personal dataset,
# then the held-out test split and a generation, each with and without the adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
PL=.venv/bin/pocketllm
OUT=${OUT:-runs/demo}
START=$(date +%s)

$PL train -c examples/personal/demo.yaml --adapter-path "$OUT"
# the adapter that scored best on valid during training (--keep-best, on by default)
BEST="$OUT/best"; [ -d "$BEST" ] || BEST="$OUT"

echo
echo "== test split (held out, never seen in training) =="
$PL eval --model smollm2-135m --data examples/personal --split test
$PL eval --model smollm2-135m --data examples/personal --split test --adapter-path "$BEST"

PROMPT=$(.venv/bin/python -c "import json; print(json.loads(open('examples/personal/test.jsonl').readline())['prompt'])")
echo
echo "== generation =="
echo "prompt: $PROMPT"
echo "-- without adapter:"
$PL generate --prompt "$PROMPT" --max-tokens 8
echo "-- with adapter ($BEST):"
$PL generate --prompt "$PROMPT" --max-tokens 8 --adapter-path "$BEST"
echo
echo "demo finished in $(( $(date +%s) - START )) s"
