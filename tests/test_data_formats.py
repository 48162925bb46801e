"""Parsers and loaders on small files the tests write: IDX, .amat, Omniglot's chardata.mat, user arrays."""

import gzip
import hashlib
import struct
import zipfile

import numpy as np
import pytest
import scipy.io
import torch

from iwae.data import DataError, binarize, load
from iwae.data import catalogue as catalogue_module
from iwae.data.catalogue import RemoteFile, file_digest
from iwae.data.formats import read_amat, read_chardata, read_idx_images


def _one_line_naming(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# IDX


def _write_idx(path, images: np.ndarray, magic: bytes = b"\x00\x00\x08\x03", drop: int = 0) -> None:
    header = magic + struct.pack(">3I", *images.shape)
    path.write_bytes(gzip.compress(header + images.astype(np.uint8).tobytes()[: images.size - drop]))


def test_idx_images_parse(tmp_path):
    images = np.arange(3 * 2 * 5).reshape(3, 2, 5)
    _write_idx(tmp_path / "ok.gz", images)
    assert np.array_equal(read_idx_images(tmp_path / "ok.gz"), images.reshape(3, 10))


def test_idx_bad_magic(tmp_path):
    _write_idx(tmp_path / "labels.gz", np.zeros((2, 2, 2)), magic=b"\x00\x00\x08\x01")
    with pytest.raises(DataError) as error:
        read_idx_images(tmp_path / "labels.gz")
    _one_line_naming(error, "labels.gz", "00000801", "00000803")


@pytest.mark.parametrize("size", [6, 15])  # 15: one byte short of the header
def test_idx_cut_inside_its_header(tmp_path, size):
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 1, 2, 2)
    (tmp_path / "short.gz").write_bytes(gzip.compress(header[:size]))
    with pytest.raises(DataError) as error:
        read_idx_images(tmp_path / "short.gz")
    _one_line_naming(error, "short.gz", f"ends after {size} bytes, inside the 16-byte header")


def test_a_directory_named_as_a_users_file_is_called_one(tmp_path):
    (tmp_path / "arrays.npy").mkdir()
    with pytest.raises(DataError, match=r"arrays\.npy is a directory; give the path of a \.npy or \.npz file"):
        load(tmp_path / "arrays.npy")


def test_idx_wrong_size(tmp_path):
    _write_idx(tmp_path / "short.gz", np.zeros((4, 3, 3)), drop=5)
    with pytest.raises(DataError) as error:
        read_idx_images(tmp_path / "short.gz")
    _one_line_naming(error, "short.gz", "31 bytes", "36")


def test_idx_with_bytes_after_its_images(tmp_path):
    images = np.zeros((4, 3, 3))
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", *images.shape)
    (tmp_path / "long.gz").write_bytes(gzip.compress(header + images.astype(np.uint8).tobytes() + b"\x00"))
    with pytest.raises(DataError) as error:
        read_idx_images(tmp_path / "long.gz")
    _one_line_naming(error, "long.gz", "37 bytes", "36")


@pytest.mark.parametrize("damage", ["truncate", "not-gzip"])
def test_idx_corrupt_gzip(tmp_path, damage):
    _write_idx(tmp_path / "x.gz", np.zeros((50, 28, 28)) + np.arange(784).reshape(28, 28))
    raw = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"IDX?" + raw[4:])
    with pytest.raises(DataError) as error:
        read_idx_images(tmp_path / "x.gz")
    _one_line_naming(error, "x.gz", "gzip")


# .amat


