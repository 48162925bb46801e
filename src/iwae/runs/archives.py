"""Files written by ``torch.save`` with a CRC-32 in every record, checked when they are read back: bits changed on
the disk or in a copy are found before a run trains, or an evaluation counts, on them. (``torch.load`` reads the
records without checking their checksums.)"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import IO, Any

import torch


class NotAnArchive(ValueError):
    """A file that is not a complete zip archive (cut short, or some other file); ``size`` its bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes that are not a complete zip archive")
        self.size = size


class ChangedRecord(ValueError):
    """An archive whose record ``record`` no longer matches the CRC-32 written with it."""

    def __init__(self, record: str) -> None:
        super().__init__(f"record {record} does not match its checksum")
        self.record = record


def save(obj: Any, file: IO[bytes]) -> None:
    """``torch.save(obj, file)`` with a CRC-32 in every record, whatever ``torch.serialization.set_crc32_options``
    says."""
    with_checksums = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        torch.save(obj, file)
    finally:
        torch.serialization.set_crc32_options(with_checksums)


def load(path: Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` from one read of the file, once every record's
    CRC-32 has been checked.

    Raises:
      NotAnArchive, ChangedRecord: as their names say; torch.load's own exceptions for what it cannot unpickle.
    """
    content = io.BytesIO(path.read_bytes())
    if not zipfile.is_zipfile(content):  # torch.save writes a zip archive, whose index sits at the very end
        raise NotAnArchive(len(content.getbuffer()))
    changed = _changed_record(content)
    if changed is not None:
        raise ChangedRecord(changed)
    content.seek(0)
    return torch.load(content, map_location="cpu", weights_only=True)


def _changed_record(archive: IO[bytes]) -> str | None:
    """The first record of the zip file ``archive`` whose bytes no longer match their CRC-32, or None if all match."""
    try:
        with zipfile.ZipFile(archive) as opened:
            return opened.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:  # a damaged index or record header
        return f"index ({type(error).__name__})"
