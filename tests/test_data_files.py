"""The published files: their bytes, sizes and pixel means, where they are searched for, and downloads.

Tests that read the real MNIST, Fashion-MNIST and binarized MNIST files take them from ``$IWAE_DATA_DIR``
and are skipped when it is unset or lacks them. Downloads are tested against a local HTTP server that
serves those files intact, altered, cut off mid-file, with a Content-Length that is no length, or stalled.
"""

import gzip
import hashlib
import http.server
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from iwae.data import DataError, download, load, sources
from iwae.data.catalogue import FILES, RemoteFile, file_digest
from iwae.data.sources import locate

PUBLISHED_MD5 = {
    "mnist/train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "mnist/t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "fashion_mnist/train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "fashion_mnist/t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "binarized_mnist/binarized_mnist_train.amat": "db28b1a6ae0fe70cbd3da91acf46e477",
    "binarized_mnist/binarized_mnist_valid.amat": "bf37822a04e94123630de6a7dfd9c9ef",
    "binarized_mnist/binarized_mnist_test.amat": "14e41ae11040adba6ab8cb291eda0dd8",
}


@pytest.fixture(scope="module")
def shared_data() -> Path:
    """``$IWAE_DATA_DIR`` when it holds the published files, else the test is skipped."""
    root = os.environ.get("IWAE_DATA_DIR")
    if not root or not all((Path(root) / file).is_file() for file in PUBLISHED_MD5):
        pytest.skip("IWAE_DATA_DIR does not point at the published MNIST, Fashion-MNIST and binarized MNIST files")
    return Path(root)


@pytest.fixture
def isolated(monkeypatch, tmp_path) -> Path:
    """An empty per-user cache, returned, and no data directory or mirror from the environment."""
    monkeypatch.delenv("IWAE_DATA_DIR", raising=False)
    monkeypatch.delenv("IWAE_DATA_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))
    return tmp_path / "cache-home" / "iwae"


def _binomial_tolerance(p: torch.Tensor, z: float = 5.0) -> float:
    """z standard errors of the mean of one Bernoulli(p) draw of every element of ``p``."""
    return z * math.sqrt(float((p.double() * (1 - p.double())).sum())) / p.numel()


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all()) and bool((x == 0).any()) and bool((x == 1).any())


def _raw_idx_pixels(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read()[16:], np.uint8)


# the published files


def test_files_are_the_published_bytes(shared_data):
    for file, md5 in PUBLISHED_MD5.items():
        assert hashlib.md5((shared_data / file).read_bytes()).hexdigest() == md5, file
    for dataset in ("mnist", "fashion-mnist", "binarized-mnist"):
        for remote in FILES[dataset].values():
            assert file_digest(shared_data / remote.folder / remote.name, remote.algorithm) == remote.digest


@pytest.fixture(scope="module")
def mnist(shared_data):
    return load("mnist", shared_data, download=False)


def test_mnist(mnist, shared_data):
    assert mnist.train.shape == (60000, 784) and mnist.test.shape == (10000, 784) and mnist.valid is None
    assert mnist.binarization == "dynamic" and mnist.image_shape == (28, 28) and mnist.train.dtype == torch.float32
    assert mnist.train.min() == 0 and mnist.train.max() == 1
    assert abs(float(mnist.train.double().mean()) - 0.1307) < 1e-4
    grey_test = torch.from_numpy(_raw_idx_pixels(shared_data / "mnist/t10k-images-idx3-ubyte.gz") / 255.0)
    assert _is_binary(mnist.test)
    assert abs(float(mnist.test.double().mean() - grey_test.mean())) < _binomial_tolerance(grey_test)


def test_mnist_code_split(mnist, shared_data, capsys):
    code = load("mnist", shared_data, download=False, split="code")
    assert f"iwae: reading mnist from {shared_data / 'mnist'}\n" == capsys.readouterr().err
    assert torch.equal(code.train, mnist.train[:59600]) and torch.equal(code.test, mnist.test)
    assert code.valid.shape == (400, 784) and _is_binary(code.valid)


def test_the_folder_read_from_is_printed_once_per_process(shared_data, capsys):
    for _ in range(3):  # as training, its evaluation and its figures do
        load("mnist", shared_data, download=False)
    assert capsys.readouterr().err == f"iwae: reading mnist from {shared_data / 'mnist'}\n"


def test_fashion_mnist(shared_data):
    fashion = load("fashion-mnist", shared_data, download=False)
    raw_mean = _raw_idx_pixels(shared_data / "fashion_mnist/train-images-idx3-ubyte.gz").mean() / 255
    assert fashion.train.shape == (60000, 784) and fashion.test.shape == (10000, 784)
    assert fashion.binarization == "dynamic" and fashion.train.min() == 0 and fashion.train.max() == 1
    assert abs(float(fashion.train.double().mean()) - raw_mean) < 1e-6 and abs(raw_mean - 0.2860) < 1e-4


