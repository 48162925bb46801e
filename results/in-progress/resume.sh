#!/usr/bin/env bash
# Resume the long runs of results/in-progress on this machine, each in the background on one torch thread, from the
# code they started with (commit 58d9c91, in its own worktree and virtual environment beside the checkout).
# Run from anywhere: bash main/results/in-progress/resume.sh  (the data in ../shared/data beside the checkout).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
main="$(cd "$here/../.." && pwd)"
parent="$(dirname "$main")"
runs="$parent/longruns/runs"
code="$parent/longruns/wt-58d9c91"
if [ ! -x "$code/.venv/bin/iwae" ]; then
    git -C "$main" worktree add --detach "$code" 58d9c91
    python3 -m venv "$code/.venv"
    "$code/.venv/bin/pip" install -q -c "$code/.ci/constraints.txt" -e "$code"
fi
mkdir -p "$runs"
for archive in "$here"/*.tar.gz; do
    # a run already here (this machine's own, further on) is kept
    run="$(tar -tzf "$archive" | sed -n 's#/checkpoint.pt$##p')"
    [ -e "$runs/$run/checkpoint.pt" ] || tar -xzf "$archive" -C "$runs"
done
export OMP_NUM_THREADS=1 IWAE_DATA_DIR="$parent/shared/data"
iwae="$code/.venv/bin/iwae"
start() {  # log, command... (not when a process of this machine already runs it)
    local log="$1"; shift
    if pgrep -f -- "$*" > /dev/null; then echo "already running: $*"; return; fi
    (cd "$runs" && exec setsid -f nohup "$@" >> "$parent/longruns/$log" 2>&1 < /dev/null)
}
start k50.log "$iwae" reproduce burda-table1 --budget 1 --seeds 1 --threads 1 --cells mnist-l1-iwae-k50 \
    --out full-protocol-iwae-k50
# seed 1 of the VAE and IWAE k = 5 cells, one after the other on the second core, as lone runs beside seed 0
second="$runs/full-protocol-seed1"
seed1() {  # cell objective k
    local run="$second/$1/seed-1"
    if [ -f "$run/eval.json" ] || [ -f "$main/results/burda-table1-full/$1/seed-1/eval.json" ]; then return; fi
    if [ -f "$run/checkpoint.pt" ]; then "$iwae" train --resume "$run"; else
        mkdir -p "$second/$1"
        "$iwae" train --out "$run" --seed 1 --dataset mnist --objective "$2" --k "$3" --estimator standard \
            --schedule burda --device cpu --threads 1
    fi
}
export -f seed1; export second iwae main
start seed1.log bash -c 'seed1 mnist-l1-iwae-k5 iwae 5 && seed1 mnist-l1-vae-k1 elbo 1'
echo "logs: k50 in $parent/longruns/k50.log, seed 1 of k5 then VAE in $parent/longruns/seed1.log"
