"""Peak memory of the k=5000 log-likelihood evaluation on the MNIST test set (target: under 1 GB).

Each measurement runs in a fresh subprocess, on the parent's number of torch threads, that loads the 10,000 test
images (binarized once, from IWAE_DATA_DIR or the cache; random binary stand-ins of the same shape when the files
are not found there), builds the paper's model and runs ``iwae.eval.likelihood.importance_statistics`` with its
default chunk (500 samples) and batch (16 examples) sizes, on the fastest fp32 matmul path (``iwae.platform.gemm``)
as ``iwae evaluate`` does; ``--compile`` compiles the evaluator. A first pass on one batch (the compilation, with
``--compile``, which fills inductor's cache) comes before the measurement. Each call compiles an evaluator of its
own, as ``iwae evaluate`` does, so the measured evaluation includes its tracing and the loading of its kernels from
that cache (a fraction of a second). On a CPU it reports the peak resident memory of the process during the
evaluation (Linux: the high-water mark VmHWM, reset just before through /proc/self/clear_refs) and its increase over
the resident memory just before; on a GPU, ``torch.cuda.max_memory_allocated`` and its increase.

Evaluation is batched over examples as well as samples, so peak memory depends on neither k nor the
number of examples: ``--examples N`` measures on the first N images only (the full 10,000 x 5000 samples
take long on a small CPU) and says so; ``--k`` shows that a smaller k needs the same memory.

    python benchmarks/evaluate_memory.py [--examples 10000] [--k 5000] [--layers 1 2] [--device cpu] [--compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from children import run_child

from iwae import data
from iwae.eval import likelihood
from iwae.models import burda
from iwae.platform import heap
from iwae.platform.device import resolve_device

TARGET_BYTES = 1 << 30
CHUNK_SIZE, BATCH_SIZE = 500, likelihood.EXAMPLES_PER_PASS  # importance_statistics' defaults


def memory_status(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident memory (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(test_file: Path, layers: int, k: int, examples: int, device_name: str,
            compile: bool = False) -> dict[str, float]:
    """One measurement in this process: the peak memory (bytes) during the evaluation, its increase over the
    memory in use before, the time taken, and the NLL (the mean of -log p(x) over the examples).

    A first pass on one batch of one chunk (compiling the evaluator with ``compile``) comes before the
    measurement, and is timed as ``first_pass_seconds`` (the measured call compiles its own evaluator again, from
    inductor's cache); the evaluation itself then draws its samples from a
    generator seeded with 0, so the eager and compiled evaluators see the same random numbers."""
    heap.retain_freed_memory()  # as the iwae command does
    device = resolve_device(device_name)
    x = torch.load(test_file)[:examples].to(device)
    torch.manual_seed(0)
    model = burda(layers, x.shape[1], train_mean=x.mean(0)).to(device)
    likelihood.evaluation_matmul_path(model, x, k, CHUNK_SIZE, BATCH_SIZE)  # as iwae evaluate chooses
    start = time.perf_counter()
    likelihood.importance_statistics(model, x[:BATCH_SIZE], min(k, CHUNK_SIZE), compile=compile)
    first_pass = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        baseline = memory_status("VmRSS")
    torch.manual_seed(0)
    start = time.perf_counter()
    stats = likelihood.importance_statistics(model, x, k, chunk_size=CHUNK_SIZE, batch_size=BATCH_SIZE,
                                           compile=compile)
    nll = -stats.log_likelihood.mean().item()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = memory_status("VmHWM")
    return {"peak": peak, "increase": peak - baseline, "seconds": seconds, "first_pass_seconds": first_pass,
            "nll": nll}


def measure_in_subprocess(test_file: Path, layers: int, k: int, examples: int, device_name: str,
                          compile: bool = False) -> dict[str, float]:
    """``measure`` in a fresh Python process, so that its peak memory is the evaluation's alone, on this process's
    number of torch threads."""
    command = [sys.executable, __file__, "--child", str(test_file), str(layers), "--k", str(k),
               "--examples", str(examples), "--device", device_name, *(["--compile"] if compile else [])]
    return json.loads(run_child(command, torch.get_num_threads()))


def mnist_test_images() -> tuple[torch.Tensor, str]:
    """MNIST's test images where they are found (``$IWAE_DATA_DIR`` or the cache, no download), else random binary
    stand-ins of the same shape; and which."""
    try:
        return data.load("mnist", download=False).test, "MNIST test set"
    except data.DataError:
        pass
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(10_000, 784, generator=generator) < 0.13).float(), "random binary stand-in of MNIST's shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="compile the evaluator (torch.compile)")
    parser.add_argument("--child", nargs=2, metavar=("TEST_FILE", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), int(args.child[1]), args.k, args.examples, args.device,
                                 args.compile)))
        return

    images, source = mnist_test_images()
    examples = min(args.examples, len(images))
    subset = "all" if examples == len(images) else f"the first {examples} of"
    print(f"evaluating k={args.k} on {subset} {len(images)} images ({source}), device {args.device}")
    if examples < len(images):
        print("(a subset: peak memory does not depend on the number of examples, which are evaluated "
              f"{BATCH_SIZE} at a time)")
    with tempfile.TemporaryDirectory() as tmp:
        test_file = Path(tmp) / "test.pt"
        torch.save(images, test_file)
        within = True
        for layers in args.layers:
            result = measure_in_subprocess(test_file, layers, args.k, examples, args.device, args.compile)
            within &= result["peak"] < TARGET_BYTES
            what = "allocated on the GPU" if args.device.startswith("cuda") else "resident memory of the process"
            print(f"{layers} stochastic layer(s): peak {result['peak'] / 2**20:.0f} MiB {what} "
                  f"(+{result['increase'] / 2**20:.0f} MiB during the evaluation), {result['seconds']:.1f} s, "
                  f"{examples * args.k / result['seconds']:.0f} samples/s")
    print(f"target: under {TARGET_BYTES / 2**30:.0f} GiB: {'met' if within else 'NOT met'}")
    sys.exit(0 if within else 1)


if __name__ == "__main__":
    main()