def test_binarized_mnist(shared_data):
    binarized = load("binarized-mnist", shared_data, download=False)
    assert binarized.binarization == "static" and binarized.image_shape == (28, 28)
    for split, n, mean in (("train", 50000, 0.1306), ("valid", 10000, 0.1311), ("test", 10000, 0.1325)):
        x = getattr(binarized, split)
        assert x.shape == (n, 784) and _is_binary(x)
        assert abs(float(x.double().mean()) - mean) < 5e-5, split
    with (shared_data / "binarized_mnist/binarized_mnist_test.amat").open() as f:
        first_rows = [[int(v) for v in next(f).split()] for _ in range(3)]
    assert torch.equal(binarized.test[:3], torch.tensor(first_rows, dtype=torch.float32))


# where files are searched for


def _toy_remote(content: bytes) -> RemoteFile:
    return RemoteFile("toy", "toy.bin", "http://127.0.0.1:9/", "sha256", hashlib.sha256(content).hexdigest())


def test_search_order_and_layouts(tmp_path, isolated, monkeypatch):
    remote = _toy_remote(b"toy")
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    places = [explicit / "toy.bin", env / "toy" / "toy.bin", isolated / "toy.bin"]
    for place in places:
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_bytes(b"toy")
    monkeypatch.setenv("IWAE_DATA_DIR", str(env))
    for place in places:
        assert locate(remote, explicit, download=False) == place
        place.unlink()
    with pytest.raises(DataError) as error:
        locate(remote, explicit, download=False)
    message = str(error.value)
    assert "\n" not in message and "toy.bin was not found in" in message
    for folder in (explicit / "toy", explicit, env / "toy", env, isolated / "toy", isolated):
        assert str(folder) in message
    assert "--data-dir" in message and "IWAE_DATA_DIR" in message


def test_a_copy_in_the_datasets_folder_comes_before_one_beside_it(tmp_path, isolated):
    """Found first and good, it is used without reading the altered copy directly in the data folder."""
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy.bin").write_bytes(b"toy")
    (tmp_path / "toy.bin").write_bytes(b"not the toy")
    assert locate(_toy_remote(b"toy"), tmp_path, download=False) == tmp_path / "toy" / "toy.bin"


def test_a_folder_named_as_the_file_is_passed_over(tmp_path, isolated):
    (tmp_path / "toy" / "toy.bin").mkdir(parents=True)
    (tmp_path / "toy.bin").write_bytes(b"toy")
    assert locate(_toy_remote(b"toy"), tmp_path, download=False) == tmp_path / "toy.bin"


def test_local_file_with_wrong_checksum_is_reported_and_left_alone(tmp_path, isolated):
    remote = _toy_remote(b"toy")
    (tmp_path / "toy.bin").write_bytes(b"not the toy")
    with pytest.raises(DataError) as error:
        locate(remote, tmp_path, download=False)
    actual = hashlib.sha256(b"not the toy").hexdigest()
    assert f"{tmp_path / 'toy.bin'} has sha256 {actual}, expected {remote.digest}" in str(error.value)
    assert (tmp_path / "toy.bin").read_bytes() == b"not the toy"


def test_an_empty_local_file_is_called_empty_and_left_alone(tmp_path, isolated):
    remote = _toy_remote(b"toy")
    (tmp_path / "toy.bin").write_bytes(b"")
    with pytest.raises(DataError) as error:
        locate(remote, tmp_path, download=False)
    assert str(error.value) == (
        f"{tmp_path / 'toy.bin'} is empty (0 bytes), so it is not the published toy.bin ({remote.url}); replace it "
        "with the published file, or delete it to download it again."
    )
    assert (tmp_path / "toy.bin").exists()


def test_a_file_of_another_dataset_of_that_name_is_skipped(tmp_path, isolated, monkeypatch):
    """MNIST's and Fashion-MNIST's files share their names: one dataset's file, found where the other's is looked
    for, is passed over for a copy further on (here the cache's), and named if there is none."""
    mine, theirs = _toy_remote(b"mine"), RemoteFile("theirs", "toy.bin", "http://127.0.0.1:9/", "sha256",
                                                    hashlib.sha256(b"theirs").hexdigest())
    monkeypatch.setattr(sources, "FILES", {"mine": {"x": mine}, "theirs": {"x": theirs}})
    (tmp_path / "toy.bin").write_bytes(b"theirs")
    (isolated / "toy").mkdir(parents=True)
    (isolated / "toy" / "toy.bin").write_bytes(b"mine")
    assert locate(mine, tmp_path, download=False) == isolated / "toy" / "toy.bin"
    (isolated / "toy" / "toy.bin").unlink()
    with pytest.raises(DataError) as error:
        locate(mine, tmp_path, download=False)
    message = str(error.value)
    assert f"{tmp_path / 'toy.bin'} is the file of theirs/, skipped" in message and "\n" not in message
    assert (tmp_path / "toy.bin").read_bytes() == b"theirs"


