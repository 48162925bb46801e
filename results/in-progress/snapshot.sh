#!/usr/bin/env bash
# Archive the long runs as they stand (checkpoints included) into results/in-progress, pausing them (SIGSTOP) while
# their files are read, so that each archive holds one consistent position; resume.sh continues them from it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
runs="$(dirname "$(cd "$here/../.." && pwd)")/longruns/runs"
groups="$(pgrep -f "wt-58d9c91/.venv/bin/iwae" | xargs -r -n1 ps -o pgid= -p | sort -u)"
for group in $groups; do kill -STOP -- "-$group"; done
trap 'for group in $groups; do kill -CONT -- "-$group"; done' EXIT
cd "$runs"
tar -czf "$here/full-protocol-iwae-k50.tar.gz" full-protocol-iwae-k50
for cell in mnist-l1-iwae-k5 mnist-l1-vae-k1; do
    run="full-protocol-seed1/$cell/seed-1"
    if [ -f "$run/checkpoint.pt" ] && [ ! -f "$run/eval.json" ]; then
        tar -czf "$here/$cell-seed1.tar.gz" "$run"
    fi
done
for metrics in full-protocol-iwae-k50/*/seed-0/metrics.jsonl full-protocol-seed1/*/seed-1/metrics.jsonl; do
    [ -f "$metrics" ] && echo "$metrics: epoch $(tail -n1 "$metrics" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["epoch"], "test bound", round(r["test_bound"], 2))')"
done
