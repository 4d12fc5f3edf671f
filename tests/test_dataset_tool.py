"""dataset_tool.py: every source converts to a zip/folder that ImageFolderDataset reads back exactly; bad input fails
with one clear line and leaves nothing at --dest."""

import gzip
import io
import json
import os
import pickle
import re
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset
from training.dataset_tool_lib import DatasetToolError, convert_dataset, parse_resolution


def _convert(source, dest, **kwargs):
    return convert_dataset(str(source), str(dest), progress=False, **kwargs)


def _run_cli(*args):
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args])


def _read_back(path):
    """All images (N, C, H, W) and integer labels (argmax of one-hot, or None) through the reader."""
    ds = ImageFolderDataset(str(path), use_labels=True)
    images = np.stack([ds[i][0] for i in range(len(ds))])
    labels = np.array([ds.get_label(i).argmax() for i in range(len(ds))]) if ds.has_labels else None
    return images, labels, ds


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def _listing(directory):
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------------------------------------------------------------
# Sources.


def _make_cifar_tarball(path, per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    all_data, all_labels = [], []
    with tarfile.open(path, "w:gz") as tar:
        for batch_idx in range(1, 6):
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, size=per_batch).tolist()
            payload = pickle.dumps({b"batch_label": b"training batch", b"labels": labels, b"data": data,
                                    b"filenames": [b"x.png"] * per_batch}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{batch_idx}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            all_data.append(data)
            all_labels += labels
        # A test batch that must be ignored.
        payload = pickle.dumps({b"labels": [0], b"data": np.zeros((1, 3072), np.uint8)}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return np.concatenate(all_data).reshape(-1, 3, 32, 32), np.array(all_labels)


def test_cifar10_tarball_roundtrip(tmp_path):
    expected_images, expected_labels = _make_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    result = _run_cli("--source", tmp_path / "cifar-10-python.tar.gz", "--dest", tmp_path / "cifar.zip")
    assert result.exit_code == 0, result.output
    assert "Wrote 15 images" in result.output

    images, labels, ds = _read_back(tmp_path / "cifar.zip")
    assert images.shape == (15, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    assert ds.label_dim == expected_labels.max() + 1

    with zipfile.ZipFile(tmp_path / "cifar.zip") as z:
        assert {info.compress_type for info in z.infolist()} == {zipfile.ZIP_STORED}
        assert sorted(z.namelist()) == sorted([f"00000/img{i:08d}.png" for i in range(15)] + ["dataset.json"])
        meta = json.loads(z.read("dataset.json"))
    assert meta["labels"][4] == ["00000/img00000004.png", int(expected_labels[4])]


def test_cifar10_rejects_code_in_pickle(tmp_path):
    payload = pickle.dumps({b"data": os.system})  # a reference to a callable that is not numpy
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DatasetToolError, match=r"data_batch_1: expected a pickled dict.*refusing to load"):
        _convert(path, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(raw)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_roundtrip(tmp_path, compress):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress)

    n = _convert(tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path / "mnist.zip")
    assert n == 7
    out_images, out_labels, ds = _read_back(tmp_path / "mnist.zip")
    assert out_images.shape == (7, 1, 32, 32)
    padded = np.zeros((7, 32, 32), np.uint8)
    padded[:, 2:30, 2:30] = images  # EDM's zero padding 28 -> 32
    np.testing.assert_array_equal(out_images[:, 0], padded)
    np.testing.assert_array_equal(out_labels, labels)


def test_mnist_max_images_and_missing_labels_file(tmp_path):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress=False)
    with pytest.raises(DatasetToolError, match=r"t10k-labels-idx1-ubyte is missing"):
        _convert(tmp_path / "t10k-images-idx3-ubyte", tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()

    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]), compress=True)
    assert _convert(tmp_path / "t10k-images-idx3-ubyte", tmp_path / "out.zip", max_images=2) == 2
    out_images, out_labels, _ = _read_back(tmp_path / "out.zip")
    np.testing.assert_array_equal(out_labels, [3, 1])
    np.testing.assert_array_equal(out_images[1, 0, 2:30, 2:30], images[1])


def test_mnist_bad_header(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 8)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(1), compress=False)
    with pytest.raises(DatasetToolError, match=r"train-images-idx3-ubyte: expected an idx file .* 3 dimension"):
        _convert(tmp_path / "train-images-idx3-ubyte", tmp_path / "out.zip")


