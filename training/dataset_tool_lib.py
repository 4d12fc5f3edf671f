"""Conversion of image collections into EDM's dataset format (the logic behind dataset_tool.py).

Output: `{idx//1000:05d}/img{idx:08d}.png` (uncompressed PNG, idx = position in the source) plus `dataset.json`
= {"labels": [[file name, label], ...]} or {"labels": null}, in a folder or an uncompressed (ZIP_STORED) zip.
Sources: the CIFAR-10 python tarball, MNIST/Fashion-MNIST idx files, an image folder, a zip of images, and the
built-in offline `digits` (scikit-learn's 8x8 handwritten digits). Every failure raises DatasetToolError with one
line naming the file and what was expected; nothing is left at the destination when a conversion fails.
"""

import functools
import gzip
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
from tqdm import tqdm

from dnnlib import util
from torch_utils import persistence
from training.dataset import MAX_LABEL_DIM, DatasetError, check_zip_member, decode_image

DIGITS_SOURCE = "digits"
DIGITS_DEFAULT_RESOLUTION = (32, 32)


class DatasetToolError(Exception):
    """A conversion that cannot proceed; the message is one line naming the file and what was expected."""


@dataclass
class SourceImage:
    image: np.ndarray  # uint8, HW (grayscale) or HWC
    label: object  # int class index, list of floats, or None
    name: str  # where the image came from, for error messages


@dataclass
class Source:
    num_images: int  # how many images `images` yields (after --max-images)
    images: Iterator[SourceImage]
    notes: list[str] = field(default_factory=list)  # lines for the user (convert_dataset's log)


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers.


