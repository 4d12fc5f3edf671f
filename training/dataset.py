"""Image datasets in EDM's format (a folder or ZIP of PNGs plus dataset.json) and the infinite training sampler.

The format is the one written by dataset_tool.py: images `{idx//1000:05d}/img{idx:08d}.png` and an optional
`dataset.json` = {"labels": [[file name, label], ...]} or {"labels": null}. Integer labels are class indices and
are returned one-hot (dimension max + 1); lists of floats are returned as float32 vectors.
"""

import collections
import hashlib
import io
import json
import operator
import os
import struct
import threading
import zipfile
import zlib

import numpy as np
import PIL.Image
import torch

from dnnlib.util import EasyDict

try:
    import pyspng
except ImportError:
    pyspng = None


class DatasetError(OSError):
    """A dataset that cannot be read as asked (missing path, bad image, inconsistent labels, ...).

    Subclass of OSError because EDM's reader raises IOError for the same conditions.
    """


def unwrap_worker_error(exc: DatasetError) -> DatasetError:
    """The DatasetError a DataLoader worker raised, with its own one-line message: the loader re-raises it in the
    main process as 'Caught DatasetError in DataLoader worker process N.' followed by the worker's whole traceback,
    which would bury the file name at the bottom of thirty lines."""
    lines = str(exc).rstrip().split("\n")
    prefix = f"{DatasetError.__module__}.{DatasetError.__qualname__}: "
    if len(lines) > 1 and lines[0].startswith("Caught DatasetError") and lines[-1].startswith(prefix):
        return DatasetError(lines[-1][len(prefix):])
    return exc


# Class labels are one-hot vectors of dimension max + 1: a label of 1e9 would make every label vector 4 GB.
MAX_LABEL_DIM = 65536  # class labels must be integers in 0 .. MAX_LABEL_DIM - 1

# A compressed ZIP member larger than this that inflates more than this many times its stored size is refused before
# it is read: PNGs do not compress further (about 1x), a dataset.json of labels about 10x; a 1 MB member of zeros
# declaring 1 GB would be read whole, twice, in every loader worker.
ZIP_BOMB_MIN_SIZE = 16 << 20
ZIP_BOMB_RATIO = 200


def _check_inflated_size(compress_type: int, compress_size: int, file_size: int, where: str) -> None:
    if (compress_type != zipfile.ZIP_STORED and file_size > ZIP_BOMB_MIN_SIZE
            and file_size > ZIP_BOMB_RATIO * max(compress_size, 1)):
        raise DatasetError(f"{where}: inflates from {compress_size:,} to {file_size:,} bytes (more than "
                           f"{ZIP_BOMB_RATIO}x): not an image or label file; recreate the ZIP, e.g. with "
                           f"dataset_tool.py")


def check_zip_member(info: zipfile.ZipInfo, where: str) -> None:
    """DatasetError for a compressed member that declares an implausibly large inflated size (a zip bomb)."""
    _check_inflated_size(info.compress_type, info.compress_size, info.file_size, where)


_READ_LOCK = threading.Lock()


