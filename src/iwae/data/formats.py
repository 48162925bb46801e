"""Parsers for the file formats the datasets come in, each returning numpy arrays of shape (N, D).

Each parser checks what it reads (sizes, headers, value ranges) and raises DataError on a truncated or
corrupt file, so a damaged file is reported by name instead of training on garbage. All are vectorised:
the 78 MB of Larochelle's .amat text parse in a fraction of a second.
"""

import gzip
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from iwae.data.errors import DataError

_IDX_UBYTE_3D = b"\x00\x00\x08\x03"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"  # a zip of no files: numpy.savez(path) with no arrays
_CHARDATA_SIDE = 28


def read_idx_images(path: Path) -> np.ndarray:
    """Images of a gzipped IDX file (magic 0x00000803: uint8, N x rows x cols) as uint8 (N, rows*cols)."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a complete gzip file ({error}); delete it and fetch it again.") from error
    if data[:4] != _IDX_UBYTE_3D or len(data) < 16:
        found = (f"its header starts {data[:4].hex()}" if data[:4] != _IDX_UBYTE_3D
                 else f"it ends after {len(data)} bytes, inside the 16-byte header")
        raise DataError(
            f"{path} does not hold IDX images: {found}, expected a header starting {_IDX_UBYTE_3D.hex()}; delete it "
            "and fetch it again."
        )
    n, rows, cols = struct.unpack(">3I", data[4:16])
    if len(data) != 16 + n * rows * cols:
        raise DataError(
            f"{path} holds {len(data) - 16} bytes of pixels, but its header announces {n} images of "
            f"{rows}x{cols} = {n * rows * cols} bytes; delete it and fetch it again."
        )
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows * cols)


def read_amat(path: Path, width: int = 784) -> np.ndarray:
    """Rows of ``width`` space-separated 0/1 digits, each ending in a newline, as uint8 (N, width).

    The format fixes every row at ``2 * width`` bytes, so the bytes reshape into rows whose even columns
    are the digits and odd columns the separators.
    """
    raw = np.fromfile(path, np.uint8)
    row_bytes = 2 * width
    if raw.size == 0 or raw.size % row_bytes:
        newlines = np.flatnonzero(raw == ord("\n"))
        first_row = raw[: newlines[0]] if newlines.size else raw
        values = len(bytes(first_row).split())
        raise DataError(
            f"{path} is not a {width}-column .amat file: it is {raw.size} bytes and its first row has "
            f"{values} values; delete it and fetch it again."
        )
    rows = raw.reshape(-1, row_bytes)
    separators = rows[:, 1::2]
    bad = (separators[:, :-1] != ord(" ")).any(axis=1) | (separators[:, -1] != ord("\n"))
    digits = rows[:, 0::2] - np.uint8(ord("0"))
    bad |= (digits > 1).any(axis=1)
    if bad.any():
        raise DataError(
            f"{path} row {int(np.argmax(bad)) + 1} is not {width} single-space-separated 0/1 values; "
            "delete it and fetch it again."
        )
    return digits


def read_chardata(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Omniglot's ``chardata.mat``: (train, test) as float32 (N, 784) images flattened row by row.

    The file stores arrays ``data`` and ``testdata`` of shape (784, N) whose columns are 28x28 images in
    column-major (MATLAB) order; transposing each column's image makes it upright when flattened row-major,
    the same images as the official code's ``reshape((-1, 28, 28)).reshape((-1, 784), order='F')``.
    """
    try:
        mat = scipy.io.loadmat(path)
    except (MatReadError, ValueError, OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable .mat file ({error}); delete it and fetch it again.") from error
    arrays = []
    for key in ("data", "testdata"):
        array = mat.get(key)
        pixels = _CHARDATA_SIDE * _CHARDATA_SIDE
        if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[0] != pixels:
            found = "missing" if array is None else f"of shape {np.shape(array)}"
            raise DataError(
                f"{path} is not Omniglot's chardata.mat: array '{key}' is {found}, expected ({pixels}, N); "
                "delete it and fetch it again."
            )
        images = array.T.reshape(-1, _CHARDATA_SIDE, _CHARDATA_SIDE).transpose(0, 2, 1).reshape(-1, pixels)
        arrays.append(check_unit_interval(images, f"{path} array '{key}'"))
    return arrays[0], arrays[1]


def read_user_arrays(path: Path) -> dict[str, np.ndarray]:
    """A user's .npy (one array) or .npz (arrays ``train`` and optionally ``valid``/``test``, or just one, the
    training set, unless named ``valid`` or ``test``).

    Returns a dict with key ``train`` and any of ``valid``/``test`` present, each checked by
    ``check_unit_interval`` and of shape (N, D) with the same D.
    """
    with path.open("rb") as file:
        magic = file.read(len(_NPY_MAGIC))
    if not magic:
        raise DataError(f"{path} is empty (0 bytes); save the data in it with numpy.save (.npy) or numpy.savez (.npz).")
    if magic.startswith(_EMPTY_ZIP_MAGIC):
        raise DataError(f"{path} holds no arrays; save the training data in it, e.g. numpy.savez(path, train=x_train).")
    if not magic.startswith((_NPY_MAGIC, _ZIP_MAGIC)):
        raise DataError(
            f"{path} is not an array file written by numpy (it starts with neither the .npy header nor the .npz "
            "zip header); save the data with numpy.save (.npy) or numpy.savez (.npz)."
        )
    arrays = _load_arrays(path)
    if set(arrays) in ({"test"}, {"valid"}, {"valid", "test"}):
        held_out = " and ".join(f"'{key}'" for key in sorted(arrays, reverse=True))
        raise DataError(
            f"{path} holds only {held_out}, no 'train' array to train on; save the training data beside it, "
            "e.g. numpy.savez(path, train=x_train, test=x_test)."
        )
    if len(arrays) == 1:
        arrays = {"train": next(iter(arrays.values()))}
    if "train" not in arrays or not set(arrays) <= {"train", "valid", "test"}:
        raise DataError(
            f"{path} holds arrays {sorted(arrays)}; an .npz file must hold one array, or 'train' and "
            "optionally 'valid' and 'test'."
        )
    checked = {key: check_unit_interval(array, f"{path} array '{key}'") for key, array in arrays.items()}
    widths = {key: array.shape[1] for key, array in checked.items()}
    if len(set(widths.values())) > 1:
        raise DataError(f"{path} holds arrays of different widths {widths}; all must have the same D.")
    return checked


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the .npy or .npz file ``path`` by name (a .npy's as ``train``), each a numpy array.

    Raises:
        DataError: for a truncated or damaged file, an array of Python objects, or an .npz member that is no
            array saved by numpy.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                arrays = dict(loaded)
        else:
            arrays = {"train": loaded}
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise DataError(f"{path} is truncated or damaged ({error}); write it again with numpy.") from error
        raise DataError(
            f"{path} holds an array of Python objects (dtype object), not numbers; save a numeric array, e.g. "
            "numpy.save(path, x.astype(numpy.float32))."
        ) from error
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as error:
        raise DataError(
            f"{path} is truncated or damaged ({type(error).__name__}); write it again with numpy."
        ) from error
    for name, member in arrays.items():
        if not isinstance(member, np.ndarray):  # NpzFile gives a member without the .npy header as its bytes
            raise DataError(
                f"{path} holds '{name}', which is not an array saved by numpy; write the file with numpy.savez, "
                "e.g. numpy.savez(path, train=x_train)."
            )
    return arrays


def check_unit_interval(array: np.ndarray, label: str) -> np.ndarray:
    """``array`` if it is a real-valued (N, D) array with N, D >= 1 and finite values in [0, 1].

    Raises:
        DataError: naming ``label``, for the wrong number of dimensions, a non-numeric dtype, NaN or
            infinite values, or values outside [0, 1].
    """
    if array.ndim > 2 and array.shape[0] > 0:
        raise DataError(
            f"{label} has shape {array.shape}; expected (N, D) with one example per row: flatten images with "
            "x.reshape(len(x), -1)."
        )
    if array.ndim != 2 or 0 in array.shape:
        raise DataError(f"{label} has shape {array.shape}; expected (N, D) with one example per row, N and D >= 1.")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{label} has dtype {array.dtype}; expected real numbers in [0, 1].")
    if not np.isfinite(array).all():
        raise DataError(f"{label} contains NaN or infinite values; expected real numbers in [0, 1].")
    low, high = array.min(), array.max()
    if low < 0 or high > 1:
        eight_bit = low >= 0 and high <= 255 and np.array_equal(array, np.rint(array))  # whole grey levels
        fix = "divide 8-bit images by 255" if eight_bit else "rescale or clip them into [0, 1]"
        raise DataError(f"{label} has values from {low} to {high}; expected values in [0, 1] ({fix}).")
    return array