def test_data_folders_that_are_not_folders_are_refused(tmp_path, isolated, monkeypatch):
    (tmp_path / "a-file").write_text("")
    for given, env, named in [(tmp_path / "a-file", None, "data_dir"), (tmp_path / "absent", None, "data_dir"),
                              (None, tmp_path / "absent", "$IWAE_DATA_DIR")]:
        if env is not None:
            monkeypatch.setenv("IWAE_DATA_DIR", str(env))
        with pytest.raises(DataError) as error:
            locate(_toy_remote(b"toy"), given, download=True)
        message = str(error.value)
        assert message.startswith(f"{named} is {given or env}, which is ") and "give the folder" in message
    assert not isolated.exists()  # nothing downloaded past it


def test_an_unusable_cache_or_mirror_is_named(tmp_path, isolated, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DataError) as error:
        locate(_toy_remote(b"toy"), None, download=True)
    assert "Cannot download toy.bin into" in str(error.value) and "set XDG_CACHE_HOME" in str(error.value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))
    for mirror, problem in [("notaurl", "it has no scheme (http, https, ftp or file)"),
                            ("127.0.0.1:8000/data", "it has no scheme (http, https, ftp or file)"),
                            ("localhost:8000/data", "its scheme is 'localhost', not http, https, ftp or file"),
                            ("http://[::1/data", "Invalid IPv6 URL"),
                            (f"http://{'a' * 64}/data", "encoding with 'idna' codec failed")]:  # as urlopen found
        monkeypatch.setenv("IWAE_DATA_URL", mirror)
        with pytest.raises(DataError) as error:
            locate(_toy_remote(b"toy"), None, download=True)
        message = str(error.value)
        assert message.startswith(f"Cannot download {mirror}/toy/toy.bin (made from $IWAE_DATA_URL, which is "
                                  f"{mirror!r}): {problem}"), message
        assert "; give a mirror's URL such as https://host/path" in message
        assert not list((tmp_path / "cache-home").rglob("*.part"))


