#!/usr/bin/env bash
# Run a benchmark and keep what it prints: `bash benchmarks/record.sh NAME COMMAND...` runs COMMAND from the
# repository root and writes results/benchmarks/NAME.txt: the command, then when and on what it ran (CPUs, torch,
# the load average as it started), then its output, then the share of the CPUs' time that the hypervisor gave to other
# machines while it ran (steal, from /proc/stat: on a virtual machine, the load no process here shows). The numbers
# quoted in docs/performance.md point to these files.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
shift
out="results/benchmarks/$name.txt"
mkdir -p "$(dirname "$out")"
machine="$(nproc --all) CPUs, $(python -c 'import os; print(len(os.sched_getaffinity(0)))') usable ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(python -c \
    'import torch; print("torch", torch.__version__)'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
cpu_times() {  # all CPUs' time and their steal time, in ticks
    awk '$1 == "cpu" { total = 0; for (i = 2; i <= 9; i++) total += $i; print total, $9 }' /proc/stat
}
{
    echo "\$ $*"
    echo "# $(date -u +%FT%TZ), $machine"
    read -r total0 steal0 < <(cpu_times)
    "$@" 2>&1
    read -r total1 steal1 < <(cpu_times)
    awk -v t="$((total1 - total0))" -v s="$((steal1 - steal0))" \
        'BEGIN { printf "# host steal while it ran: %.1f %% of the CPUs\x27 time\n", (t > 0 ? 100 * s / t : 0) }'
} | tee "$out"