def test_amat_parse(tmp_path):
    rows = np.array([[0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    (tmp_path / "a.amat").write_text("".join(" ".join(map(str, row)) + "\n" for row in rows))
    assert np.array_equal(read_amat(tmp_path / "a.amat", width=4), rows)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0 1 1\n1 0 0\n", "first row has 3 values"),
        ("", "0 bytes"),
        ("0 1 1 0\n1 0 2 0\n", "row 2"),
        ("0 1 1 0\n1 0,0 0\n", "row 2"),
        ("0 1 1 0 1 0 0 0\n", "row 1"),
    ],
)
def test_amat_corrupt(tmp_path, text, fragment):
    (tmp_path / "bad.amat").write_text(text)
    with pytest.raises(DataError) as error:
        read_amat(tmp_path / "bad.amat", width=4)
    _one_line_naming(error, "bad.amat", fragment)


# Omniglot chardata.mat


def _asymmetric_images(n: int) -> np.ndarray:
    """n upright 28x28 images, (n, 784) row-major: a full top row, a full left column, a distinct dot."""
    images = np.zeros((n, 28, 28), np.float32)
    images[:, 0, :] = 1.0
    images[:, :, 0] = 0.5
    for k in range(n):
        images[k, 5 + k % 20, 9 + k % 17] = 0.25
    return images.reshape(n, 784)


def _chardata_layout(images: np.ndarray) -> np.ndarray:
    """MATLAB's layout: one column per image, each image's pixels in column-major order."""
    return images.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, 784).T


@pytest.fixture
def chardata(tmp_path):
    train, test = _asymmetric_images(1400), _asymmetric_images(7)[::-1]
    path = tmp_path / "omniglot" / "chardata.mat"
    path.parent.mkdir()
    scipy.io.savemat(path, {"data": _chardata_layout(train), "testdata": _chardata_layout(test)})
    return path, train, test


def test_chardata_images_upright(chardata):
    path, train, test = chardata
    read_train, read_test = read_chardata(path)
    assert np.array_equal(read_train, train) and np.array_equal(read_test, test)
    first = read_train[0].reshape(28, 28)
    assert (first[0, 1:] == 1).all() and (first[1:, 0] == 0.5).all() and first[5, 9] == 0.25
    official = scipy.io.loadmat(path)["data"].T.reshape((-1, 28, 28)).reshape((-1, 784), order="F")
    assert np.array_equal(read_train, official)


def _git_blob_id(path) -> str:
    content = path.read_bytes()
    return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()


def _fake_omniglot(monkeypatch, digest: str) -> None:
    remote = RemoteFile("omniglot", "chardata.mat", "http://127.0.0.1:9/", "git-blob", digest)
    monkeypatch.setitem(catalogue_module.FILES, "omniglot", {"chardata": remote})


def test_omniglot_loads_a_verified_chardata(chardata, monkeypatch):
    path, train, _ = chardata
    assert file_digest(path, "git-blob") == _git_blob_id(path)
    _fake_omniglot(monkeypatch, _git_blob_id(path))
    omniglot = load("omniglot", data_dir=path.parent.parent, download=False)
    assert torch.equal(omniglot.train, torch.from_numpy(train)) and omniglot.valid is None
    assert omniglot.test.shape == (7, 784) and set(omniglot.test.unique().tolist()) == {0.0, 1.0}
    assert omniglot.binarization == "dynamic" and omniglot.image_shape == (28, 28)


def test_omniglot_code_split_matches_official_shuffle(chardata, monkeypatch):
    path, train, _ = chardata
    _fake_omniglot(monkeypatch, _git_blob_id(path))
    omniglot = load("omniglot", data_dir=path.parent, download=False, split="code")
    shuffled = train[np.random.RandomState(123).permutation(1400)]
    assert torch.equal(omniglot.train, torch.from_numpy(shuffled[:55]))
    assert omniglot.valid.shape == (1345, 784) and set(omniglot.valid.unique().tolist()) == {0.0, 1.0}


def test_omniglot_wrong_blob_id_refused(chardata, monkeypatch):
    path, _, _ = chardata
    _fake_omniglot(monkeypatch, "016a3536ffe5e1d38e42563a18d7a78bfaf643ec")
    with pytest.raises(DataError) as error:
        load("omniglot", data_dir=path.parent.parent, download=False)
    _one_line_naming(error, str(path), "016a3536ffe5e1d38e42563a18d7a78bfaf643ec", _git_blob_id(path))
    assert path.exists()


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"testdata": np.zeros((784, 2))}, "array 'data' is missing"),
        ({"data": np.zeros((28, 28)), "testdata": np.zeros((784, 2))}, "array 'data' is of shape (28, 28)"),
        ({"data": np.zeros((784, 3)), "testdata": np.full((784, 2), 2.0)}, "array 'testdata' has values"),
    ],
)
def test_chardata_wrong_arrays(tmp_path, arrays, fragment):
    scipy.io.savemat(tmp_path / "c.mat", arrays)
    with pytest.raises(DataError) as error:
        read_chardata(tmp_path / "c.mat")
    _one_line_naming(error, "c.mat", fragment)


