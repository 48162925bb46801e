"""Find a catalogued file on disk, or download it, and check it is the published one.

Search order: the explicit ``data_dir``, the environment variable ``IWAE_DATA_DIR``, the per-user cache
(``$XDG_CACHE_HOME/iwae``, else ``~/.cache/iwae``), then a download into that cache. In each directory a
file may sit in its dataset's folder (``<dir>/mnist/train-images-idx3-ubyte.gz``) or directly in the
directory; MNIST and Fashion-MNIST use the same file names, so only one of them can sit there directly (a file
of the other is recognised by its checksum and skipped).
"""

import os
from pathlib import Path

from iwae.data.catalogue import FILES, RemoteFile, file_digest
from iwae.data.download import fetch
from iwae.data.errors import DataError

DATA_DIR_ENV = "IWAE_DATA_DIR"


def cache_dir() -> Path:
    """The per-user directory that downloads go to."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iwae"


def search_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The directories searched, in order: ``data_dir``, ``$IWAE_DATA_DIR``, the cache.

    Raises:
        DataError: if ``data_dir`` or ``$IWAE_DATA_DIR`` is given but is not a directory.
    """
    given = [(data_dir, "data_dir"), (os.environ.get(DATA_DIR_ENV), f"${DATA_DIR_ENV}")]
    dirs = [(Path(d).expanduser(), label) for d, label in given if d]
    for folder, label in dirs:
        if not folder.is_dir():
            what = "a file" if folder.exists() else "not there"
            raise DataError(f"{label} is {folder}, which is {what}; give the folder that holds the dataset's files "
                            "(or its mnist/, omniglot/, ... folders), or unset it to search the cache.")
    return [*(folder for folder, _ in dirs), cache_dir()]


def locate(remote: RemoteFile, data_dir: str | os.PathLike[str] | None, download: bool) -> Path:
    """The path of a verified copy of ``remote``: the first one found, else a fresh download.

    Raises:
        DataError: if the file found has the wrong checksum, or none is found and downloading is off or
            fails.
    """
    folders = [folder for d in search_dirs(data_dir) for folder in (d / remote.folder, d)]
    others = []  # files of that name found, which are another dataset's
    for folder in folders:
        path = folder / remote.name
        if path.is_file():
            other = _verify(path, remote)
            if other is None:
                return path
            others.append(f"{path} is the file of {other.folder}/, skipped")
    how_to_supply = (
        f"{remote.name} was not found in {', '.join(map(str, folders))}"
        + "".join(f" ({found})" for found in others)
        + f"; put it in one of those folders, or pass --data-dir or set {DATA_DIR_ENV} to a folder holding "
        f"{remote.folder}/{remote.name}"
    )
    if not download:
        raise DataError(f"Downloading is off and {how_to_supply}.")
    return fetch(remote, cache_dir() / remote.folder / remote.name, how_to_supply)


def _verify(path: Path, remote: RemoteFile) -> RemoteFile | None:
    """None if ``path`` is ``remote``; the other catalogued file it is, if it is one (MNIST's and Fashion-MNIST's
    files share their names).

    Raises:
        DataError: if it is no catalogued file.
    """
    actual = file_digest(path, remote.algorithm)
    if actual == remote.digest:
        return None
    for files in FILES.values():
        for other in files.values():
            if (other.algorithm, other.digest) == (remote.algorithm, actual):
                return other
    empty = path.stat().st_size == 0
    found = "is empty (0 bytes)" if empty else f"has {remote.algorithm} {actual}, expected {remote.digest}"
    raise DataError(
        f"{path} {found}, so it is not the published {remote.name} ({remote.url}); replace it with the published "
        "file, or delete it to download it again."
    )
