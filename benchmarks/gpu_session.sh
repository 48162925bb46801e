#!/usr/bin/env bash
# One call's work on a lent GPU, in the order that matters if the time runs out:
#   1. benchmarks/loop.py step on the GPU (a quiet GPU): iwae train's loop against its step's CUDA graph replayed;
#   2. the first two cells of Burda et al.'s table 1 at budget 0.1 (330 epochs), 4 stacked seeds each, the VAE
#      first, while the tests of the GPU's paths run beside it;
#   3. at DEADLINE_S seconds after the start, every cell still training is stopped (SIGTERM: it checkpoints), the
#      report is written from the runs as they are, and everything is packed into $OUT.
# Run from the repository root with the MNIST files in $IWAE_DATA_DIR (default .gpudata):
#   OUT=/tmp/gpu DEADLINE_S=500 bash benchmarks/gpu_session.sh
# MEASURE=0 leaves out the loop benchmark and the tests (the whole call for the cells); CELLS="mnist-l1-iwae-k50"
# trains only the cells named. Cells resume from the checkpoints under $RUNS (restore them first: cat the parts
# of an earlier call | tar xz, in the repository root).
# $OUT then holds results.tar.gz (the logs, report.md/csv, curves.png and each seed's config.json, metrics.jsonl and
# eval*.json) and checkpoints.tar.gz.part-* (the runs' checkpoints, to continue them: cat the parts | tar xz).
set -u
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 IWAE_DATA_DIR="${IWAE_DATA_DIR:-$PWD/.gpudata}"
OUT="${OUT:?set OUT to the folder the results go to}"
DEADLINE_S="${DEADLINE_S:-500}"
RUNS="results/burda-table1-gpu"
LOGS="$RUNS/logs/$(date -u +%Y%m%dT%H%M%SZ)"  # this call's logs
read -ra CELLS <<< "${CELLS:-mnist-l1-vae-k1 mnist-l1-iwae-k50}"
MEASURE="${MEASURE:-1}"
mkdir -p "$OUT" "$LOGS"
left() { echo $((DEADLINE_S - SECONDS)); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOGS/machine.log"

if [ "$MEASURE" = 1 ]; then
  timeout -s TERM 150 python3 benchmarks/loop.py step --device cuda --k 1 50 --rounds 1 --epochs 2 \
    --bare-steps 4000 2>&1 | tee "$LOGS/loop.log"
fi

(
  for cell in "${CELLS[@]}"; do
    (( $(left) > 30 )) || break
    timeout -k 30 -s TERM "$(left)" python3 -m iwae reproduce burda-table1 --budget 0.1 --seeds 4 --device cuda \
      --cells "$cell" --out "$RUNS"
    echo "$cell: exit $?"
  done
) > "$LOGS/cells.log" 2>&1 &
cells=$!

if [ "$MEASURE" = 1 ]; then
  timeout -s TERM 150 python3 -m pytest -q -p no:cacheprovider tests/test_minibatches.py tests/test_step.py \
    tests/test_stacked.py tests/test_data_batching.py -k "cuda or graph" -v --tb=short 2>&1 | tee "$LOGS/tests.log" \
    | tail -n 25
fi

wait "$cells"
tail -n 3 "$LOGS/cells.log"
python3 - "$RUNS" mnist-l1-vae-k1 mnist-l1-iwae-k50 <<'EOF' 2>&1 | tee -a "$LOGS/cells.log"
import sys
from pathlib import Path

from iwae.runs import reproduce

out, cells = Path(sys.argv[1]), tuple(sys.argv[2:])
options = reproduce.Options(budget=0.1, seeds=4, device="cuda", cells=cells)
print(reproduce.write_report("burda-table1", out, reproduce.select("burda-table1", cells), options, {})["md"])
EOF
sed -n 1,12p "$RUNS/report.md"
tar czf "$OUT/results.tar.gz" --exclude=checkpoint.pt --exclude='*.tmp' "$RUNS"
find "$RUNS" -name checkpoint.pt | tar czf - -T - | split -b 15M - "$OUT/checkpoints.tar.gz.part-"
ls -la "$OUT"
