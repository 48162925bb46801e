"""The published files each dataset is read from: where they are downloaded from and their checksums.

A file found on disk or downloaded is used only when its checksum matches the published one, so every
experiment runs on the same bytes as the paper. The git blob id (sha1 of ``b"blob <size>\\0" + content``,
what ``git hash-object`` prints) identifies chardata.mat because that is the only published record of it.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Algorithm = Literal["sha256", "git-blob"]

_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_LAROCHELLE_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
_OMNIGLOT_URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/"


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its folder in a data directory, its name, its source and its checksum."""

    folder: str
    name: str
    base_url: str
    algorithm: Algorithm
    digest: str

    @property
    def url(self) -> str:
        return self.base_url + self.name


FILES: dict[str, dict[str, RemoteFile]] = {
    "mnist": {
        "train": RemoteFile(
            "mnist",
            "train-images-idx3-ubyte.gz",
            _MNIST_URL,
            "sha256",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        "test": RemoteFile(
            "mnist",
            "t10k-images-idx3-ubyte.gz",
            _MNIST_URL,
            "sha256",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
    },
    "fashion-mnist": {
        "train": RemoteFile(
            "fashion_mnist",
            "train-images-idx3-ubyte.gz",
            _FASHION_URL,
            "sha256",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        "test": RemoteFile(
            "fashion_mnist",
            "t10k-images-idx3-ubyte.gz",
            _FASHION_URL,
            "sha256",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
    },
    "binarized-mnist": {
        "train": RemoteFile(
            "binarized_mnist",
            "binarized_mnist_train.amat",
            _LAROCHELLE_URL,
            "sha256",
            "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
        ),
        "valid": RemoteFile(
            "binarized_mnist",
            "binarized_mnist_valid.amat",
            _LAROCHELLE_URL,
            "sha256",
            "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
        ),
        "test": RemoteFile(
            "binarized_mnist",
            "binarized_mnist_test.amat",
            _LAROCHELLE_URL,
            "sha256",
            "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
        ),
    },
    "omniglot": {
        "chardata": RemoteFile(
            "omniglot", "chardata.mat", _OMNIGLOT_URL, "git-blob", "016a3536ffe5e1d38e42563a18d7a78bfaf643ec"
        ),
    },
}


def file_digest(path: Path, algorithm: Algorithm) -> str:
    """The hex digest of a file's bytes, read in 1 MiB chunks."""
    git_blob_header = b"blob %d\0" % path.stat().st_size
    h = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(git_blob_header)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