def test_chardata_truncated(chardata):
    path, _, _ = chardata
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError) as error:
        read_chardata(path)
    _one_line_naming(error, "chardata.mat", "not a readable .mat file")


# user arrays


def test_user_npy_grey_is_dynamic_with_seeded_test_split(tmp_path):
    x = np.random.default_rng(0).random((50, 16))
    np.save(tmp_path / "x.npy", x)
    data = load(tmp_path / "x.npy", test_fraction=0.2)
    assert data.binarization == "dynamic" and data.image_shape == (4, 4)
    assert data.train.shape == (40, 16) and data.test.shape == (10, 16) and data.train.dtype == torch.float32
    order = np.random.default_rng(0).permutation(50)
    assert torch.equal(data.train, torch.from_numpy(x[order[:40]].astype(np.float32)))
    assert set(data.test.unique().tolist()) == {0.0, 1.0}


def test_user_npz_of_one_array_of_any_name_is_the_training_set(tmp_path):
    x = np.random.default_rng(4).random((20, 4), dtype=np.float32)
    np.savez(tmp_path / "one.npz", x_train=x)
    data = load(tmp_path / "one.npz")  # the default test_fraction, 0.1
    assert data.train.shape == (18, 4) and data.test.shape == (2, 4) and data.valid is None
    assert torch.equal(data.train, torch.from_numpy(x[np.random.default_rng(0).permutation(20)[:18]]))


def test_user_file_named_from_home(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((50, 16)))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert torch.equal(load("~/x.npy").train, load(tmp_path / "x.npy").train)


def test_user_npz_binary_is_static_and_keeps_its_splits(tmp_path):
    rng = np.random.default_rng(1)
    train, valid, test = (rng.integers(0, 2, (n, 10)).astype(np.uint8) for n in (30, 5, 6))
    np.savez(tmp_path / "b.npz", train=train, valid=valid, test=test)
    data = load(str(tmp_path / "b.npz"))
    assert data.binarization == "static" and data.image_shape is None
    assert torch.equal(data.test, torch.from_numpy(test).float())
    assert torch.equal(data.valid, torch.from_numpy(valid).float())
    assert data.name == str(tmp_path / "b.npz")


@pytest.mark.parametrize("grey", ["train", "test"])
def test_user_npz_of_binary_and_grey_splits_is_dynamic_with_a_binary_test_set(tmp_path, grey):
    rng = np.random.default_rng(5)
    arrays = {"train": rng.integers(0, 2, (30, 10)).astype(np.float32), "test": rng.integers(0, 2, (6, 10))}
    arrays[grey] = rng.random(arrays[grey].shape, dtype=np.float32)
    np.savez(tmp_path / "mixed.npz", **arrays)
    data = load(tmp_path / "mixed.npz")
    assert data.binarization == "dynamic" and torch.equal(data.train, torch.from_numpy(arrays["train"]))
    assert set(data.test.unique().tolist()) == {0.0, 1.0}


