"""The data layer: named datasets and user arrays as tensors in memory, and minibatches drawn from them.

``load(name)`` finds (or downloads) and verifies a dataset's published files and returns a ``Dataset``;
``epoch_batches`` and ``Dataset.minibatch`` (a gather, then ``binarize`` for dynamic data) make the
minibatches of one epoch. Anything wrong with the data raises ``DataError`` with a one-line message.
"""

from iwae.data.batching import binarize, epoch_batches
from iwae.data.datasets import DATASETS, Dataset, load, reads_data_dir, recorded_name, user_file_sha256
from iwae.data.errors import DataError

__all__ = ["DATASETS", "DataError", "Dataset", "binarize", "epoch_batches", "load", "reads_data_dir",
           "recorded_name", "user_file_sha256"]