def test_mnist_gz_streamed_bomb_and_truncation(tmp_path):
    """A .gz whose header declares 3 images but which expands to 64 MB more: refused for the extra bytes while
    holding one chunk of records, not the whole expansion (gzip.decompress would hold 64 MB); a .gz whose data ends
    before the header's count is refused as truncated; neither leaves an output behind."""
    import tracemalloc

    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    header = bytes([0, 0, 0x08, 3]) + np.array(images.shape, dtype=">u4").tobytes()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(header + images.astype(np.uint8).tobytes())
        zeros = bytes(1 << 20)
        for _ in range(64):
            f.write(zeros)
    assert os.path.getsize(tmp_path / "train-images-idx3-ubyte.gz") < 1 << 20
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 1, 4]), compress=True)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetToolError, match=r"train-images-idx3-ubyte.gz: idx file has extra bytes after the "
                                                   r"\[3, 28, 28\]"):
            _convert(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "out.zip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert not (tmp_path / "out.zip").exists()
    # --max-images stops before the extra bytes: the first two images convert.
    assert _convert(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "out.zip", max_images=2) == 2
    np.testing.assert_array_equal(_read_back(tmp_path / "out.zip")[0][:, 0, 2:30, 2:30], images[:2])

    header5 = bytes([0, 0, 0x08, 3]) + np.array([5, 28, 28], dtype=">u4").tobytes()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header5 + images.astype(np.uint8).tobytes())
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5), compress=True)
    with pytest.raises(DatasetToolError, match=r"t10k-images-idx3-ubyte.gz: idx file is truncated \(header says "
                                               r"\[5, 28, 28\], the data ends early\)"):
        _convert(tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "out2.zip")
    assert not (tmp_path / "out2.zip").exists()
    # Uncompressed files are checked against the header before any image is written.
    (tmp_path / "x-images-idx3-ubyte").write_bytes(header5 + images.astype(np.uint8).tobytes())
    _write_idx(tmp_path / "x-labels-idx1-ubyte", np.arange(5), compress=False)
    with pytest.raises(DatasetToolError, match=r"x-images-idx3-ubyte: idx file is truncated or has extra bytes "
                                               r"\(header says \[5, 28, 28\], 2352 data bytes\)"):
        _convert(tmp_path / "x-images-idx3-ubyte", tmp_path / "out3.zip")
    # Mismatched counts are named before anything is read.
    _write_idx(tmp_path / "y-images-idx3-ubyte", images, compress=False)
    _write_idx(tmp_path / "y-labels-idx1-ubyte", np.arange(4), compress=False)
    with pytest.raises(DatasetToolError, match=r"y-labels-idx1-ubyte: has 4 labels but .*y-images-idx3-ubyte has 3"):
        _convert(tmp_path / "y-images-idx3-ubyte", tmp_path / "out4.zip")


def test_image_folder_class_subfolders(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    expected = {}
    for cls in ["dog", "cat"]:
        for i in range(2):
            img = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            _write_png(str(src / cls / f"{i}.png"), img)
            expected[f"{cls}/{i}.png"] = img
    (src / "notes.txt").write_text("not an image")

    n = _convert(src, tmp_path / "out")  # folder destination
    assert n == 4
    assert _listing(tmp_path / "out") == ["00000", "dataset.json"]
    images, labels, _ = _read_back(tmp_path / "out")
    order = ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]  # sorted paths; classes by sorted folder name
    np.testing.assert_array_equal(images, np.stack([expected[k].transpose(2, 0, 1) for k in order]))
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])


def test_image_folder_without_classes_has_null_labels(tmp_path):
    _write_png(str(tmp_path / "src" / "a.png"), np.full((4, 4), 7, np.uint8))
    _write_png(str(tmp_path / "src" / "b.png"), np.full((4, 4), 9, np.uint8))
    _convert(tmp_path / "src", tmp_path / "out.zip")
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        assert json.loads(z.read("dataset.json")) == {"labels": None}
        img = np.asarray(PIL.Image.open(io.BytesIO(z.read("00000/img00000001.png"))))
    assert img.shape == (4, 4) and img[0, 0] == 9  # grayscale stays one channel (mode L)


def test_a_dataset_json_with_null_labels_means_no_labels(tmp_path):
    """EDM's own datasets shard their images into 00000/, 00001/, ...; converting one again must not label images by
    shard (EDM does: it infers labels from sub-folders whenever dataset.json's labels are null)."""
    src = tmp_path / "edm-format"
    _write_png(str(src / "00000" / "img00000000.png"), np.full((4, 4), 1, np.uint8))
    _write_png(str(src / "00001" / "img00001000.png"), np.full((4, 4), 2, np.uint8))
    (src / "dataset.json").write_text(json.dumps({"labels": None}))
    _convert(src, tmp_path / "out.zip")
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        assert json.loads(z.read("dataset.json")) == {"labels": None}
    os.remove(src / "dataset.json")  # without one, top-level folders are classes (as EDM)
    _convert(src, tmp_path / "classes.zip")
    _, labels, _ = _read_back(tmp_path / "classes.zip")
    np.testing.assert_array_equal(labels, [0, 1])