def _read_at(f, size: int, offset: int) -> bytes:
    """Up to `size` bytes of `f` at `offset`, safe to call from several threads on one file object."""
    if hasattr(os, "pread"):
        chunks = []
        while size > 0:  # pread may return fewer bytes than asked (e.g. over 2 GB at once on Linux)
            chunk = os.pread(f.fileno(), size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            size, offset = size - len(chunk), offset + len(chunk)
        return b"".join(chunks)
    with _READ_LOCK:  # Windows: no pread
        f.seek(offset)
        return f.read(size)


class ZipMembers:
    """Where some members of a ZIP lie, as flat arrays, and how to read one by its row without a zipfile.ZipFile.

    A ZipFile holds a ZipInfo object per member (about 0.55 KB, tracked by the garbage collector): each DataLoader
    worker parsed its own, and a forked worker's collector also touched, and so copied, the parent's. Measured with
    200,000 images: about 1.5 KB per image of private memory in every worker and 0.7 KB in each rank's main process,
    i.e. about 1.9 GB per worker for ImageNet's 1.28M. These arrays are 30 bytes per member, shared by forked workers.
    Stored and deflated members are read here with their CRC-32 checked; other compression methods and encrypted
    members are left to zipfile (see `needs_zipfile`).
    """

    def __init__(self, infos: list):
        fields = operator.attrgetter("header_offset", "compress_size", "file_size", "CRC", "compress_type", "flag_bits")
        table = np.fromiter(map(fields, infos), dtype=np.dtype((np.int64, 6)), count=len(infos)).reshape(-1, 6)
        self.header_offset, self.compress_size, self.file_size = (table[:, k].copy() for k in range(3))
        self.crc = table[:, 3].astype(np.uint32)
        self.compress_type, self.flag_bits = (table[:, k].astype(np.uint16) for k in (4, 5))

    def needs_zipfile(self, row: int) -> bool:
        return (int(self.compress_type[row]) not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
                or bool(self.flag_bits[row] & 0x1))

    def read(self, f, row: int, where: str) -> bytes:
        """The uncompressed bytes of member `row`, read from the open binary file `f` by position (os.pread: threads
        may share `f`; a seek then read of one thread would move the other's offset)."""
        method, compress_size, file_size = (int(self.compress_type[row]), int(self.compress_size[row]),
                                            int(self.file_size[row]))
        _check_inflated_size(method, compress_size, file_size, where)
        offset = int(self.header_offset[row])
        header = _read_at(f, 30, offset)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise DatasetError(f"{where}: damaged ZIP file (bad local header; recreate the ZIP, e.g. with "
                               f"dataset_tool.py)")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        data = _read_at(f, compress_size, offset + 30 + name_len + extra_len)
        if len(data) == compress_size and method == zipfile.ZIP_DEFLATED:
            try:
                # At most one byte more than declared: a member that inflates further is damaged, and is not inflated.
                data = zlib.decompressobj(-15).decompress(data, file_size + 1)
            except zlib.error:
                data = b""
        if len(data) != file_size or zlib.crc32(data) != int(self.crc[row]):
            raise DatasetError(f"{where}: damaged ZIP file (bad CRC-32 or size; recreate the ZIP, e.g. with "
                               f"dataset_tool.py)")
        return data


class Dataset(torch.utils.data.Dataset):
    """Base class: max_size subset, x-flip doubling, labels and an optional in-RAM cache, as in EDM.

    Subclasses implement `_load_raw_image(raw_idx)` (uint8 CHW) and `_load_raw_labels()` (int64 [N] or
    float32 [N, D], or None).
    """

    def __init__(self, name, raw_shape, max_size=None, use_labels=False, xflip=False, random_seed=0, cache=False):
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = use_labels
        self._cache = cache
        self._cached_images = {}  # raw_idx -> uint8 CHW array; filled per process (each DataLoader worker has its own)
        self._raw_labels = None
        self._label_shape = None

        # max_size: a seeded random subset, kept in sorted order (EDM applies it before x-flip).
        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])

        # x-flip: the second half of the dataset is the first half mirrored horizontally.
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _get_raw_labels(self) -> np.ndarray:
        if self._raw_labels is None:
            labels = self._load_raw_labels() if self._use_labels else None
            if labels is None:
                labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
            if labels.shape[0] != self._raw_shape[0] or labels.dtype not in (np.float32, np.int64):
                raise DatasetError(f"{self._name}: labels must be int64 [N] or float32 [N, D] with N = "
                                   f"{self._raw_shape[0]}; got {labels.dtype} {list(labels.shape)}")
            self._raw_labels = labels
        return self._raw_labels

    def close(self):
        pass

    def _load_raw_image(self, raw_idx) -> np.ndarray:
        raise NotImplementedError

    def _load_raw_labels(self) -> np.ndarray | None:
        raise NotImplementedError

    def __getstate__(self):
        # Workers re-read labels and re-fill their own cache rather than receiving copies through the pickle.
        return dict(self.__dict__, _raw_labels=None, _cached_images={})

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        """(uint8 CHW image, float32 label vector); the label has length 0 when use_labels is False."""
        raw_idx = int(self._raw_idx[idx])
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx) -> np.ndarray:
        label = self._get_raw_labels()[self._raw_idx[idx]]
        if label.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            label = onehot
        return label.copy()

    def get_details(self, idx) -> EasyDict:
        d = EasyDict()
        d.raw_idx = int(self._raw_idx[idx])
        d.xflip = int(self._xflip[idx]) != 0
        d.raw_label = self._get_raw_labels()[d.raw_idx].copy()
        return d

    @property
    def name(self) -> str:
        return self._name

    @property
    def image_shape(self) -> list:
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    def _example_image(self) -> str:
        """', e.g. <where one image of the dataset's shape is>' for messages about the shape; '' if unknown."""
        return ""

    @property
    def resolution(self) -> int:
        if self.image_shape[1] != self.image_shape[2]:
            raise DatasetError(f"{self._name}: images are not square ({self.image_shape[2]}x{self.image_shape[1]}"
                               f"{self._example_image()})")
        return self.image_shape[1]

    @property
    def label_shape(self) -> list:
        if self._label_shape is None:
            raw_labels = self._get_raw_labels()
            if raw_labels.dtype == np.int64:
                self._label_shape = [int(np.max(raw_labels)) + 1]
            else:
                self._label_shape = list(raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self) -> int:
        if len(self.label_shape) != 1:
            raise DatasetError(f"{self._name}: labels of shape {self.label_shape} have no single dimension")
        return self.label_shape[0]

    @property
    def has_labels(self) -> bool:
        return any(x != 0 for x in self.label_shape)

    @property
    def has_onehot_labels(self) -> bool:
        return self._get_raw_labels().dtype == np.int64


