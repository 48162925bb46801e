#!/usr/bin/env bash
# Run a benchmark and keep what it prints: `bash benchmarks/record.sh NAME COMMAND...` runs COMMAND from the
# repository root and writes results/benchmarks/NAME.txt: the command, then when and on what it ran (CPUs, torch,
# the load average as it started), then its output. The numbers quoted in docs/performance.md point to these files.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
shift
out="results/benchmarks/$name.txt"
mkdir -p "$(dirname "$out")"
machine="$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(python -c \
    'import torch; print("torch", torch.__version__)'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
{
    echo "\$ $*"
    echo "# $(date -u +%FT%TZ), $machine"
    "$@" 2>&1
} | tee "$out"
