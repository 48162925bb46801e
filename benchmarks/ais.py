"""Time per example of the AIS estimate of log p(x) with the paper's model on 28x28 binary images.

Builds ``burda(layers)`` for 784-dimensional data (the cost does not depend on the weights' values) and times
``iwae.core.ais.ais_log_likelihood`` on random binary images, ``--batch-size`` at a time, reporting the wall
time and, on a CPU, the process's CPU time per example (the two differ on a shared machine). The cost grows
linearly with steps x chains x leapfrog; the pilot run that sets the step sizes adds min(steps, 100) steps.

    python benchmarks/ais.py [--steps 1000] [--chains 16] [--leapfrog 5 10] [--examples 20] [--batch-size 20]
                             [--layers 1] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from iwae.core.ais import ais_log_likelihood
from iwae.models import burda
from iwae.platform.device import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--leapfrog", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = burda(args.layers, 784).to(device)
    x = (torch.rand(args.examples, 784, device=device) < 0.2).float()
    for leapfrog in args.leapfrog:
        wall, cpu = time.perf_counter(), time.process_time()
        ais_log_likelihood(model, x, steps=args.steps, chains=args.chains, leapfrog=leapfrog, seed=0,
                           batch_size=args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = (time.perf_counter() - wall) / args.examples, (time.process_time() - cpu) / args.examples
        cpu_text = f", CPU {cpu:.2f} s per example ({args.threads} thread(s))" if device.type == "cpu" else ""
        print(f"{args.layers} layer(s), {args.steps} steps x {args.chains} chains x {leapfrog} leapfrog, batch "
              f"{args.batch_size}, {device}: wall {wall:.2f} s per example{cpu_text}")


if __name__ == "__main__":
    main()