def _file_ext(fname: str) -> str:
    return os.path.splitext(fname)[1].lower()


def decode_image(data: bytes, fname: str, use_pyspng: bool = True) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to a uint8 HWC array (C = 1 for grayscale); `fname` only names errors.

    pyspng (when installed) decodes only the PNGs it reads as PIL does: 8 bits per channel, grey, RGB or RGBA. Every
    other file goes to PIL whatever its name, so a dataset is the same with and without pyspng (pyspng dropped a
    palette's transparency, refused LA and JPEG data named .png). 16-bit PNGs are refused by both: PIL reads 16-bit
    RGB as its high bytes, truncated, and pyspng refused it."""
    ihdr = _png_ihdr(data)
    if ihdr is not None and ihdr[2] == 16:
        raise DatasetError(f"{fname}: a 16-bit PNG; expected 8 bits per channel (convert it to 8 bits first)")
    use_pyspng = (use_pyspng and pyspng is not None and ihdr is not None and ihdr[2] == 8
                  and ihdr[3] in _PYSPNG_COLOUR_TYPES)
    if use_pyspng:
        _check_png_pixels(data, fname)
    try:
        if use_pyspng:
            image = pyspng.load(data)
        else:
            with PIL.Image.open(io.BytesIO(data)) as img:
                if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                    img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
                elif img.mode == "1":
                    img = img.convert("L")
                image = np.asarray(img)
    except PIL.UnidentifiedImageError:
        raise DatasetError(f"{fname}: cannot decode image (not a format PIL reads, or an empty or damaged file)") \
            from None
    except Exception as exc:
        raise DatasetError(f"{fname}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if image.dtype != np.uint8:
        raise DatasetError(f"{fname}: expected an 8-bit image, got pixel type {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> channels of decode_image's result (8-bit, no palette)
_PYSPNG_COLOUR_TYPES = (0, 2, 6)  # grey, RGB, RGBA: the PNGs pyspng decodes as PIL does


def _png_ihdr(head: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from the IHDR chunk a PNG starts with; None when `head` (at least 26
    bytes) is not the start of a PNG."""
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">IIBB", head[16:26])


def png_header_shape(head: bytes) -> tuple[int, int, int] | None:
    """(channels, height, width) that decode_image returns for a PNG starting with `head` (at least 29 bytes), from
    the IHDR chunk alone; None when the header cannot tell (not a PNG, palette or 16-bit: decode to find out)."""
    ihdr = _png_ihdr(head) if len(head) >= 29 else None
    if ihdr is None or ihdr[2] != 8 or ihdr[3] not in _PNG_CHANNELS:
        return None
    width, height, _, colour_type = ihdr
    return _PNG_CHANNELS[colour_type], height, width


