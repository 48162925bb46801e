"""Download one catalogued file: stream it to a temporary file beside the target, verify it, rename it.

The target appears only once its checksum matches, so an interrupted, truncated or altered download never
leaves a file that a later run could mistake for the real one. The temporary file is named after its process
(``.<name>.<pid>@<host>.<random>.part``), so that one left by a process that was killed (no ``except`` runs on
SIGKILL, nor on SIGTERM's default action) is removed by the next download of the file on that host, while a
download still running beside it is left alone. The base URL can be replaced by a mirror
with the same layout as a data directory (``<mirror>/<folder>/<name>``) through ``IWAE_DATA_URL``.
"""

import http.client
import os
import socket
import tempfile
import urllib.parse
import urllib.request
import urllib.response
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from iwae.data.catalogue import RemoteFile, file_digest
from iwae.data.errors import DataError

MIRROR_ENV = "IWAE_DATA_URL"
_CHUNK = 1 << 16
_TIMEOUT_S = 60
_FETCHED_SCHEMES = ("http", "https", "ftp", "file")


def source_url(remote: RemoteFile, how_to_supply: str) -> str:
    """The URL a file is fetched from: ``$IWAE_DATA_URL/<folder>/<name>`` if set, else the canonical one.

    Raises:
        DataError: if ``$IWAE_DATA_URL`` is set to no URL of a scheme urllib downloads from (http, https, ftp,
            file), e.g. ``host:port/path``.
    """
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return remote.url
    url = f"{mirror.rstrip('/')}/{remote.folder}/{remote.name}"
    try:
        scheme = urllib.parse.urlsplit(url).scheme
    except ValueError as error:  # urlsplit's "Invalid IPv6 URL"
        raise _unusable_url(url, str(error), how_to_supply) from error
    if scheme not in _FETCHED_SCHEMES:
        named = f"{', '.join(_FETCHED_SCHEMES[:-1])} or {_FETCHED_SCHEMES[-1]}"
        problem = f"its scheme is {scheme!r}, not {named}" if scheme else f"it has no scheme ({named})"
        raise _unusable_url(url, problem, how_to_supply)
    return url


def fetch(remote: RemoteFile, target: Path, how_to_supply: str) -> Path:
    """Download ``remote`` to ``target``, keeping it only if complete and its checksum matches.

    Raises:
        DataError: on a folder it cannot write to, a URL it cannot read, an HTTP or network error, a connection
            closed before the announced length, or a checksum mismatch; the partial download is deleted first.
    """
    url = source_url(remote, how_to_supply)
    host = socket.gethostname()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_parts(target.parent, remote.name, host)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{remote.name}.{os.getpid()}@{host}.",
                                        suffix=".part")
    except OSError as error:
        raise DataError(f"Cannot download {remote.name} into {target.parent} ({error.strerror}); set "
                        f"XDG_CACHE_HOME to a folder you can write to, or {how_to_supply}.") from error
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, remote.name, how_to_supply)
        actual = file_digest(tmp, remote.algorithm)
        if actual != remote.digest:
            raise DataError(
                f"The download of {remote.name} from {url} has {remote.algorithm} {actual}, expected "
                f"{remote.digest}, so it was not kept; {how_to_supply}."
            )
        os.chmod(tmp, 0o666 & ~_umask())  # as a file the user creates (mkstemp's is private to its owner)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _remove_abandoned_parts(folder: Path, name: str, host: str) -> None:
    """Delete the partial downloads of ``name`` in ``folder`` whose process, on ``host`` (this one), no longer
    runs."""
    for part in folder.glob(f".{name}.*.part"):
        pid, at, rest = part.name[len(name) + 2:].partition("@")
        if at and pid.isdigit() and rest.startswith(f"{host}.") and not _running(int(pid)):
            part.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stream(url: str, out: BinaryIO, label: str, how_to_supply: str) -> None:
    """Copy the body at ``url`` into ``out`` with a progress bar; raise DataError if it arrives short."""
    try:
        with _open(url, how_to_supply) as response:
            total = _announced_length(response.headers.get("Content-Length"))
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {label}", disable=None) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as error:
        raise DataError(f"Downloading {url} failed ({error}); {how_to_supply}.") from error
    if total is not None and received != total:
        raise DataError(f"Downloading {url} stopped after {received} of {total} bytes; {how_to_supply}.")


def _open(url: str, how_to_supply: str) -> http.client.HTTPResponse | urllib.response.addinfourl:
    """``urllib.request.urlopen(url)``'s response, or a DataError for a URL it cannot read."""
    try:
        return urllib.request.urlopen(url, timeout=_TIMEOUT_S)
    except ValueError as error:  # e.g. a host name that IDNA cannot encode (a label over 63 characters)
        raise _unusable_url(url, str(error), how_to_supply) from error


def _unusable_url(url: str, problem: str, how_to_supply: str) -> DataError:
    """The error for a URL that urllib cannot download from, naming ``$IWAE_DATA_URL`` if it is set."""
    given = os.environ.get(MIRROR_ENV)
    mirror = f" (made from ${MIRROR_ENV}, which is {given!r})" if given else ""
    return DataError(f"Cannot download {url}{mirror}: {problem}; give a mirror's URL such as https://host/path or "
                     f"file:///folder, or {how_to_supply}.")


def _announced_length(header: str | None) -> int | None:
    """The body's length that a Content-Length header gives; None without one, or for one that is no length (the
    checksum still tells a short body)."""
    if header is None:
        return None
    try:
        length = int(header)
    except ValueError:
        return None
    return length if length >= 0 else None
