"""Write the reference's binarized MNIST test set (and the grey-level training set) as an .npz that
`iwae evaluate RUN --dataset FILE` reads, so that both sides' models are evaluated on the same binary images:
a test set binarized with another draw moves the mean NLL by about a tenth of a nat, as much as the seeds'
spread on either side.

    python crosscheck/shared_test_set.py --data-dir ../shared/data --out runs/crosscheck-test.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from reference import load_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    train, test_bin = load_mnist(args.data_dir)
    np.savez(args.out, train=train.astype(np.float32), test=test_bin.astype(np.float32))


if __name__ == "__main__":
    main()