def _check_png_pixels(data: bytes, fname: str) -> None:
    """PIL's decompression-bomb limit (twice `PIL.Image.MAX_IMAGE_PIXELS`) for PNGs that pyspng decodes: it has none,
    and a few KB of PNG can declare gigapixels."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    ihdr = _png_ihdr(data)
    if limit is None or ihdr is None:
        return  # pyspng reports a malformed file itself
    width, height = ihdr[:2]
    if width * height > 2 * limit:
        raise DatasetError(f"{fname}: the PNG declares {width}x{height} = {width * height:,} pixels, more than the "
                           f"{2 * limit:,} allowed (PIL.Image.MAX_IMAGE_PIXELS x 2): refusing to decode it")


def png_is_complete(head: bytes, tail: bytes) -> bool:
    """Cheap completeness check from a file's first 29+ and last 12 bytes: the PNG signature and IHDR chunk at the
    start and the IEND chunk at the end. Catches empty and truncated files without decoding; a PNG damaged in
    the middle passes (decoding finds that)."""
    return head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and tail[-12:] == _PNG_IEND


def read_head_and_tail(path: str) -> tuple[bytes, bytes]:
    """The first 33 and the last 12 bytes of a file (less when it is shorter), with raw reads; raises OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        head = os.read(fd, 33)
        try:
            os.lseek(fd, -12, os.SEEK_END)
        except OSError:
            return head, b""  # shorter than 12 bytes
        return head, os.read(fd, 12)
    finally:
        os.close(fd)


def png_file_is_complete(path: str) -> bool:
    """Whether `path` is a PNG file with its header and IEND chunk (png_is_complete); False when missing or unreadable.
    About 15 us per file: cheap enough to check 50,000 existing outputs before resuming."""
    try:
        return png_is_complete(*read_head_and_tail(path))
    except OSError:
        return False


_VERIFIED: set = set()  # datasets that passed ImageFolderDataset.verify_images in this process