def test_a_dataset_json_nested_too_deeply_is_one_line(tmp_path):
    src = tmp_path / "src"
    _write_png(str(src / "a.png"), np.full((4, 4), 1, np.uint8))
    (src / "dataset.json").write_text('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DatasetToolError, match=r"dataset\.json: expected JSON .*RecursionError"):
        _convert(src, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def test_zip_source_with_labels(tmp_path):
    rng = np.random.default_rng(3)
    imgs = {name: rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8) for name in ["b/x.png", "a/y.png", "c.png"]}
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as z:
        for name, img in imgs.items():
            buf = io.BytesIO()
            PIL.Image.fromarray(img).save(buf, format="png")
            z.writestr(name, buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [["b/x.png", 2], ["a/y.png", 0], ["c.png", 5]]}))
    _convert(tmp_path / "src.zip", tmp_path / "out.zip")
    images, labels, ds = _read_back(tmp_path / "out.zip")
    order = ["a/y.png", "b/x.png", "c.png"]
    np.testing.assert_array_equal(images, np.stack([imgs[k].transpose(2, 0, 1) for k in order]))
    np.testing.assert_array_equal(labels, [0, 2, 5])
    assert ds.label_dim == 6


def _lanczos_resize_uint8(image, size):
    """Independent separable Lanczos-3 resize (Pillow's convention: horizontal pass first, each pass rounded)."""
    def lanczos(x):
        return np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)

    def weights(n_in, n_out):
        scale = n_in / n_out
        support = 3 * max(scale, 1.0)
        matrix = np.zeros((n_out, n_in))
        for x in range(n_out):
            center = (x + 0.5) * scale
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            w = lanczos((np.arange(lo, hi) - center + 0.5) / max(scale, 1.0))
            matrix[x, lo:hi] = w / w.sum()
        return matrix

    def quantize(a):
        return np.clip(np.floor(a + 0.5), 0, 255)

    horizontal = quantize(image.astype(np.float64) @ weights(image.shape[1], size).T)
    return quantize(weights(image.shape[0], size) @ horizontal)


def test_digits_offline(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert _convert("digits", tmp_path / "digits.zip") == 1797
    ds = ImageFolderDataset(str(tmp_path / "digits.zip"), use_labels=True)
    assert len(ds) == 1797 and ds.image_shape == [1, 32, 32] and ds.label_dim == 10
    np.testing.assert_array_equal([ds.get_label(i).argmax() for i in range(len(ds))], digits.target)
    for idx in [0, 1000, 1796]:
        image, label = ds[idx]
        assert label.argmax() == digits.target[idx]
        scaled = np.floor(digits.images[idx] * 255 / 16 + 0.5)  # 0..16 -> 0..255
        reference = _lanczos_resize_uint8(scaled, 32)
        np.testing.assert_array_equal(image[0], reference)  # exact on Pillow 13 (checked on every 50th image)
        assert image.max() > 200 and image.min() == 0  # a real digit, not a blank image

    # At the native 8x8 no resampling happens: exact values.
    _convert("digits", tmp_path / "digits8", resolution=(8, 8), max_images=5)
    ds8 = ImageFolderDataset(str(tmp_path / "digits8"))
    np.testing.assert_array_equal(ds8[3][0][0], np.floor(digits.images[3] * 255 / 16 + 0.5))


def test_transforms_center_crop(tmp_path):
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, size=(8, 16, 3), dtype=np.uint8)  # H=8, W=16
    _write_png(str(tmp_path / "src" / "a.png"), img)
    _convert(tmp_path / "src", tmp_path / "crop.zip", transform="center-crop", resolution=(8, 8))
    np.testing.assert_array_equal(ImageFolderDataset(str(tmp_path / "crop.zip"))[0][0], img[:, 4:12].transpose(2, 0, 1))

    _convert(tmp_path / "src", tmp_path / "wide.zip", transform="center-crop-wide", resolution=(16, 8))
    out = ImageFolderDataset(str(tmp_path / "wide.zip"))[0][0]
    assert out.shape == (3, 16, 16)
    np.testing.assert_array_equal(out[:, 4:12], img.transpose(2, 0, 1))  # letterboxed
    assert out[:, :4].max() == 0 and out[:, 12:].max() == 0