# downloads from a local server


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``root`` under ``/good/``, with one byte flipped under ``/corrupt/``, under ``/drop/``
    announces the full length but closes the connection after half the body, under ``/not-a-length/`` and
    ``/negative-length/`` sends the body whole with a Content-Length that is no length, and under ``/stall/``
    sends the headers, then nothing for ``_STALL_S``."""

    root: Path


_NO_LENGTHS = {"not-a-length": "abc", "negative-length": "-1"}
_STALL_S = 2.0


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        mode, _, relative = self.path.lstrip("/").partition("/")
        path = self.server.root / relative
        if not path.is_file():
            self.send_error(404)
            return
        body = bytearray(path.read_bytes())
        if mode == "corrupt":
            body[len(body) // 2] ^= 0xFF
        self.send_response(200)
        self.send_header("Content-Length", _NO_LENGTHS.get(mode, str(len(body))))
        self.end_headers()
        self.close_connection = True
        if mode == "stall":
            time.sleep(_STALL_S)
            return
        self.wfile.write(body[: len(body) // 2] if mode == "drop" else body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(shared_data):
    """The base URL of a local server of the published files, on a free port."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.root = shared_data
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _files_under(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_download_lands_in_cache(server, isolated, monkeypatch, mnist, capsys):
    monkeypatch.setenv("IWAE_DATA_URL", server + "/good")
    downloaded = load("mnist")
    assert sorted(path.name for path in _files_under(isolated)) == [
        "t10k-images-idx3-ubyte.gz",
        "train-images-idx3-ubyte.gz",
    ]
    assert torch.equal(downloaded.train, mnist.train) and torch.equal(downloaded.test, mnist.test)
    assert f"iwae: reading mnist from {isolated / 'mnist'}" in capsys.readouterr().err
    monkeypatch.setenv("IWAE_DATA_URL", server + "/missing-everything")
    assert torch.equal(load("mnist", download=False).train, mnist.train)


def test_corrupt_download_refused_cache_untouched(server, isolated, monkeypatch, shared_data):
    (isolated / "mnist").mkdir(parents=True)
    (isolated / "mnist" / "unrelated.txt").write_text("kept")
    before = _files_under(isolated)
    monkeypatch.setenv("IWAE_DATA_URL", server + "/corrupt")
    remote = FILES["mnist"]["test"]
    corrupt = bytearray((shared_data / remote.folder / remote.name).read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    with pytest.raises(DataError) as error:
        locate(remote, None, download=True)
    message = str(error.value)
    assert f"has sha256 {hashlib.sha256(corrupt).hexdigest()}, expected {remote.digest}" in message
    assert "not kept" in message and "\n" not in message
    assert _files_under(isolated) == before


@pytest.mark.parametrize(("mode", "fragment"), [("drop", "stopped after"), ("gone", "HTTP Error 404")])
def test_failed_download_leaves_nothing(server, isolated, monkeypatch, mode, fragment):
    monkeypatch.setenv("IWAE_DATA_URL", f"{server}/{mode}")
    remote = FILES["mnist"]["test"] if mode == "drop" else _toy_remote(b"toy")
    with pytest.raises(DataError) as error:
        locate(remote, None, download=True)
    message = str(error.value)
    assert fragment in message and f"{server}/{mode}/{remote.folder}/{remote.name}" in message
    assert "--data-dir" in message and "\n" not in message
    assert _files_under(isolated) == {}


def test_a_mirror_given_with_a_trailing_slash(server, isolated, monkeypatch):
    monkeypatch.setenv("IWAE_DATA_URL", server + "/good/")
    remote = FILES["mnist"]["test"]
    assert locate(remote, None, download=True) == isolated / remote.folder / remote.name


def test_a_git_blob_file_is_checked_by_its_own_algorithm(server, isolated, monkeypatch, shared_data):
    monkeypatch.setenv("IWAE_DATA_URL", server + "/good")
    published = FILES["mnist"]["test"]
    source = shared_data / published.folder / published.name
    remote = RemoteFile(published.folder, published.name, "http://127.0.0.1:9/", "git-blob",
                        file_digest(source, "git-blob"))
    assert locate(remote, None, download=True).read_bytes() == source.read_bytes()


@pytest.mark.parametrize("mode", _NO_LENGTHS)
def test_a_content_length_that_is_no_length_is_an_unknown_length(server, isolated, monkeypatch, shared_data, mode):
    """The checksum still tells a short or altered body."""
    monkeypatch.setenv("IWAE_DATA_URL", f"{server}/{mode}")
    remote = FILES["mnist"]["test"]
    path = locate(remote, None, download=True)
    assert path.read_bytes() == (shared_data / remote.folder / remote.name).read_bytes()


def test_a_download_that_stalls_times_out_and_leaves_nothing(server, isolated, monkeypatch):
    monkeypatch.setattr(download, "_TIMEOUT_S", _STALL_S / 10)
    monkeypatch.setenv("IWAE_DATA_URL", server + "/stall")
    with pytest.raises(DataError) as error:
        locate(FILES["mnist"]["test"], None, download=True)
    assert "timed out" in str(error.value) and "\n" not in str(error.value)
    assert _files_under(isolated) == {}


def test_a_download_interrupted_mid_file_leaves_nothing(server, isolated, monkeypatch):
    class InterruptedBar(download.tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            raise KeyboardInterrupt  # as Ctrl-C does, after the first chunk is written

    monkeypatch.setattr(download, "tqdm", InterruptedBar)
    monkeypatch.setenv("IWAE_DATA_URL", server + "/good")
    with pytest.raises(KeyboardInterrupt):
        locate(FILES["mnist"]["test"], None, download=True)
    assert (isolated / "mnist").is_dir() and _files_under(isolated) == {}


def test_a_download_removes_the_parts_of_killed_downloads_and_is_readable_by_all(server, isolated, monkeypatch):
    monkeypatch.setenv("IWAE_DATA_URL", server + "/good")
    remote = FILES["mnist"]["test"]
    folder = isolated / remote.folder
    folder.mkdir(parents=True)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                            check=True).stdout.strip()
    host = socket.gethostname()
    killed = folder / f".{remote.name}.{exited}@{host}.abc.part"  # its process ended without removing it
    running = folder / f".{remote.name}.{os.getpid()}@{host}.def.part"  # a download still under way
    other_host = folder / f".{remote.name}.{exited}@not-{host}.ghi.part"  # on a shared folder: not ours to judge
    for part in (killed, running, other_host):
        part.write_bytes(b"partial")
    mask = os.umask(0o022)
    try:
        path = locate(remote, None, download=True)
    finally:
        os.umask(mask)
    assert path.parent == folder
    assert not killed.exists() and running.exists() and other_host.exists()
    assert path.stat().st_mode & 0o777 == 0o644
