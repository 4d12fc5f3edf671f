"""Hostile files for the loaders' tests: payloads that write a marker file if any loader runs the code they carry.

Each builder returns bytes; `marker` is the path the payload would create. Nothing here is ever loaded unsafely by
the tests except to prove, once, that the payload really does write the marker when loaded the unsafe way.
"""

import io
import os
import pickle
import tarfile
from typing import Tuple  # noqa: UP035 -- TorchScript needs typing.Tuple on older torch

import torch


class _Payload(torch.nn.Module):
    """Its compiled __setstate__ writes the file named in its state: TorchScript runs it inside torch.jit.load."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:  # noqa: UP006
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]):  # noqa: UP006
        self.path = state[0]
        self.training = state[1]
        written = torch.from_file(self.path, shared=True, size=8, dtype=torch.uint8)
        written.fill_(88)  # The result is used below, so TorchScript cannot drop the write.
        self.path = self.path + str(int(written.sum()))

    def forward(self, x):
        return x


def torchscript_archive(marker) -> bytes:
    """A TorchScript archive that writes 8 bytes 'X' to `marker` when torch.jit.load (or torch.load) reads it."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_Payload(os.fspath(marker))), buffer)
    return buffer.getvalue()


def two_directory_archive(marker) -> bytes:
    """The TorchScript archive with a second central directory that Python's zipfile reads instead of torch's.

    The end record declares the real directory's offset and size (what torch's reader follows), but sits after a
    second directory of the same size: zipfile takes the directory just before the end record and shifts every
    offset by the difference. Through zipfile the archive holds only 'archive/data.pkl' (a plain torch.save
    file's shape); through torch it is the TorchScript archive."""
    import struct
    import zipfile

    data = torchscript_archive(marker)
    archive = zipfile.ZipFile(io.BytesIO(data))
    start = archive.start_dir
    end = data.find(b"PK\x06\x06", start)  # torch writes zip64 end records: the directory ends there
    end = end if end > 0 else data.find(b"PK\x05\x06", start)
    size, count = end - start, len(archive.infolist())
    # zipfile adds `size` to the offset it reads: aim at a real local header past that.
    target = next(info.header_offset for info in archive.infolist() if info.header_offset >= size)
    name = b"archive/data.pkl"
    comment = b"x" * (size - 46 - len(name))
    entry = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, len(name), 0,
                        len(comment), 0, 0, 0, target - size) + name + comment
    end_record = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, size, start, 0)
    return data[:end] + entry + end_record


def tar_archive() -> bytes:
    """A legacy tar-format torch file shape (torch.load extracts 'storages', 'tensors', 'pickle' from it)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as archive:
        for name in ("storages", "tensors", "pickle"):
            data = pickle.dumps(0, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class StorageFromBytes:
    """Pickles as torch.storage._load_from_bytes(data): how a tensor storage appears in a plain pickle."""

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.data,)


def network_pickle_with_storage(data: bytes) -> bytes:
    """A network pickle ({'ema': ...}) whose only tensor storage is `data`."""
    return pickle.dumps({"ema": StorageFromBytes(data)}, protocol=4)


def training_state_with_storage(data: bytes) -> bytes:
    """A torch.save zip (an EDM-style training state) with an entry carrying the storage payload."""
    buffer = io.BytesIO()
    torch.save({"net": StorageFromBytes(data), "optimizer_state": {}}, buffer)
    return buffer.getvalue()