def test_parse_resolution():
    assert parse_resolution("64x32") == (64, 32) and parse_resolution("16,16") == (16, 16)
    with pytest.raises(DatasetToolError, match="--resolution: expected WxH"):
        parse_resolution("64")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file, exit code != 0, no traceback, nothing at --dest.


def _folder(tmp_path, images):
    src = tmp_path / "src"
    for name, array in images.items():
        _write_png(str(src / name), array)
    return src


def _bad_sources(tmp_path):
    gray8, gray16, rgb8 = np.zeros((8, 8), np.uint8), np.zeros((16, 16), np.uint8), np.zeros((8, 8, 3), np.uint8)
    cases = {}
    src = _folder(tmp_path / "corrupt", {"a.png": gray8, "b.png": gray8})
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    cases["corrupt"] = (src, [], r"b\.png: cannot decode image")
    cases["sizes"] = (_folder(tmp_path / "sizes", {"a.png": gray8, "b.png": gray8, "c.png": gray16}), [],
                      r"c\.png: image is 16x16 with 1 channel\(s\), but the first image is 8x8")
    cases["channels"] = (_folder(tmp_path / "channels", {"a.png": gray8, "b.png": rgb8}), [],
                         r"b\.png: image is 8x8 with 3 channel\(s\), but the first image is 8x8 with 1 channel")
    cases["pow2"] = (_folder(tmp_path / "pow2", {"a.png": np.zeros((12, 12), np.uint8)}), [],
                     r"a\.png: output side must be a power of two, got 12x12")
    cases["pow2-option"] = (_folder(tmp_path / "pow2o", {"a.png": gray8}), ["--resolution", "48x48"],
                            r"--resolution=48x48: output images must be square with a power-of-two side")
    cases["square"] = (_folder(tmp_path / "square", {"a.png": np.zeros((8, 16), np.uint8)}), [],
                       r"a\.png: output images must be square, got 16x8")
    cases["missing"] = (tmp_path / "nothing-here", [], r"nothing-here: source file or folder does not exist")
    src = _folder(tmp_path / "json", {"a.png": gray8})
    (src / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["gone.png", 1]]}))
    cases["json-missing-file"] = (src, [], r"dataset\.json: names 1 file\(s\) that are not images .*'gone\.png'")
    # RGBA: refused with or without a transform (the crops read RGB: PIL's traceback before).
    rgba = _folder(tmp_path / "rgba", {"a.png": np.zeros((8, 8, 4), np.uint8)})
    cases["rgba-crop"] = (rgba, ["--transform", "center-crop", "--resolution", "8x8"],
                          r"a\.png: images must be RGB or grayscale \(1 or 3 channels\), got 4 channels")
    cases["rgba"] = (rgba, [], r"a\.png: images must be RGB or grayscale \(1 or 3 channels\), got 4 channels")
    # Zip members zipfile cannot read: encrypted (RuntimeError), Deflate64 (NotImplementedError); tracebacks before.
    for case, offset, value in (("zip-encrypted", 8, 1), ("zip-deflate64", 10, 9)):
        path = tmp_path / f"{case}.zip"
        with zipfile.ZipFile(path, "w") as z:
            buffer = io.BytesIO()
            PIL.Image.fromarray(gray8).save(buffer, format="png")
            z.writestr("a.png", buffer.getvalue())
        data = bytearray(path.read_bytes())
        central = data.index(b"PK\x01\x02")  # the member's central directory entry: flags at +8, method at +10
        data[central + offset:central + offset + 2] = value.to_bytes(2, "little")
        path.write_bytes(bytes(data))
        cases[case] = (path, [], rf"{case}\.zip:a\.png: cannot read file")
    return cases