def test_user_npz_of_booleans_is_static_zeros_and_ones(tmp_path):
    train = np.random.default_rng(3).random((20, 6)) < 0.5
    np.savez(tmp_path / "bool.npz", train=train, test=~train[:4])
    data = load(tmp_path / "bool.npz")
    assert data.binarization == "static" and set(data.train.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(data.train, torch.from_numpy(train).float())
    assert torch.equal(data.test, torch.from_numpy(~train[:4]).float())


def test_user_npz_grey_held_out_splits_are_binarized_once_each_with_its_own_seed(tmp_path):
    """test with the evaluation seed, valid with the seed after it: the same draws in every run and evaluation."""
    rng = np.random.default_rng(2)
    train, valid, test = (rng.random((n, 10), dtype=np.float32) for n in (30, 6, 6))
    np.savez(tmp_path / "g.npz", train=train, valid=valid, test=test)
    data = load(str(tmp_path / "g.npz"), eval_seed=3)
    assert data.binarization == "dynamic" and torch.equal(data.train, torch.from_numpy(train))
    for split, grey, seed in (("test", test, 3), ("valid", valid, 4)):
        expected = binarize(torch.from_numpy(grey), torch.Generator().manual_seed(seed))
        assert torch.equal(getattr(data, split), expected), split


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros(10), "has shape (10,)"),
        (np.zeros((2, 3, 4)), "has shape (2, 3, 4)"),
        (np.zeros((0, 4)), "has shape (0, 4)"),
        (np.zeros((4, 0)), "has shape (4, 0); expected (N, D) with one example per row, N and D >= 1"),
        (np.array([["a", "b"], ["c", "d"]]), "has dtype <U1"),
        (np.full((20, 2), 0.5, np.complex64), "has dtype complex64; expected real numbers in [0, 1]"),
        (np.array([[0.5, np.nan], [0.0, 1.0]]), "NaN"),
        (np.array([[0, 255], [3, 4]], np.uint8), "values from 0 to 255; expected values in [0, 1] (divide 8-bit"),
        (np.array([[-0.5, 0.2], [0.0, 1.0]]), "values from -0.5 to 1.0; expected values in [0, 1] (rescale or"),
        # grey levels a little past 1, or in [0, 2]: dividing by 255 would squash them, not fix them
        (np.array([[0.0, 1.0000001], [0.3, 1.0]]), "expected values in [0, 1] (rescale or clip them into [0, 1])"),
        (np.array([[0.0, 2.0], [0.5, 1.5]]), "expected values in [0, 1] (rescale or clip them into [0, 1])"),
        (np.array([[0.0, 255.0], [3.0, 4.0]]), "expected values in [0, 1] (divide 8-bit images by 255)"),
    ],
)
def test_user_array_refused(tmp_path, array, fragment):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError) as error:
        load(tmp_path / "bad.npy")
    _one_line_naming(error, "bad.npy", fragment)


def test_user_npz_problems(tmp_path):
    np.savez(tmp_path / "keys.npz", a=np.zeros((4, 2)), b=np.zeros((4, 2)))
    np.savez(tmp_path / "widths.npz", train=np.zeros((4, 2)), test=np.zeros((4, 3)))
    np.savez(tmp_path / "test.npz", test=np.zeros((4, 2)))
    np.savez(tmp_path / "held-out.npz", valid=np.zeros((4, 2)), test=np.zeros((4, 2)))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.save(tmp_path / "objects.npy", np.array([[0.5, None]], dtype=object))
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "zero.npz").write_bytes(b"")
    (tmp_path / "zero.npy").write_bytes(b"")
    cases = {
        "empty.npz": "holds no arrays; save the training data in it, e.g. numpy.savez(path, train=x_train)",
        "zero.npz": "is empty (0 bytes); save the data in it with numpy.save (.npy) or numpy.savez (.npz)",
        "zero.npy": "is empty (0 bytes); save the data in it with numpy.save (.npy) or numpy.savez (.npz)",
        "keys.npz": "holds arrays ['a', 'b']",
        "widths.npz": "different widths",
        "test.npz": "holds only 'test', no 'train' array to train on; save the training data beside it, e.g. "
                    "numpy.savez(path, train=x_train, test=x_test).",
        "held-out.npz": "holds only 'valid' and 'test', no 'train' array",
        "junk.npz": "is truncated or damaged (BadZipFile); write it again with numpy",
        "objects.npy": "holds an array of Python objects (dtype object), not numbers; save a numeric array",
        "absent.npy": "does not exist",
    }
    for file, fragment in cases.items():
        with pytest.raises(DataError) as error:
            load(tmp_path / file)
        _one_line_naming(error, file, fragment)


