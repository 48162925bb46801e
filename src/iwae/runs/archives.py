"""Files written by ``torch.save`` with a CRC-32 in every record, checked when they are read back: bits changed on
the disk or in a copy are found before a run trains, or an evaluation counts, on them. (``torch.load`` reads the
records without checking their checksums.)"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO, Any

import torch


def save(obj: Any, file: IO[bytes]) -> None:
    """``torch.save(obj, file)`` with a CRC-32 in every record, whatever ``torch.serialization.set_crc32_options``
    says."""
    with_checksums = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        torch.save(obj, file)
    finally:
        torch.serialization.set_crc32_options(with_checksums)


def changed_record(path: Path) -> str | None:
    """The first record of the archive ``path`` whose bytes no longer match their CRC-32, or None if all match."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:  # a damaged index or record header
        return f"index ({type(error).__name__})"