BAD_CASES = ["corrupt", "sizes", "channels", "pow2", "pow2-option", "square", "missing", "json-missing-file",
             "rgba-crop", "rgba", "zip-encrypted", "zip-deflate64"]


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("dest_kind", ["zip", "folder"])
def test_bad_input_clear_error_and_no_output(tmp_path, case, dest_kind):
    source, extra, message = _bad_sources(tmp_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / ("data.zip" if dest_kind == "zip" else "data")
    result = _run_cli("--source", source, "--dest", dest, *extra)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    assert re.search(message, error_lines[0]), error_lines[0]
    assert _listing(out_dir) == []  # neither the destination nor a temporary file/folder


def test_failure_leaves_existing_empty_dest_folder_empty(tmp_path):
    source, _, _ = _bad_sources(tmp_path)["sizes"]
    dest = tmp_path / "out" / "data"
    dest.mkdir(parents=True)
    with pytest.raises(DatasetToolError, match="all images must match"):
        _convert(source, dest)
    assert _listing(tmp_path / "out") == ["data"] and _listing(dest) == []

    # The same empty folder is then accepted as a destination and filled.
    good = _folder(tmp_path / "good", {"a.png": np.full((4, 4), 3, np.uint8)})
    assert _convert(good, dest) == 1
    assert _listing(dest) == ["00000", "dataset.json"] and _listing(tmp_path / "out") == ["data"]


def test_existing_destination_is_an_error(tmp_path):
    good = _folder(tmp_path / "good", {"a.png": np.full((4, 4), 3, np.uint8)})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = _run_cli("--source", good, "--dest", tmp_path / "full")
    assert result.exit_code != 0 and "full: destination folder is not empty" in result.output
    assert _listing(tmp_path / "full") == ["keep.txt"] and (tmp_path / "full" / "keep.txt").read_text() == "mine"

    (tmp_path / "old.zip").write_bytes(b"old contents")
    result = _run_cli("--source", good, "--dest", tmp_path / "old.zip")
    assert result.exit_code != 0 and "old.zip: destination already exists" in result.output
    assert (tmp_path / "old.zip").read_bytes() == b"old contents"


def test_empty_folders_a_rename_cannot_replace_are_refused_before_converting(tmp_path, monkeypatch):
    """The dataset is written beside --dest and renamed over the empty folder: impossible for a symbolic link or the
    current folder, which failed after the whole conversion."""
    good = _folder(tmp_path / "good", {"a.png": np.full((4, 4), 3, np.uint8)})
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "link")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for dest in (tmp_path / "link", ".", here):
        result = _run_cli("--source", good, "--dest", dest)
        assert result.exit_code == 1, result.output
        assert f"Error: {dest}: an empty folder that cannot be replaced by renaming (a symbolic link, a mount point " \
               f"or the current folder); give a new folder inside it, e.g. {os.path.join(dest, 'dataset')}, or a " \
               f".zip" in result.output
        assert "Traceback" not in result.output
    assert _listing(tmp_path / "target") == [] and _listing(here) == [] and "link" in _listing(tmp_path)
    assert _run_cli("--source", good, "--dest", "dataset").exit_code == 0  # a new folder inside it
    assert _listing(here / "dataset") == ["00000", "dataset.json"]


def test_a_dataset_folder_inside_its_source_is_refused(tmp_path):
    """--dest=SRC/out wrote a correct dataset once, which then counted as SRC's images: converting SRC again (or
    train.py --data=SRC) read each image twice. A .zip inside is not an image and stays allowed."""
    source = str(_folder(tmp_path, {"a.png": np.full((4, 4), 3, np.uint8), "b.png": np.full((4, 4), 9, np.uint8)}))
    result = _run_cli("--source", source, "--dest", os.path.join(source, "out"))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"Error: {source}/out: a dataset folder inside --source {source} would become part of it; give a --dest " \
           f"outside it, or a .zip" in result.output
    assert _listing(source) == ["a.png", "b.png"]
    assert _run_cli("--source", source, "--dest", os.path.join(source, "out.zip")).exit_code == 0
    assert len(ImageFolderDataset(source)) == 2


def test_center_crop_needs_resolution(tmp_path):
    good = _folder(tmp_path / "good", {"a.png": np.zeros((4, 4), np.uint8)})
    result = _run_cli("--source", good, "--dest", tmp_path / "o.zip", "--transform", "center-crop")
    assert result.exit_code != 0 and "--transform=center-crop needs --resolution=WxH" in result.output
    assert not (tmp_path / "o.zip").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Labels from dataset.json: non-negative integers below MAX_LABEL_DIM, one per file.