class ImageFolderDataset(Dataset):
    """Images read recursively from a directory or a ZIP (sorted names), with labels from its dataset.json.

    path: directory or .zip. resolution: if given, the images must have this size (error otherwise).
    use_labels / max_size / xflip / random_seed / cache: see `Dataset`. name: defaults to the file/dir name.
    verify: check every image the dataset will read when it is opened (see `verify_images`), so that a damaged
    dataset fails now with one error naming the file rather than hours into training. Labels, when used, are always
    checked when the dataset is opened.
    A ZIP's directory is read once, when the dataset is opened, into `ZipMembers` arrays; each process (each
    DataLoader worker) then opens the file itself and reads members by offset, so the object pickles into workers.
    """

    def __init__(self, path, resolution=None, use_labels=False, max_size=None, xflip=False, random_seed=0,
                 cache=False, name=None, use_pyspng=True, verify=True):
        self._path = str(path)
        self._use_pyspng = use_pyspng
        self._zipfile = None  # per process, only for members ZipMembers leaves to zipfile
        self._zipfile_pid = None
        self._archive = None  # per process: the ZIP opened as a plain file
        self._archive_pid = None
        self._members = None  # ZIP: where each of self._image_fnames lies
        self._label_member = None  # ZIP: where dataset.json lies

        if os.path.isdir(self._path):
            self._type = "dir"
            all_fnames = {os.path.relpath(os.path.join(root, fname), start=self._path).replace("\\", "/")
                          for root, _dirs, files in os.walk(self._path) for fname in files}
        elif os.path.isfile(self._path) and _file_ext(self._path) == ".zip":
            self._type = "zip"
            directory = self._open_zipfile()
            all_fnames = set(directory.namelist())
        elif not os.path.exists(self._path):
            raise DatasetError(f"{self._path}: dataset path does not exist")
        else:
            raise DatasetError(f"{self._path}: dataset path must be a directory or a .zip file")

        PIL.Image.init()
        self._image_fnames = sorted(f for f in all_fnames if _file_ext(f) in PIL.Image.EXTENSION)
        self._has_label_file = "dataset.json" in all_fnames
        del all_fnames
        if self._type == "zip":
            with directory:
                try:
                    self._members = ZipMembers([directory.getinfo(f) for f in self._image_fnames])
                    if self._has_label_file:
                        self._label_member = ZipMembers([directory.getinfo("dataset.json")])
                except (OverflowError, ValueError) as exc:  # a ZIP64 size or offset of 2**63 or more
                    raise DatasetError(f"{self._path}: damaged ZIP file (a member's size or offset is out of range: "
                                       f"{exc}; recreate the ZIP, e.g. with dataset_tool.py)") from exc
            # A member said to reach past the end of the file is damaged: refused before a read reserves its size.
            past_end = np.flatnonzero(self._members.header_offset + self._members.compress_size
                                      > os.path.getsize(self._path))
            if past_end.size:
                raise DatasetError(f"{self._describe(self._image_fnames[past_end[0]])}: damaged ZIP file (its "
                                   f"directory entry reaches past the end of the file; recreate the ZIP, e.g. with "
                                   f"dataset_tool.py)")
        if len(self._image_fnames) == 0:
            raise DatasetError(f"{self._path}: no image files found")

        if name is None:
            name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        first = self._load_raw_image(0, check_shape=False)
        raw_shape = [len(self._image_fnames), *first.shape]
        if resolution is not None and (raw_shape[2] != resolution or raw_shape[3] != resolution):
            raise DatasetError(f"{self._path}: images are {raw_shape[3]}x{raw_shape[2]}, "
                               f"but resolution={resolution} was requested")
        super().__init__(name=name, raw_shape=raw_shape, max_size=max_size, use_labels=use_labels, xflip=xflip,
                         random_seed=random_seed, cache=cache)
        if use_labels:
            self._get_raw_labels()  # Report a broken dataset.json now rather than in a DataLoader worker.
        if verify:
            self.verify_images()

    def verify_images(self) -> None:
        """Check that every image this dataset reads (its max_size subset) is intact and has the first image's shape.

        A ZIP member must pass its CRC-32 (the whole member is read); a plain 8-bit PNG must start with its
        signature and IHDR chunk, end with its IEND chunk and have the expected size and channels in IHDR; any other
        image (JPEG, palette or 16-bit PNG) is decoded. Measured on 50,000 CIFAR-10-sized PNGs (32x32 RGB,
        uncompressed, files in the page cache, one shared CPU core): 0.7 s for a 166 MB ZIP, 1.3 s for a folder (a
        cold cache adds reading the files once). A dataset verified once in this process (same path, size,
        modification time, shape and subset) is not verified again, so train.py's two openings cost one check.
        """
        raw_indices = np.unique(self._raw_idx)
        stat = os.stat(self._path)
        key = (os.path.abspath(self._path), stat.st_size, stat.st_mtime_ns, tuple(self.image_shape),
               hashlib.sha1(raw_indices.tobytes()).hexdigest())
        if key in _VERIFIED:
            return
        contents = self._zip_members(raw_indices) if self._type == "zip" else self._file_heads_and_tails(raw_indices)
        for raw_idx, fname, head, tail, data in contents:
            shape = png_header_shape(head) if _file_ext(fname) == ".png" else None
            if shape is None:  # not a plain 8-bit PNG: decode it to learn its shape
                image = decode_image(data if data is not None else self._read_image_bytes(raw_idx),
                                     self._describe(fname), self._use_pyspng)
                shape = (image.shape[2], image.shape[0], image.shape[1])
            elif not png_is_complete(head, tail):
                raise DatasetError(f"{self._describe(fname)}: truncated or damaged PNG (expected the PNG signature "
                                   f"and IHDR at the start and the IEND chunk at the end)")
            self._check_shape(fname, shape)
        _VERIFIED.add(key)

    def _file_heads_and_tails(self, raw_indices):
        """(raw index, name, first 33 bytes, last 12 bytes, None) of each file of a folder dataset."""
        for raw_idx in raw_indices.tolist():
            fname = self._image_fnames[raw_idx]
            try:
                head, tail = read_head_and_tail(os.path.join(self._path, fname))
            except OSError as exc:
                raise DatasetError(f"{self._describe(fname)}: cannot read file ({exc})") from exc
            yield raw_idx, fname, head, tail, None

    def _zip_members(self, raw_indices):
        """(raw index, name, first 33 bytes, last 12 bytes, data) of each member, in archive order (the file is read
        front to back), with its CRC-32 checked: ZipMembers.read is about 4x faster than ZipFile.read."""
        for raw_idx in raw_indices[np.argsort(self._members.header_offset[raw_indices], kind="stable")].tolist():
            data = self._read_image_bytes(raw_idx)
            yield raw_idx, self._image_fnames[raw_idx], data[:33], data[-12:], data

    def _check_shape(self, fname: str, shape) -> None:
        if list(shape) != self.image_shape:
            c, h, w = shape
            ref_c, ref_h, ref_w = self.image_shape
            raise DatasetError(f"{self._describe(fname)}: image is {w}x{h} with {c} channel(s), but the dataset's "
                               f"images are {ref_w}x{ref_h} with {ref_c} channel(s) (all images must match)")

    def _open_zipfile(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self._path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"{self._path}: cannot open ZIP file ({exc})") from exc

    def _get_zipfile(self) -> zipfile.ZipFile:
        # A ZipFile inherited through fork shares its file offset with the parent: reopen it in each process.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = self._open_zipfile()
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _get_archive(self):
        # Like the ZipFile: a file object inherited through fork shares its offset with the parent.
        if self._archive is None or self._archive_pid != os.getpid():
            try:
                self._archive = open(self._path, "rb")
            except OSError as exc:
                raise DatasetError(f"{self._path}: cannot open ZIP file ({exc})") from exc
            self._archive_pid = os.getpid()
        return self._archive

    def _read_image_bytes(self, raw_idx: int) -> bytes:
        return self._read_bytes(self._image_fnames[raw_idx], self._members, raw_idx)

    def _read_bytes(self, fname: str, members: ZipMembers | None = None, row: int = 0) -> bytes:
        """The bytes of file `fname`; in a ZIP, `members` row `row` says where it lies."""
        try:
            if self._type == "dir":
                with open(os.path.join(self._path, fname), "rb") as f:
                    return f.read()
            if members.needs_zipfile(row):
                archive = self._get_zipfile()
                check_zip_member(archive.getinfo(fname), self._describe(fname))
                return archive.read(fname)
            return members.read(self._get_archive(), row, self._describe(fname))
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"{self._describe(fname)}: cannot read file ({exc})") from exc

    def _describe(self, fname: str) -> str:
        return os.path.join(self._path, fname) if self._type == "dir" else f"{self._path}:{fname}"

    def _example_image(self) -> str:
        return f", e.g. {self._describe(self._image_fnames[0])}"  # the shape every image is checked against

    def close(self):
        try:
            if self._archive is not None and self._archive_pid == os.getpid():
                self._archive.close()
            if self._zipfile is not None and self._zipfile_pid == os.getpid():
                self._zipfile.close()
        finally:
            self._archive = self._archive_pid = self._zipfile = self._zipfile_pid = None

    def __getstate__(self):
        return dict(super().__getstate__(), _archive=None, _archive_pid=None, _zipfile=None, _zipfile_pid=None)

    def _load_raw_image(self, raw_idx, check_shape=True) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        image = decode_image(self._read_image_bytes(raw_idx), self._describe(fname), self._use_pyspng)
        image = image.transpose(2, 0, 1)  # HWC -> CHW
        if check_shape:
            self._check_shape(fname, image.shape)
        return image

    def _load_raw_labels(self) -> np.ndarray | None:
        if not self._has_label_file:
            return None
        where = self._describe("dataset.json")
        try:
            labels = json.loads(self._read_bytes("dataset.json", self._label_member))["labels"]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # the last: nested too deeply
            raise DatasetError(f'{where}: expected JSON {{"labels": [[file name, label], ...] or null}} ({exc})') \
                from exc
        if labels is None:
            return None
        try:
            pairs = [(str(fname).replace("\\", "/"), label) for fname, label in labels]
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: each entry of 'labels' must be [file name, label]") from exc
        labels = dict(pairs)
        if len(labels) != len(pairs):
            seen = set()
            twice = next(f for f, _ in pairs if f in seen or seen.add(f))
            raise DatasetError(f"{where}: lists {twice!r} more than once (expected one label per image)")
        image_set = set(self._image_fnames)
        unknown = sorted(f for f in labels if f not in image_set)
        if unknown:
            raise DatasetError(f"{where}: names {len(unknown)} file(s) that are not images of the dataset, "
                               f"e.g. {unknown[0]!r}")
        unlabelled = [f for f in self._image_fnames if f not in labels]
        if unlabelled:
            raise DatasetError(f"{where}: has no label for {len(unlabelled)} image(s), e.g. {unlabelled[0]!r}")
        try:
            array = np.array([labels[f] for f in self._image_fnames])
        except (ValueError, OverflowError, RecursionError) as exc:
            raise DatasetError(f"{where}: labels must all be integers or all be float vectors of one length") from exc
        if array.ndim == 1 and array.dtype.kind in "iubf":
            # Class indices (EDM casts them to int64; 2.0 is 2, but 2.7 is an error here rather than class 2).
            values = array.astype(np.float64)
            bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)) | (values < 0)
                                 | (values >= MAX_LABEL_DIM))
            if bad.size:
                raise DatasetError(f"{where}: label of {self._image_fnames[bad[0]]!r} is {array[bad[0]]}; class "
                                   f"labels must be integers in 0..{MAX_LABEL_DIM - 1}")
            return array.astype(np.int64)
        if array.ndim == 2 and array.dtype.kind in "iuf":
            array = array.astype(np.float64)
            bad = np.flatnonzero(~np.isfinite(array).all(axis=1) | (np.abs(array) > np.finfo(np.float32).max).any(1))
            if bad.size:
                raise DatasetError(f"{where}: label of {self._image_fnames[bad[0]]!r} is {array[bad[0]].tolist()}; "
                                   f"label vectors must be finite float32 values")
            return array.astype(np.float32)
        raise DatasetError(f"{where}: labels must all be integers (class indices) or all be float vectors of one "
                           f"length; got an array of {array.dtype} with shape {list(array.shape)}")


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices for one rank, with EDM's continuous windowed reshuffling.

    All ranks hold the same seeded permutation; global draw number g goes to rank g % num_replicas. After each
    global draw at slot i, slot i is swapped with a random slot among the `window_size * len(dataset)` slots ending
    at i, so the order keeps changing without epoch boundaries (identical to EDM's misc.InfiniteSampler).

    start_idx: how many indices this rank has already consumed. A sampler built with start_idx=k yields exactly
    what a fresh one yields from its k-th draw on, which lets training resume with the exact data order. The
    swaps of all earlier global draws are replayed when iteration starts, on every rank: 0.07-0.12 us per draw on
    one CPU core (measured 2026-12-04), i.e. 14-24 s for the data stream when resuming at 200 Mimg, and 4-6 minutes
    for STF's reference stream (--stf-refs draws per GPU and step: 1024 against 64 images in the published CIFAR-10
    setup). So the stream keeps resume points: every RESUME_POINT_DRAWS global draws, the order and the generator's
    state after them (resume_point(draw): the newest at or before a draw; all ranks' streams pass through the same
    states). A sampler given one (`resume_from`) replays only the draws after it; one that does not fit this
    stream (another dataset size, seed or window, or past start_idx) is passed over for the full replay.
    """

    RESUME_POINT_DRAWS = 16 * (1 << 16)  # global draws between resume points: at most ~0.1 s of replay after one
    RESUME_POINTS_KEPT = 2  # the loader (and AOT's next pools) run ahead of training by far fewer draws than that

    _CHUNK = 1 << 16  # random draws fetched per numpy call; numpy's stream is the same as one call per draw

    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, window_size=0.5, start_idx=0,
                 resume_from=None):
        # No super().__init__(dataset): torch >= 2.2's Sampler has no such constructor argument.
        if len(dataset) <= 0:
            raise ValueError("InfiniteSampler: the dataset is empty")
        if num_replicas <= 0 or not 0 <= rank < num_replicas:
            raise ValueError(f"InfiniteSampler: need 0 <= rank < num_replicas, got rank={rank}, "
                             f"num_replicas={num_replicas}")
        if not 0 <= window_size <= 1:
            raise ValueError(f"InfiniteSampler: window_size must be in [0, 1], got {window_size}")
        if start_idx < 0:
            raise ValueError(f"InfiniteSampler: start_idx must be >= 0, got {start_idx}")
        self.dataset = dataset
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size
        self.start_idx = start_idx
        self.resume_from = resume_from
        self._resume_points = collections.deque(maxlen=self.RESUME_POINTS_KEPT)

    def _stream_key(self, window: int) -> list:
        return [self.dataset_size, self.seed, window]

    def resume_point(self, draw: int) -> dict | None:
        """The newest resume point of this stream at or before global draw `draw` (a training state's position), as
        tensors and numbers (torch.load(weights_only=True) reads them); None before the first."""
        return next((point for point in reversed(self._resume_points) if point['draw'] <= draw), None)

    def _start(self, first: int, window: int):
        """(order, generator, draws done): resume_from where it fits, else the stream's start."""
        point = self.resume_from
        try:
            if (window >= 2 and point is not None and list(point['stream']) == self._stream_key(window)
                    and 0 <= int(point['draw']) <= first and len(point['order']) == self.dataset_size):
                rnd = np.random.RandomState()
                name, keys, pos, has_gauss, cached_gaussian = point['generator']
                rnd.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                               float(cached_gaussian)))
                return torch.as_tensor(point['order']).tolist(), rnd, int(point['draw'])
        except (KeyError, TypeError, ValueError):  # a point of another form: the full replay
            pass
        order = np.arange(self.dataset_size, dtype=np.int64)
        rnd = None
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            rnd.shuffle(order)
        return order.tolist(), rnd, 0  # Python list: element swaps are several times faster than on a numpy array

    def __iter__(self):
        size = self.dataset_size
        window = int(np.rint(size * self.window_size)) if self.shuffle else 0
        # Global draw number of this rank's next index; replay the swaps made by all earlier draws (those after
        # the resume point where one is given).
        first = self.start_idx * self.num_replicas + self.rank
        order, rnd, done = self._start(first, window)
        if window >= 2:
            i = done % size
            remaining = first - done
            while remaining > 0:
                count = min(remaining, self._CHUNK)
                for offset in rnd.randint(window, size=count).tolist():
                    j = i - offset
                    if j < 0:
                        j += size
                    order[i], order[j] = order[j], order[i]
                    i += 1
                    if i == size:
                        i = 0
                remaining -= count

        i = first % size
        phase = 0  # global draw number modulo num_replicas, relative to this rank
        drawn = first  # global draws whose offsets the generator has given
        while True:
            if window >= 2:
                if (drawn - first) % self.RESUME_POINT_DRAWS == 0:  # swaps of draws < drawn made, i == drawn % size
                    name, keys, pos, has_gauss, cached_gaussian = rnd.get_state()
                    self._resume_points.append(dict(
                        stream=self._stream_key(window), draw=drawn, order=torch.tensor(order, dtype=torch.int64),
                        generator=(name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian)))
                offsets = rnd.randint(window, size=self._CHUNK).tolist()
                drawn += self._CHUNK
            else:
                offsets = [0] * self._CHUNK
            for offset in offsets:
                if phase == 0:
                    yield order[i]
                if window >= 2:
                    j = i - offset
                    if j < 0:
                        j += size
                    order[i], order[j] = order[j], order[i]
                i += 1
                if i == size:
                    i = 0
                phase += 1
                if phase == self.num_replicas:
                    phase = 0


def preview_images(path: str, num: int, seed: int = 0) -> list:
    """`num` images of a dataset (HWC uint8), drawn without replacement with `seed`: real data to show beside
    samples (generate.py --grid)."""
    dataset = ImageFolderDataset(path, use_labels=False, verify=False)
    indices = np.random.RandomState(seed).permutation(len(dataset))[:num]
    return [dataset[int(i)][0].transpose(1, 2, 0) for i in sorted(indices)]