def test_user_files_that_are_not_numeric_arrays_are_named_in_our_words(tmp_path):
    """Random bytes, a pickle, object arrays, a truncated file and stacked images: what is wrong and what to do,
    never numpy's advice to load pickles."""
    (tmp_path / "random.npy").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "pickled.npy").write_bytes(__import__("pickle").dumps(np.zeros((2, 2))))
    np.savez(tmp_path / "objects.npz", train=np.array([None, 1.0], dtype=object))
    np.save(tmp_path / "whole.npy", np.full((20, 8), 0.5))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:300])
    np.save(tmp_path / "images.npy", np.zeros((5, 8, 8)))
    with zipfile.ZipFile(tmp_path / "text.npz", "w") as archive:
        archive.writestr("train.txt", "0.5 0.5\n")
    cases = {
        "random.npy": "is not an array file written by numpy (it starts with neither the .npy header nor the .npz",
        "pickled.npy": "save the data with numpy.save (.npy) or numpy.savez (.npz)",
        "objects.npz": "holds an array of Python objects (dtype object), not numbers",
        "cut.npy": "is truncated or damaged",
        "images.npy": "has shape (5, 8, 8); expected (N, D) with one example per row: flatten images with "
        "x.reshape(len(x), -1)",
        "text.npz": "holds 'train.txt', which is not an array saved by numpy; write the file with numpy.savez, e.g. "
        "numpy.savez(path, train=x_train)",
    }
    for file, fragment in cases.items():
        with pytest.raises(DataError) as error:
            load(tmp_path / file)
        _one_line_naming(error, file, fragment)
        assert "pickle" not in str(error.value).replace(file, "")


@pytest.mark.parametrize(("rows", "test_rows"), [(15, 2), (25, 2)])  # 1.5 and 2.5 rounded half to even
def test_user_test_fraction_of_the_rows_rounded(tmp_path, rows, test_rows):
    np.save(tmp_path / "x.npy", np.full((rows, 4), 0.5))
    data = load(tmp_path / "x.npy", test_fraction=0.1)
    assert data.test.shape == (test_rows, 4) and data.train.shape == (rows - test_rows, 4)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_user_test_fraction_must_leave_both_sets(tmp_path, fraction):
    np.save(tmp_path / "x.npy", np.zeros((10, 4)))
    with pytest.raises(DataError) as error:
        load(tmp_path / "x.npy", test_fraction=fraction)
    _one_line_naming(error, "x.npy", "test_fraction", "save a 'test' array beside 'train'")


@pytest.mark.parametrize(("setting", "fragment"), [
    ({"test_fraction": float("nan")}, "test_fraction must be a number between 0 and 1"),
    ({"test_fraction": "0.1"}, "test_fraction must be a number between 0 and 1"),
    ({"eval_seed": 2**64}, "eval_seed must be an integer from 0 to 2**63 - 2"),
    ({"eval_seed": 2**63 - 1}, "eval_seed must be an integer from 0 to 2**63 - 2"),  # valid's seed would overflow
    ({"eval_seed": -1}, "eval_seed must be an integer"),
    ({"eval_seed": 1.5}, "eval_seed must be an integer"),
])
def test_load_settings_refused_in_one_line(tmp_path, setting, fragment):
    np.save(tmp_path / "x.npy", np.zeros((10, 4)))
    with pytest.raises(DataError) as error:
        load(tmp_path / "x.npy", **setting)
    _one_line_naming(error, fragment)


def test_user_file_extension_in_capitals(tmp_path):
    np.save(tmp_path / "upper.npy", np.full((10, 4), 0.5))
    (tmp_path / "upper.npy").rename(tmp_path / "upper.NPY")
    assert load(tmp_path / "upper.NPY").train.shape == (9, 4)


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(DataError) as error:
        load("cifar")
    _one_line_naming(error, "'cifar'", "mnist", "digits", ".npy")
    with pytest.raises(DataError) as error:
        load("digits", split="code")
    _one_line_naming(error, "digits", "mnist and omniglot")
    with pytest.raises(DataError) as error:
        load("digits", split="official")
    _one_line_naming(error, "'official'")