BAD_LABELS = {
    "string": ("cat", r"label of 'b\.png' is \"cat\"; expected a class index, an integer in 0\.\.65535"),
    "fraction": (2.7, r"label of 'b\.png' is 2\.7; expected a class index"),
    "negative": (-3, r"label of 'b\.png' is -3; expected a class index"),
    "vector-nan": ([float("nan"), 1.0], r"label of 'b\.png' is \[NaN, 1\.0\]; expected a class index"),
    "huge": (1e9, r"label of 'b\.png' is 1000000000\.0; expected a class index, an integer in 0\.\.65535"),
    "bool": (True, r"label of 'b\.png' is true; expected a class index"),
    "null": (None, r"label of 'b\.png' is null; expected a class index"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
@pytest.mark.parametrize("source_kind", ["folder", "zip"])
def test_bad_labels_are_rejected(tmp_path, case, source_kind):
    label, message = BAD_LABELS[case]
    src = _folder(tmp_path, {"a.png": np.zeros((4, 4), np.uint8), "b.png": np.ones((4, 4), np.uint8)})
    (src / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", label]]}))
    if source_kind == "zip":
        with zipfile.ZipFile(tmp_path / "src.zip", "w") as z:
            for name in ("a.png", "b.png", "dataset.json"):
                z.write(src / name, arcname=name)
        src = tmp_path / "src.zip"
    (tmp_path / "out").mkdir()
    result = _run_cli("--source", src, "--dest", tmp_path / "out" / "d.zip")
    assert result.exit_code != 0 and "Wrote" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and re.search(r"dataset\.json: " + message, error_lines[0]), result.output
    assert _listing(tmp_path / "out") == []


def test_file_listed_twice_is_rejected(tmp_path):
    src = _folder(tmp_path, {"a.png": np.zeros((4, 4), np.uint8), "b.png": np.ones((4, 4), np.uint8)})
    (src / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1], ["a.png", 0]]}))
    with pytest.raises(DatasetToolError, match=r"dataset\.json: lists 'a\.png' more than once"):
        _convert(src, tmp_path / "d.zip")
    assert not (tmp_path / "d.zip").exists()


def test_integral_float_labels_and_the_largest_label_are_accepted(tmp_path):
    src = _folder(tmp_path, {"a.png": np.zeros((4, 4), np.uint8), "b.png": np.ones((4, 4), np.uint8)})
    (src / "dataset.json").write_text(json.dumps({"labels": [["a.png", 2.0], ["b.png", 65535]]}))
    assert _convert(src, tmp_path / "d.zip") == 2
    with zipfile.ZipFile(tmp_path / "d.zip") as z:
        assert json.loads(z.read("dataset.json"))["labels"] == [["00000/img00000000.png", 2],
                                                                ["00000/img00000001.png", 65535]]


# ---------------------------------------------------------------------------------------------------------------------
# Unwritable or full --dest: one line naming --dest, no temporary zip or folder left behind.


def test_full_disk_leaves_no_temporary_output(tmp_path, monkeypatch):
    """The disk fills while writing; closing the zip fails too (as in the original bug): nothing is left."""
    import errno

    src = _folder(tmp_path, {f"{i}.png": np.full((4, 4), i, np.uint8) for i in range(5)})
    (tmp_path / "out").mkdir()
    real_writestr = zipfile.ZipFile.writestr
    real_write_end = zipfile.ZipFile._write_end_record

    def full(self, name, data, *args, **kwargs):
        if name.endswith("img00000003.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writestr(self, name, data, *args, **kwargs)

    def full_end(self):
        real_write_end(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full)
    monkeypatch.setattr(zipfile.ZipFile, "_write_end_record", full_end)
    result = _run_cli("--source", src, "--dest", tmp_path / "out" / "d.zip")
    assert result.exit_code != 0 and (result.exception is None or isinstance(result.exception, SystemExit))
    assert re.search(r"^Error: --dest .*d\.zip: cannot write the dataset \(No space left on device\)$",
                     result.output, re.M), result.output
    assert _listing(tmp_path / "out") == []

    real_open = open

    def full_open(path, mode="r", *args, **kwargs):  # folder destination: a file write fails
        if "img00000002.png" in str(path) and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_open)
    result = _run_cli("--source", src, "--dest", tmp_path / "out" / "d")
    assert result.exit_code != 0 and "Error: --dest " in result.output and "No space left" in result.output
    assert _listing(tmp_path / "out") == []


def test_stale_temporary_outputs_of_dead_runs_are_removed(tmp_path):
    import subprocess
    import sys

    from dnnlib import util

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "out"
    out.mkdir()
    host = util._host_tag()
    stale_zip = out / f"d.zip.tmp-{host}-{dead}-0123abcd"
    stale_dir = out / f".d.tmp-{host}-{dead}-0123abcd"
    live_zip = out / f"d.zip.tmp-{host}-{os.getpid()}-0123abcd"  # another run still writing: kept
    other_host = out / f"d.zip.tmp-elsewhere-{dead}-0123abcd"  # its process cannot be checked from here: kept
    unrelated = out / f"other.zip.tmp-{host}-{dead}-0123abcd"  # another output's: not this command's business
    for path in (stale_zip, live_zip, other_host, unrelated):
        path.write_bytes(b"partial")
    (stale_dir / "00000").mkdir(parents=True)
    (stale_dir / "00000" / "img00000000.png").write_bytes(b"partial")
    src = _folder(tmp_path, {"a.png": np.zeros((4, 4), np.uint8)})
    assert _run_cli("--source", src, "--dest", out / "d.zip").exit_code == 0
    assert _run_cli("--source", src, "--dest", out / "d").exit_code == 0
    assert _listing(out) == sorted(["d", "d.zip", live_zip.name, other_host.name, unrelated.name])


