#!/usr/bin/env bash
# The reproduction's long CPU runs (docs/results.md), one queue per core, one torch thread each; each queue resumes
# its runs from their checkpoints wherever it stopped, so the same command restarts it:
#   full         the paper's full protocol (3280 epochs), one seed each: the 1-layer IWAE with k = 5, then k = 50
#   budget0.001  burda-table1, dreg and rainforth-table1 at budget 0.001 (9 epochs), 2 seeds, evaluated at k = 1000
# Run it from a worktree of the repository at a fixed commit with its own virtual environment, so that work on main
# cannot change the code a run resumes with:
#   git worktree add --detach ../wt-COMMIT COMMIT && cd ../wt-COMMIT && python3 -m venv .venv
#   .venv/bin/pip install -c .ci/constraints.txt -e .
#   RUNS=../longruns nohup setsid bash benchmarks/cpu_long_runs.sh full >> ../longruns/full.log 2>&1 < /dev/null &
# Runs go to $RUNS (default runs/); the data is read from $IWAE_DATA_DIR (default ../shared/data).
set -u
QUEUE="${1:?name a queue: full or budget0.001}"
RUNS="${RUNS:-runs}"
IWAE="$PWD/.venv/bin/iwae"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 IWAE_DATA_DIR="${IWAE_DATA_DIR:-$(cd .. && pwd)/shared/data}"
mkdir -p "$RUNS" && cd "$RUNS" || exit
echo "== $(date -u +%FT%TZ) $QUEUE: start"
case "$QUEUE" in
  full)
    for k in 5 50; do
      "$IWAE" reproduce burda-table1 --budget 1 --seeds 1 --threads 1 --cells "mnist-l1-iwae-k$k" \
        --out "full-protocol-iwae-k$k" || exit
    done ;;
  budget0.001)
    for table in burda-table1 dreg rainforth-table1; do
      "$IWAE" reproduce "$table" --budget 0.001 --seeds 2 --eval-k 1000 --threads 1 --out "budget0.001/$table" || exit
    done ;;
  *) echo "unknown queue $QUEUE: full or budget0.001" >&2; exit 2 ;;
esac
echo "== $(date -u +%FT%TZ) $QUEUE: done"