def parse_resolution(text: str) -> tuple[int, int]:
    """'WxH' or 'W,H' -> (W, H)."""
    m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not m:
        raise DatasetToolError(f"--resolution: expected WxH or W,H (e.g. 32x32), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _limit(count: int, max_images: int | None) -> int:
    return count if max_images is None else min(count, max_images)


def _is_image_name(name: str) -> bool:
    """An image file by its name: an extension of a format PIL can decode (not .pdf, .eps, .h5: see
    _UNREADABLE_FORMATS), and not macOS's AppleDouble metadata (`._x.png`, and everything under a zip's `__MACOSX/`).
    EDM's tool took all of these for images and stopped at the first."""
    PIL.Image.init()
    parts = name.replace("\\", "/").split("/")
    if parts[-1].startswith("._") or "__MACOSX" in parts[:-1]:
        return False
    image_format = PIL.Image.EXTENSION.get(os.path.splitext(name)[1].lower())
    return image_format is not None and image_format not in _UNREADABLE_FORMATS


# Formats with an extension in PIL.Image.EXTENSION that PIL cannot decode by itself: it only writes PDF and Palm
# bitmaps, needs Ghostscript for EPS, and only identifies the rest (stub plugins).
_UNREADABLE_FORMATS = {"PDF", "PALM", "EPS", "BUFR", "GRIB", "HDF5", "WMF", "MPEG"}


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        image = decode_image(data, name)
    except DatasetError as exc:
        raise DatasetToolError(str(exc)) from None
    return image[:, :, 0] if image.shape[2] == 1 else image


def _class_label(label, fname: str, where: str) -> int:
    """A dataset.json label as a class index: a non-negative integer below MAX_LABEL_DIM (2.0 counts as 2)."""
    value = int(label) if isinstance(label, float) and label.is_integer() else label
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_LABEL_DIM:
        raise DatasetToolError(f"{where}: label of {fname!r} is {json.dumps(label)}; expected a class index, an "
                               f"integer in 0..{MAX_LABEL_DIM - 1}")
    return value


def _read_labels_json(data: bytes, where: str) -> dict:
    """The {file name: class index} map of a dataset.json (empty when its labels are null), each file listed once."""
    try:
        labels = json.loads(data)["labels"]
        if labels is None:
            return {}
        pairs = [(str(fname).replace("\\", "/"), label) for fname, label in labels]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # the last: nested too deeply
        raise DatasetToolError(f'{where}: expected JSON {{"labels": [[file name, label], ...] or null}} '
                               f"({type(exc).__name__}: {exc})") from None
    result = {}
    for fname, label in pairs:
        if fname in result:
            raise DatasetToolError(f"{where}: lists {fname!r} more than once (expected one label per file)")
        result[fname] = _class_label(label, fname, where)
    return result


def _check_labels_cover(labels: dict, image_names: list[str], where: str) -> None:
    """dataset.json must name only existing images and give every image a label."""
    image_set = set(image_names)
    unknown = sorted(name for name in labels if name not in image_set)
    if unknown:
        raise DatasetToolError(f"{where}: names {len(unknown)} file(s) that are not images of the source, "
                               f"e.g. {unknown[0]!r}")
    unlabelled = [name for name in image_names if name not in labels]
    if unlabelled:
        raise DatasetToolError(f"{where}: has no label for {len(unlabelled)} image(s), e.g. {unlabelled[0]!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Sources.


def open_image_folder(source_dir: str, max_images: int | None = None) -> Source:
    """Images found recursively (PIL extensions), ordered by path components as EDM does (Path sort).

    Labels: the folder's dataset.json (null labels: none); without one, class index = position of the top-level
    sub-folder name in sorted order, when there is more than one top-level name (files at the root count as ''). EDM
    also infers them when dataset.json says null, which labels its own datasets by their 00000/, 00001/ shards.
    """
    rel_names = []
    seen_dirs = set()
    for root, dirs, files in os.walk(source_dir, followlinks=True):  # symlinked class folders hold images too
        real = os.path.realpath(root)
        if real in seen_dirs:  # a link back up the tree (or two links to one folder): read each folder once
            dirs.clear()
            continue
        seen_dirs.add(real)
        for fname in files:
            path = os.path.join(root, fname)
            if _is_image_name(fname) and os.path.isfile(path):
                rel_names.append(os.path.relpath(path, source_dir).replace("\\", "/"))
    rel_names.sort(key=lambda name: name.split("/"))
    if not rel_names:
        raise DatasetToolError(f"{source_dir}: no image files found (looked recursively for {_image_ext_hint()})")

    labels = {}
    notes = []
    meta_path = os.path.join(source_dir, "dataset.json")
    if os.path.isfile(meta_path):
        with open(meta_path, "rb") as f:
            labels = _read_labels_json(f.read(), meta_path)
        if labels:
            _check_labels_cover(labels, rel_names, meta_path)
    else:
        top_names = {name: name.split("/")[0] if "/" in name else "" for name in rel_names}
        class_index = {top: idx for idx, top in enumerate(sorted(set(top_names.values())))}
        if len(class_index) > 1:
            labels = {name: class_index[top] for name, top in top_names.items()}
            if all(top.isdigit() for top in class_index) and \
                    sorted(class_index) != sorted(class_index, key=lambda top: int(top)):
                order = ", ".join(f"{top} -> {idx}" for top, idx in list(class_index.items())[:12])
                notes.append(f"{source_dir}: class folders are numbered in name order, as EDM does ({order}"
                             f"{', ...' if len(class_index) > 12 else ''}), not by their numbers; to keep the "
                             f"numbers, give a dataset.json with the labels")

    num = _limit(len(rel_names), max_images)

    def iterate():
        for name in rel_names[:num]:
            path = os.path.join(source_dir, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise DatasetToolError(f"{path}: cannot read file ({exc})") from None
            yield SourceImage(_decode(data, path), labels.get(name), path)

    return Source(num, iterate(), notes)


# zipfile's errors for a member it cannot read: RuntimeError for an encrypted one, NotImplementedError for a
# compression method it lacks (Deflate64, which Windows Explorer writes for large files).
_ZIP_READ_ERRORS = (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError)


def _zip_dataset_json(all_names: list[str], image_names: list[str]) -> str | None:
    """The zip's dataset.json: at its root, or in the one folder that holds every image (a dataset zipped with its
    folder, `cifar10-32x32/dataset.json`: its names are relative to that folder)."""
    if "dataset.json" in all_names:
        return "dataset.json"
    tops = {name.split("/")[0] for name in image_names}
    if len(tops) == 1 and all("/" in name for name in image_names) and f"{next(iter(tops))}/dataset.json" in all_names:
        return f"{next(iter(tops))}/dataset.json"
    return None


def open_image_zip(source_zip: str, max_images: int | None = None) -> Source:
    """Images in a zip (sorted names) with labels from its dataset.json, if any (_zip_dataset_json)."""
    try:
        with zipfile.ZipFile(source_zip) as z:
            all_names = z.namelist()
            image_names = sorted(n for n in all_names if _is_image_name(n) and not n.endswith("/"))
            labels = {}
            meta_name = _zip_dataset_json(all_names, image_names)
            if meta_name is not None:
                check_zip_member(z.getinfo(meta_name), f"{source_zip}:{meta_name}")
                prefix = meta_name[:-len("dataset.json")]
                labels = {prefix + name: label for name, label in
                          _read_labels_json(z.read(meta_name), f"{source_zip}:{meta_name}").items()}
    except DatasetError as exc:
        raise DatasetToolError(str(exc)) from None
    except _ZIP_READ_ERRORS as exc:
        raise DatasetToolError(f"{source_zip}: cannot read as a zip file ({exc})") from None
    if not image_names:
        raise DatasetToolError(f"{source_zip}: no image files found in the zip (expected {_image_ext_hint()})")
    if labels:
        _check_labels_cover(labels, image_names, f"{source_zip}:{meta_name}")
    num = _limit(len(image_names), max_images)

    def iterate():
        with zipfile.ZipFile(source_zip) as z:
            for name in image_names[:num]:
                where = f"{source_zip}:{name}"
                try:
                    check_zip_member(z.getinfo(name), where)
                    data = z.read(name)
                except DatasetError as exc:
                    raise DatasetToolError(str(exc)) from None
                except _ZIP_READ_ERRORS as exc:
                    raise DatasetToolError(f"{where}: cannot read file ({exc})") from None
                yield SourceImage(_decode(data, where), labels.get(name), where)

    return Source(num, iterate())


class _NumpyOnlyUnpickler(persistence.GuardedUnpickler):
    """Unpickles plain data and numpy arrays only: a downloaded CIFAR batch must not be able to run code (BUILD
    checked too: a forged dtype state could make raw bytes object pointers)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)  # numpy's array constructors in their guarded forms


def _batch_field(batch: dict, key: str):
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def open_cifar10(tarball: str, max_images: int | None = None) -> Source:
    """The five training batches of the CIFAR-10 python tarball: 50,000 RGB 32x32 images, labels 0-9."""
    images, labels = [], []
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for batch_idx in range(1, 6):
                member = f"cifar-10-batches-py/data_batch_{batch_idx}"
                where = f"{tarball}:{member}"
                try:
                    file = tar.extractfile(member)
                except KeyError:
                    raise DatasetToolError(f"{tarball}: expected member {member} (the CIFAR-10 python version, "
                                           f"cifar-10-python.tar.gz)") from None
                try:
                    batch = _NumpyOnlyUnpickler(file, encoding="latin1").load()
                    data = np.asarray(_batch_field(batch, "data"))
                    batch_labels = np.asarray(_batch_field(batch, "labels"))
                except Exception as exc:  # a corrupt pickle can fail in many ways; all mean "not a CIFAR batch"
                    raise DatasetToolError(f"{where}: expected a pickled dict with 'data' (uint8 N x 3072) and "
                                           f"'labels' ({type(exc).__name__}: {exc})") from None
                if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or \
                        batch_labels.shape != (data.shape[0],) or batch_labels.dtype.kind not in "iu":
                    raise DatasetToolError(f"{where}: expected 'data' uint8 N x 3072 and N integer 'labels', got "
                                           f"{data.dtype} {list(data.shape)} and {batch_labels.dtype} "
                                           f"{list(batch_labels.shape)}")
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # NCHW -> NHWC
                labels.append(batch_labels.astype(np.int64))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        reason = " ".join(str(exc).split())  # tarfile lists each compression it tried on a line of its own
        raise DatasetToolError(f"{tarball}: cannot read as a tar archive ({reason})") from None
    images = np.concatenate(images)
    labels = np.concatenate(labels)
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetToolError(f"{tarball}: CIFAR-10 labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return _array_source(images, labels, max_images, f"{tarball}:image")


_MNIST_IMAGES_RE = re.compile(r"^(.*)images([.-])idx3-ubyte(\.gz)?$")


class _IdxFile:
    """An idx file (the MNIST format; gzip-compressed or not) of unsigned bytes, read one record at a time.

    Records are streamed rather than the file read whole: a few KB of .gz can expand to gigabytes, and a streamed
    conversion holds one image whatever the header claims (a bomb then costs time with a progress bar, not memory).
    Uncompressed files are checked against the header's size up front; compressed ones when their last record is read.
    """

    def __init__(self, path: str, expected_ndim: int):
        self.path = path
        try:
            with open(path, "rb") as f:
                compressed = f.read(2) == b"\x1f\x8b"
            self._file = gzip.open(path, "rb") if compressed else open(path, "rb")
            header = self._read(4 + 4 * expected_ndim)
        except DatasetToolError:
            raise
        except OSError as exc:
            raise DatasetToolError(f"{path}: cannot read idx file ({exc})") from None
        if len(header) < 4 or header[:2] != b"\x00\x00" or header[2] != 0x08 or header[3] != expected_ndim:
            self.close()
            raise DatasetToolError(f"{path}: expected an idx file of unsigned bytes with {expected_ndim} dimension(s) "
                                   f"(magic 0x0000080{expected_ndim}), got header {header[:4].hex()}")
        if len(header) < 4 + 4 * expected_ndim:
            self.close()
            raise DatasetToolError(f"{path}: idx file is truncated (its header is incomplete)")
        self.shape = tuple(int(d) for d in np.frombuffer(header[4:], dtype=">u4"))
        self.record_size = int(np.prod(self.shape[1:], dtype=np.int64))
        self._remaining = self.shape[0]
        if not compressed:
            data_bytes = os.path.getsize(path) - len(header)
            if data_bytes != self.shape[0] * self.record_size:
                self.close()
                raise DatasetToolError(f"{path}: idx file is truncated or has extra bytes (header says "
                                       f"{list(self.shape)}, {data_bytes} data bytes)")

    def _read(self, size: int) -> bytes:
        try:
            return self._file.read(size)
        except (OSError, EOFError, zlib.error) as exc:
            self.close()
            raise DatasetToolError(f"{self.path}: cannot read idx file ({exc})") from None

    def read_records(self, count: int) -> np.ndarray:
        """The next `count` records, shape (count, *shape[1:]); reaching the last one checks that nothing follows."""
        size = count * self.record_size
        data = self._read(size)
        if len(data) != size:
            self.close()
            raise DatasetToolError(f"{self.path}: idx file is truncated (header says {list(self.shape)}, the data "
                                   f"ends early)")
        self._remaining -= count
        if self._remaining == 0 and self._read(1):
            self.close()
            raise DatasetToolError(f"{self.path}: idx file has extra bytes after the {list(self.shape)} its header "
                                   f"declares")
        return np.frombuffer(data, dtype=np.uint8).reshape((count, *self.shape[1:]))

    def close(self) -> None:
        self._file.close()


def mnist_labels_path(images_path: str) -> str | None:
    """The labels file matching an images file (train-images-idx3-ubyte[.gz] -> train-labels-idx1-ubyte[.gz])."""
    directory, base = os.path.split(images_path)
    m = _MNIST_IMAGES_RE.match(base)
    if not m:
        return None
    stem = f"{m.group(1)}labels{m.group(2)}idx1-ubyte"
    candidates = [stem + (m.group(3) or ""), stem + ".gz", stem]
    for candidate in candidates:
        if os.path.isfile(os.path.join(directory, candidate)):
            return os.path.join(directory, candidate)
    return os.path.join(directory, candidates[0])


def open_mnist(images_path: str, max_images: int | None = None) -> Source:
    """MNIST / Fashion-MNIST idx files: 28x28 grayscale zero-padded to 32x32 as EDM does, labels from the labels file.

    The padding is always applied to 28x28 images; --resolution then resizes the padded 32x32 image (EDM order).
    """
    labels_path = mnist_labels_path(images_path)
    if labels_path is None or not os.path.isfile(labels_path):
        raise DatasetToolError(f"{images_path}: the matching labels file {labels_path} is missing "
                               f"(expected *-labels-idx1-ubyte[.gz] beside *-images-idx3-ubyte[.gz])")
    images = _IdxFile(images_path, 3)
    try:
        labels = _IdxFile(labels_path, 1)
    except DatasetToolError:
        images.close()
        raise
    height, width = images.shape[1:]
    limit = PIL.Image.MAX_IMAGE_PIXELS
    problem = None
    if labels.shape[0] != images.shape[0]:
        problem = (f"{labels_path}: has {labels.shape[0]} labels but {images_path} has {images.shape[0]} images")
    elif images.shape[0] == 0:
        problem = f"{images_path}: contains no images"
    elif limit is not None and height * width > 2 * limit:
        problem = (f"{images_path}: the header declares {height}x{width} images, more than the {2 * limit:,} pixels "
                   f"allowed (PIL.Image.MAX_IMAGE_PIXELS x 2)")
    if problem is not None:
        images.close()
        labels.close()
        raise DatasetToolError(problem)
    num = _limit(images.shape[0], max_images)
    # 28x28 digits are zero-padded to 32x32 as EDM does; --resolution then resizes the padded image (EDM order).
    pad = 2 if (height, width) == (28, 28) else 0
    chunk = max(1, 2**24 // max(images.record_size, 1))  # records per read: few Python calls, 16 MB at most

    def iterate():
        try:
            for first in range(0, num, chunk):
                count = min(chunk, num - first)
                image_chunk = np.pad(images.read_records(count), [(0, 0), (pad, pad), (pad, pad)])
                label_chunk = labels.read_records(count)
                for offset in range(count):
                    yield SourceImage(image_chunk[offset], int(label_chunk[offset]),
                                      f"{images_path}:image {first + offset}")
        finally:
            images.close()
            labels.close()

    return Source(num, iterate())


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 8x8 images, values 0..16) as uint8 0..255 (v * 255 / 16, rounded
    half up) and int64 labels 0..9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetToolError("--source digits: needs scikit-learn (pip install scikit-learn)") from exc
    digits = load_digits()
    images = np.floor(digits.images * (255 / 16) + 0.5).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def open_digits(max_images: int | None = None) -> Source:
    images, labels = load_digits_uint8()
    return _array_source(images, labels, max_images, "digits:image")


def _array_source(images: np.ndarray, labels: np.ndarray, max_images: int | None, prefix: str) -> Source:
    if len(images) == 0:
        raise DatasetToolError(f"{prefix.rsplit(':', 1)[0]}: contains no images")
    num = _limit(len(images), max_images)

    def iterate():
        for idx in range(num):
            yield SourceImage(images[idx], int(labels[idx]), f"{prefix} {idx}")

    return Source(num, iterate())


def _image_ext_hint() -> str:
    return "files with an image extension such as .png or .jpg"


def open_source(source: str, max_images: int | None = None) -> Source:
    """Pick the reader from the --source value (see the module docstring)."""
    if source == DIGITS_SOURCE:
        return open_digits(max_images)
    if os.path.isdir(source):
        if source.rstrip("/\\").endswith("_lmdb"):
            raise DatasetToolError(f"{source}: LSUN lmdb folders are not supported; export the images to a folder")
        return open_image_folder(source, max_images)
    if os.path.isfile(source):
        base = os.path.basename(source).lower()
        if _MNIST_IMAGES_RE.match(os.path.basename(source)):
            return open_mnist(source, max_images)
        if base.endswith((".tar.gz", ".tgz", ".tar")):
            return open_cifar10(source, max_images)
        if base.endswith(".zip"):
            return open_image_zip(source, max_images)
        raise DatasetToolError(f"{source}: unknown source type; expected a folder, a .zip, cifar-10-python.tar.gz, "
                               f"*-images-idx3-ubyte[.gz] or '{DIGITS_SOURCE}'")
    raise DatasetToolError(f"{source}: source file or folder does not exist")


# ---------------------------------------------------------------------------------------------------------------------
# Transforms (as EDM's dataset_tool).


def _as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, np.newaxis], 3, axis=2) if image.ndim == 2 else image


def _scale(width: int | None, height: int | None, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    width = w if width is None else width
    height = h if height is None else height
    if (width, height) == (w, h):
        return image
    return np.asarray(PIL.Image.fromarray(image).resize((width, height), PIL.Image.Resampling.LANCZOS))


def _center_crop(width: int, height: int, image: np.ndarray) -> np.ndarray:
    crop = min(image.shape[:2])
    top, left = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
    image = _as_rgb(image[top:top + crop, left:left + crop])
    return np.asarray(PIL.Image.fromarray(image, "RGB").resize((width, height), PIL.Image.Resampling.LANCZOS))


def _center_crop_wide(width: int, height: int, image: np.ndarray) -> np.ndarray | None:
    rows = int(np.round(width * image.shape[0] / image.shape[1]))
    if image.shape[1] < width or rows < height:
        return None  # EDM skips images that are too small
    image = _as_rgb(image[(image.shape[0] - rows) // 2:(image.shape[0] + rows) // 2])
    image = np.asarray(PIL.Image.fromarray(image, "RGB").resize((width, height), PIL.Image.Resampling.LANCZOS))
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2:(width + height) // 2, :] = image
    return canvas


def make_transform(transform: str | None, width: int | None, height: int | None) \
        -> Callable[[np.ndarray], np.ndarray | None]:
    """None: LANCZOS resize to WxH when given. 'center-crop': square crop, RGB, resize. 'center-crop-wide': central
    band of aspect W:H resized to WxH and letterboxed into WxW (returns None for images too small: skipped)."""
    if transform is None:
        return functools.partial(_scale, width, height)
    if transform not in ("center-crop", "center-crop-wide"):
        raise DatasetToolError(f"--transform: expected center-crop or center-crop-wide, got {transform!r}")
    if width is None or height is None:
        raise DatasetToolError(f"--transform={transform} needs --resolution=WxH")
    return functools.partial(_center_crop if transform == "center-crop" else _center_crop_wide, width, height)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Destinations: written under a temporary name, renamed into place only when everything succeeded.


def _check_dest(dest: str) -> None:
    if dest == "":
        raise DatasetToolError("--dest: must not be empty")
    if dest.lower().endswith(".zip"):
        if os.path.exists(dest):
            raise DatasetToolError(f"{dest}: destination already exists; remove it or choose another --dest")
    elif os.path.exists(dest):
        if not os.path.isdir(dest):
            raise DatasetToolError(f"{dest}: destination exists and is not a folder")
        if os.listdir(dest):
            raise DatasetToolError(f"{dest}: destination folder is not empty; remove it or choose another --dest")
        # The dataset is written beside --dest under a temporary name and renamed over the empty folder, which
        # fails (after the whole conversion) for a symbolic link, a mount point, or the current folder or above it.
        real = os.path.realpath(dest)
        if (os.path.islink(os.path.normpath(dest)) or os.path.ismount(real)
                or os.path.commonpath([real, os.path.realpath(os.getcwd())]) == real):
            raise DatasetToolError(f"{dest}: an empty folder that cannot be replaced by renaming (a symbolic link, a "
                                   f"mount point or the current folder); give a new folder inside it, e.g. "
                                   f"{os.path.join(dest, 'dataset')}, or a .zip")
    try:
        util.check_output_path(dest, "--dest", is_dir=not dest.lower().endswith(".zip"))
    except util.OutputPathError as exc:
        raise DatasetToolError(str(exc)) from None


def _write_error(dest: str, exc: OSError) -> DatasetToolError:
    return DatasetToolError(f"--dest {dest}: cannot write the dataset ({exc.strerror or exc})")


def remove_stale_temp_outputs(dest: str) -> list[str]:
    """Remove the temporary zip / folder that a killed earlier conversion to `dest` left beside it (see
    dnnlib.util.remove_stale_temp_files: only those of processes of this host that no longer run)."""
    path = os.path.abspath(os.path.normpath(dest))
    parent = os.path.dirname(path)
    return (util.remove_stale_temp_files(parent, prefix=util.temp_prefix(path))
            + util.remove_stale_temp_files(parent, prefix=util.temp_prefix(path, hidden=True)))


class _ZipDest:
    def __init__(self, dest: str):
        self._dest = dest
        self._tmp = util.temp_path(dest)
        self._file = self._zip = None
        try:
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            self._file = open(self._tmp, "wb")
            self._zip = zipfile.ZipFile(self._file, mode="w", compression=zipfile.ZIP_STORED)
        except OSError as exc:
            self.finish(ok=False)
            raise _write_error(dest, exc) from None

    def write(self, fname: str, data: bytes) -> None:
        try:
            self._zip.writestr(fname, data)
        except OSError as exc:
            raise _write_error(self._dest, exc) from None

    def finish(self, ok: bool) -> None:
        """ok: complete the zip and rename it into place. Either way, no temporary file remains, even when closing
        fails (e.g. a full disk)."""
        try:
            if ok:
                self._zip.close()  # writes the central directory
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self._tmp, self._dest)
        except OSError as exc:
            raise _write_error(self._dest, exc) from None
        finally:
            for close in (self._zip.close if self._zip else None, self._file.close if self._file else None):
                try:
                    if close is not None:
                        close()
                except (OSError, ValueError):
                    pass  # already failing (e.g. the disk is full): the temporary file is removed regardless
            try:
                os.remove(self._tmp)
            except OSError:
                pass  # renamed into place, or never created


class _FolderDest:
    def __init__(self, dest: str):
        self._dest = os.path.normpath(dest)
        parent = os.path.dirname(os.path.abspath(self._dest))
        self._tmp = util.temp_path(os.path.join(parent, os.path.basename(self._dest)), hidden=True)
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(self._tmp)  # os.mkdir honours the umask (tempfile.mkdtemp would make it private)
        except OSError as exc:
            raise _write_error(dest, exc) from None

    def write(self, fname: str, data: bytes) -> None:
        path = os.path.join(self._tmp, fname)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise _write_error(self._dest, exc) from None

    def finish(self, ok: bool) -> None:
        if not ok:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:
            if os.path.isdir(self._dest) and not os.listdir(self._dest):
                try:
                    os.replace(self._tmp, self._dest)  # POSIX replaces an empty folder atomically
                    return
                except OSError:
                    os.rmdir(self._dest)
            os.rename(self._tmp, self._dest)
        except OSError as exc:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise DatasetToolError(f"{self._dest}: cannot move the finished dataset into place ({exc})") from None


# ---------------------------------------------------------------------------------------------------------------------
# The conversion.


def archive_name(idx: int) -> str:
    return f"{idx // 1000:05d}/img{idx:08d}.png"


def encode_png(image: np.ndarray) -> bytes:
    """Uncompressed PNG (compress_level=0), mode L for HW arrays and RGB for HWx3 ones."""
    buf = io.BytesIO()
    PIL.Image.fromarray(image, "L" if image.ndim == 2 else "RGB").save(buf, format="png", compress_level=0,
                                                                       optimize=False)
    return buf.getvalue()


def convert_dataset(source: str, dest: str, max_images: int | None = None, transform: str | None = None,
                    resolution: tuple[int, int] | None = None, progress: bool = True,
                    log: Callable[[str], None] | None = None) -> int:
    """Convert `source` into an EDM dataset at `dest` (.zip -> ZIP_STORED zip, else a new or empty folder).

    Returns the number of images written; `log` gets a line when --transform skipped images (too small). Output
    checks as EDM: square, power-of-two side, 1 or 3 channels, identical for all images. Raises DatasetToolError; on
    any failure nothing is left at `dest`.
    """
    if max_images is not None and max_images < 1:
        raise DatasetToolError(f"--max-images: must be >= 1, got {max_images}")
    if resolution is None and source == DIGITS_SOURCE:
        resolution = DIGITS_DEFAULT_RESOLUTION
    width, height = resolution if resolution is not None else (None, None)
    if resolution is not None and transform != "center-crop-wide":
        if width != height or not _is_power_of_two(width):
            raise DatasetToolError(f"--resolution={width}x{height}: output images must be square with a "
                                   f"power-of-two side (e.g. 32x32)")
    if resolution is not None and transform == "center-crop-wide":  # a WxH band letterboxed into WxW
        if height > width or not _is_power_of_two(width):
            raise DatasetToolError(f"--resolution={width}x{height} with --transform=center-crop-wide: the band's "
                                   f"width W must be a power of two and its height H at most W (e.g. 512x384)")
    transform_image = make_transform(transform, width, height)
    remove_stale_temp_outputs(dest)
    _check_dest(dest)
    if not dest.lower().endswith(".zip") and os.path.isdir(source) and os.path.commonpath(
            [os.path.realpath(source), os.path.realpath(dest)]) == os.path.realpath(source):
        # Written once, then read as the source's own images: a later conversion or train.py --data=SOURCE
        # counted each image twice.
        raise DatasetToolError(f"{dest}: a dataset folder inside --source {source} would become part of it; give a "
                               f"--dest outside it, or a .zip")
    src = open_source(source, max_images)
    for note in src.notes if log is not None else ():
        log(note)

    writer = _ZipDest(dest) if dest.lower().endswith(".zip") else _FolderDest(dest)
    ok = False
    try:
        attrs = None
        labels = []
        skipped = 0
        for idx, item in enumerate(tqdm(src.images, total=src.num_images, disable=not progress, unit="img")):
            fname = archive_name(idx)
            if item.image.ndim == 3 and item.image.shape[2] not in (1, 3):  # before a transform that reads RGB
                raise DatasetToolError(f"{item.name}: images must be RGB or grayscale (1 or 3 channels), got "
                                       f"{item.image.shape[2]} channels")
            image = transform_image(item.image)
            if image is None:
                skipped += 1
                continue
            cur = dict(width=image.shape[1], height=image.shape[0], channels=image.shape[2] if image.ndim == 3 else 1)
            if attrs is None:
                attrs = cur
                if cur["width"] != cur["height"]:
                    raise DatasetToolError(f"{item.name}: output images must be square, got "
                                           f"{cur['width']}x{cur['height']} (use --resolution or --transform)")
                if not _is_power_of_two(cur["width"]):
                    raise DatasetToolError(f"{item.name}: output side must be a power of two, got "
                                           f"{cur['width']}x{cur['height']} (use --resolution)")
            elif cur != attrs:
                raise DatasetToolError(
                    f"{item.name}: image is {cur['width']}x{cur['height']} with {cur['channels']} channel(s), but "
                    f"the first image is {attrs['width']}x{attrs['height']} with {attrs['channels']} channel(s); "
                    f"all images must match (use --resolution to resize)")
            writer.write(fname, encode_png(image))
            labels.append([fname, item.label] if item.label is not None else None)
        if attrs is None:
            raise DatasetToolError(f"{source}: no images were written (all were skipped by --transform={transform})")
        metadata = {"labels": labels if all(x is not None for x in labels) else None}
        writer.write("dataset.json", json.dumps(metadata).encode("utf8"))
        ok = True
    finally:
        writer.finish(ok)
    if skipped and log is not None:
        log(f"Skipped {skipped} of {skipped + len(labels)} images: smaller than {width}x{height} "
            f"(--transform={transform} does not upscale, as EDM)")
    return len(labels)