# ---------------------------------------------------------------------------------------------------------------------
# The same dataset with and without pyspng; files that are not images; labels that used to be lost.


def _png_bytes(image: PIL.Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="png", **save_kwargs)
    return buf.getvalue()


class _RecordingPyspng:
    """Stands in for pyspng (not installed here): decodes with PIL as pyspng does for 8-bit grey/RGB/RGBA, and
    records the calls, so a test sees which files would go to pyspng."""

    def __init__(self):
        self.calls = 0

    def load(self, data):
        self.calls += 1
        return np.asarray(PIL.Image.open(io.BytesIO(data)))


def test_only_8bit_grey_rgb_rgba_pngs_go_to_pyspng(monkeypatch):
    from training import dataset as dataset_module

    fake = _RecordingPyspng()
    monkeypatch.setattr(dataset_module, "pyspng", fake)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    for mode, array in (("L", rgb[:, :, 0]), ("RGB", rgb), ("RGBA", np.dstack([rgb, rgb[:, :, :1]]))):
        before = fake.calls
        out = dataset_module.decode_image(_png_bytes(PIL.Image.fromarray(array, mode)), "x.png")
        assert fake.calls == before + 1, mode
        np.testing.assert_array_equal(out, array.reshape(4, 5, -1))

    palette = PIL.Image.fromarray(rgb).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=8)
    cases = {
        "palette with transparency": _png_bytes(palette, transparency=0),  # pyspng dropped the transparency
        "palette": _png_bytes(palette),
        "LA": _png_bytes(PIL.Image.fromarray(np.dstack([rgb[:, :, 0], rgb[:, :, 1]]), "LA")),  # pyspng refused it
        "1-bit": _png_bytes(PIL.Image.fromarray(rgb[:, :, 0] > 128)),
        "JPEG data named .png": (lambda b: (PIL.Image.fromarray(rgb).save(b, format="jpeg"), b.getvalue())[1])(
            io.BytesIO()),
    }
    for name, data in cases.items():
        out = dataset_module.decode_image(data, "x.png")
        monkeypatch.setattr(dataset_module, "pyspng", None)
        np.testing.assert_array_equal(out, dataset_module.decode_image(data, "x.png"), err_msg=name)
        monkeypatch.setattr(dataset_module, "pyspng", fake)
    assert fake.calls == 3  # none of the cases reached pyspng
    assert dataset_module.decode_image(cases["palette with transparency"], "x.png").shape == (4, 5, 4)


def test_16bit_pngs_are_refused_with_or_without_pyspng(monkeypatch, tmp_path):
    from training import dataset as dataset_module

    rgb16 = (np.arange(4 * 4 * 3, dtype=np.uint16).reshape(4, 4, 3) * 1000 + 7)
    # A 16-bit RGB PNG written by hand (PIL cannot write one): IHDR bit depth 16, colour type 2.
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with PIL.Image.open(io.BytesIO(data)) as img:  # what PIL alone made of it: the high bytes, silently
        assert img.mode == "RGB"
    for fake in (None, _RecordingPyspng()):
        monkeypatch.setattr(dataset_module, "pyspng", fake)
        with pytest.raises(dataset_module.DatasetError, match=r"x\.png: a 16-bit PNG; expected 8 bits per channel"):
            dataset_module.decode_image(data, "x.png")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(data)
    result = _run_cli("--source", tmp_path / "src", "--dest", tmp_path / "out.zip")
    assert result.exit_code == 1 and "a.png: a 16-bit PNG" in result.output
    assert not (tmp_path / "out.zip").exists()


def test_files_pil_cannot_decode_and_macos_metadata_are_not_images(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    src = tmp_path / "src"
    for i, image in enumerate(images):
        _write_png(str(src / f"{i}.png"), image)
    (src / "LICENSE.pdf").write_bytes(b"%PDF-1.4 not an image")
    (src / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (src / "figure.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0")
    (src / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    assert _convert(src, tmp_path / "folder.zip") == 3
    np.testing.assert_array_equal(_read_back(tmp_path / "folder.zip")[0], images.transpose(0, 3, 1, 2))

    with zipfile.ZipFile(tmp_path / "mac.zip", "w") as zf:
        for i, image in enumerate(images):
            zf.writestr(f"digits/{i}.png", _png_bytes(PIL.Image.fromarray(image)))
            zf.writestr(f"__MACOSX/digits/._{i}.png", b"\x00\x05\x16\x07AppleDouble")
    assert _convert(tmp_path / "mac.zip", tmp_path / "mac-out.zip") == 3


def test_a_zip_of_a_dataset_folder_keeps_its_labels(tmp_path):
    rng = np.random.default_rng(2)
    with zipfile.ZipFile(tmp_path / "src.zip", "w") as zf:
        names = []
        for i in range(4):
            names.append(f"00000/img{i:08d}.png")
            zf.writestr(f"cifar10-32x32/{names[-1]}",
                        _png_bytes(PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))))
        zf.writestr("cifar10-32x32/dataset.json", json.dumps({"labels": [[n, 3 - i] for i, n in enumerate(names)]}))
    assert _convert(tmp_path / "src.zip", tmp_path / "out.zip") == 4
    assert _read_back(tmp_path / "out.zip")[1].tolist() == [3, 2, 1, 0]


def test_symlinked_class_folders_are_read_once_and_labelled(tmp_path):
    rng = np.random.default_rng(3)
    store, src = tmp_path / "store", tmp_path / "src"
    for cls in ("cat", "dog"):
        for i in range(2):
            _write_png(str(store / cls / f"{i}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    src.mkdir()
    os.symlink(store / "cat", src / "cat")
    os.symlink(store / "dog", src / "dog")
    os.symlink(src, store / "dog" / "loop")  # a link back up the tree must not recurse forever
    assert _convert(src, tmp_path / "out.zip") == 4
    assert _read_back(tmp_path / "out.zip")[1].tolist() == [0, 0, 1, 1]


def test_numbered_class_folders_get_a_note_on_their_order(tmp_path):
    rng = np.random.default_rng(4)
    for cls in ("0", "1", "2", "10"):
        _write_png(str(tmp_path / "src" / cls / "a.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    result = _run_cli("--source", tmp_path / "src", "--dest", tmp_path / "out.zip")
    assert result.exit_code == 0, result.output
    assert "class folders are numbered in name order, as EDM does (0 -> 0, 1 -> 1, 10 -> 2, 2 -> 3)" in result.output
    assert _read_back(tmp_path / "out.zip")[1].tolist() == [0, 1, 2, 3]  # EDM's labels: folder 10 is class 2
    for cls in ("3",):  # 0..3 sort the same as names and as numbers: no note
        _write_png(str(tmp_path / "src2" / cls / "a.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        _write_png(str(tmp_path / "src2" / "0" / "a.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    result = _run_cli("--source", tmp_path / "src2", "--dest", tmp_path / "out2.zip")
    assert result.exit_code == 0 and "name order" not in result.output


def test_center_crop_wide_checks_its_resolution_and_counts_skipped_images(tmp_path):
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(32, 64), (40, 64), (8, 8), (16, 64)]):  # the last: a band of 8 rows
        _write_png(str(tmp_path / "src" / f"{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for resolution in ("16x32", "24x16"):  # a band taller than wide; a width that is no power of two
        result = _run_cli("--source", tmp_path / "src", "--dest", tmp_path / "out.zip",
                          "--transform=center-crop-wide", f"--resolution={resolution}")
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert f"--resolution={resolution} with --transform=center-crop-wide" in result.output
        assert not (tmp_path / "out.zip").exists()
    result = _run_cli("--source", tmp_path / "src", "--dest", tmp_path / "out.zip", "--transform=center-crop-wide",
                      "--resolution=32x16")
    assert result.exit_code == 0, result.output
    assert "Skipped 2 of 4 images: smaller than 32x16" in result.output and "Wrote 2 images" in result.output


def test_corrupt_cifar_tarball_and_empty_image_errors_are_one_line(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(gzip.compress(b"garbage"))
    result = _run_cli("--source", tmp_path / "cifar-10-python.tar.gz", "--dest", tmp_path / "out.zip")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "cannot read as a tar archive" in result.output
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(b"")
    result = _run_cli("--source", tmp_path / "src", "--dest", tmp_path / "out.zip")
    assert result.exit_code == 1 and "a.png: cannot decode image (not a format PIL reads" in result.output
    assert "BytesIO" not in result.output


def test_home_folder_in_source_and_dest(tmp_path, monkeypatch):
    """--source=~/... and --dest=~/...: the shell expands no ~ after "=", and the tool wrote the dataset into a
    folder named '~' in the current one."""
    (tmp_path / "home").mkdir()
    _folder(tmp_path / "home", {"a.png": np.full((4, 4), 3, np.uint8)})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = _run_cli("--source=~/src", "--dest=~/d.zip")
    assert result.exit_code == 0, result.output
    assert _listing(tmp_path / "home") == ["d.zip", "src"] and _listing(tmp_path) == ["home"]
