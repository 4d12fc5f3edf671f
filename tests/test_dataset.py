"""ImageFolderDataset (EDM's reader) and InfiniteSampler (EDM's windowed reshuffle, exact continuation)."""

import io
import itertools
import json
import os
import pathlib
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.dataset import DatasetError, ImageFolderDataset, InfiniteSampler


def _images(n, shape=(8, 8, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _png_bytes(array):
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format="png")
    return buf.getvalue()


def _make_zip(path, images, labels=None):
    """EDM layout written directly with PIL/zipfile (independent of dataset_tool)."""
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as z:
        for name, img in zip(names, images):
            z.writestr(name, _png_bytes(img))
        if labels is not None:
            z.writestr("dataset.json", json.dumps({"labels": [[n, lab] for n, lab in zip(names, labels)]}))
    return str(path)


def _make_folder(path, images, labels=None):
    os.makedirs(path, exist_ok=True)
    names = [f"img{i:03d}.png" for i in range(len(images))]
    for name, img in zip(names, images):
        PIL.Image.fromarray(img).save(os.path.join(path, name))
    if labels is not None:
        with open(os.path.join(path, "dataset.json"), "w") as f:
            json.dump({"labels": [[n, lab] for n, lab in zip(names, labels)]}, f)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# ImageFolderDataset.


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_reads_pixels_and_onehot_labels(tmp_path, kind):
    images, labels = _images(5), [3, 0, 1, 3, 2]
    path = (_make_zip(tmp_path / "d.zip", images, labels) if kind == "zip"
            else _make_folder(tmp_path / "d", images, labels))
    ds = ImageFolderDataset(path, use_labels=True)
    assert len(ds) == 5 and ds.image_shape == [3, 8, 8] and ds.resolution == 8 and ds.num_channels == 3
    assert ds.name == "d" and ds.label_shape == [4] and ds.label_dim == 4
    assert ds.has_labels and ds.has_onehot_labels
    for i in range(5):
        image, label = ds[i]
        assert image.dtype == np.uint8 and label.dtype == np.float32
        np.testing.assert_array_equal(image, images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(label, np.eye(4, dtype=np.float32)[labels[i]])
    details = ds.get_details(3)
    assert details.raw_idx == 3 and details.xflip is False and int(details.raw_label) == 3

    plain = ImageFolderDataset(path)  # use_labels=False: label dimension 0
    assert plain[0][1].shape == (0,) and plain.label_dim == 0 and not plain.has_labels


def test_float_vector_labels_and_grayscale(tmp_path):
    images = _images(3, shape=(4, 4))
    vectors = [[0.5, -1.0], [2.0, 0.0], [0.25, 0.75]]
    ds = ImageFolderDataset(_make_zip(tmp_path / "g.zip", images, vectors), use_labels=True, name="custom")
    assert ds.image_shape == [1, 4, 4] and ds.name == "custom"
    assert ds.label_shape == [2] and not ds.has_onehot_labels
    np.testing.assert_array_equal(ds[2][0][0], images[2])
    np.testing.assert_array_equal(ds[1][1], np.array([2.0, 0.0], np.float32))


def test_max_size_is_a_seeded_sorted_subset(tmp_path):
    images = _images(20)
    path = _make_zip(tmp_path / "d.zip", images, list(range(20)))
    ds = ImageFolderDataset(path, max_size=6, random_seed=123, use_labels=True)
    expected = np.sort(np.random.RandomState(123).permutation(20)[:6])
    assert len(ds) == 6
    assert [ds.get_details(i).raw_idx for i in range(6)] == expected.tolist()
    for i, raw in enumerate(expected):
        np.testing.assert_array_equal(ds[i][0], images[raw].transpose(2, 0, 1))
        assert ds[i][1].argmax() == raw
    other = ImageFolderDataset(path, max_size=6, random_seed=124)
    assert [other.get_details(i).raw_idx for i in range(6)] != expected.tolist()
    assert len(ImageFolderDataset(path, max_size=50)) == 20  # larger than the data: no subset


def test_xflip_doubles_with_mirrored_second_half(tmp_path):
    images = _images(4)
    ds = ImageFolderDataset(_make_zip(tmp_path / "d.zip", images, [0, 1, 2, 3]), xflip=True, use_labels=True)
    assert len(ds) == 8
    for i in range(4):
        np.testing.assert_array_equal(ds[i][0], images[i].transpose(2, 0, 1))
        np.testing.assert_array_equal(ds[4 + i][0], images[i][:, ::-1].transpose(2, 0, 1))
        assert ds[4 + i][1].argmax() == i and ds.get_details(4 + i).xflip
    # max_size applies before x-flip.
    assert len(ImageFolderDataset(str(tmp_path / "d.zip"), xflip=True, max_size=3)) == 6


def test_cache_keeps_decoded_images(tmp_path):
    images = _images(2)
    folder = _make_folder(tmp_path / "d", images)
    cached = ImageFolderDataset(folder, cache=True)
    uncached = ImageFolderDataset(folder, cache=False)
    cached[1], uncached[1]
    PIL.Image.fromarray(np.zeros_like(images[1])).save(os.path.join(folder, "img001.png"))  # change it on disk
    np.testing.assert_array_equal(cached[1][0], images[1].transpose(2, 0, 1))  # served from RAM
    assert uncached[1][0].max() == 0  # re-read from disk
    cached[1][0][:] = 0  # callers get copies: the cache is not corrupted
    np.testing.assert_array_equal(cached[1][0], images[1].transpose(2, 0, 1))
    assert pickle.loads(pickle.dumps(cached))._cached_images == {}  # workers fill their own cache


def test_pickles_into_dataloader_workers(tmp_path):
    images = _images(6)
    ds = ImageFolderDataset(_make_zip(tmp_path / "d.zip", images, [0, 1, 0, 1, 0, 1]), use_labels=True)
    ds[0]  # the zip is open in this process
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5][0], images[5].transpose(2, 0, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    got = torch.cat([b[0] for b in batches]).numpy()
    np.testing.assert_array_equal(got, images.transpose(0, 3, 1, 2))
    assert torch.cat([b[1] for b in batches]).argmax(1).tolist() == [0, 1, 0, 1, 0, 1]



@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_members_are_read_without_a_zipfile_per_process(tmp_path, monkeypatch, compression):
    """The ZIP directory is read once, when the dataset is opened, into arrays; a worker (a pickled copy) reads the
    images and dataset.json by offset: no ZipFile (a ZipInfo object per member, ~1.5 KB per image per worker)."""
    images = _images(5)
    labels = [3, 1, 4, 1, 5]
    path = tmp_path / "d.zip"
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        z.writestr("dataset.json", json.dumps({"labels": [[n, lab] for n, lab in zip(names, labels)]}))
        for name, image in zip(names, images):
            z.writestr(name, _png_bytes(image))
    ds = ImageFolderDataset(str(path), use_labels=True)
    assert ds._zipfile is None  # the directory's ZipFile is let go once the arrays are built

    def no_zipfile(*args, **kwargs):
        raise AssertionError("ZipFile opened while reading members")

    monkeypatch.setattr(zipfile, "ZipFile", no_zipfile)
    worker = pickle.loads(pickle.dumps(ds))
    assert worker._raw_labels is None  # re-read by the worker, from the ZIP
    for i in range(5):
        image, label = worker[i]
        np.testing.assert_array_equal(image, images[i].transpose(2, 0, 1))
        assert label.argmax() == labels[i] and label.shape == (6,)
    assert ds._members.compress_type.tolist() == [compression] * 5


def test_zip_members_other_compressions_go_through_zipfile(tmp_path):
    images = _images(3)
    with zipfile.ZipFile(tmp_path / "bz.zip", "w", compression=zipfile.ZIP_BZIP2) as z:
        for i, image in enumerate(images):
            z.writestr(f"img{i}.png", _png_bytes(image))
    ds = ImageFolderDataset(str(tmp_path / "bz.zip"))
    assert [ds._members.needs_zipfile(i) for i in range(3)] == [True] * 3
    np.testing.assert_array_equal(np.stack([ds[i][0] for i in range(3)]), images.transpose(0, 3, 1, 2))


def test_zip_member_that_inflates_past_its_declared_size_is_damaged(tmp_path):
    from training.dataset import ZipMembers

    member = _png_bytes(_images(1)[0])
    with zipfile.ZipFile(tmp_path / "d.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("img0.png", member)
        infos = z.infolist()
    members = ZipMembers(infos)
    with open(tmp_path / "d.zip", "rb") as f:
        assert members.read(f, 0, "here") == member
        members.file_size[0] = len(member) - 1  # declares one byte less than the stream inflates to
        with pytest.raises(DatasetError, match=r"^here: damaged ZIP file \(bad CRC-32 or size"):
            members.read(f, 0, "here")


def test_zip_members_are_read_by_position_safe_for_threads(tmp_path):
    """ZipMembers.read neither uses nor moves the file's offset (pread), so threads may share one dataset: with seek
    and read, 4 threads x 4000 reads saw about 6 % false 'damaged ZIP file' errors."""
    import concurrent.futures

    images = _images(8)
    ds = ImageFolderDataset(_make_zip(tmp_path / "d.zip", images))
    with open(tmp_path / "d.zip", "rb") as f:
        f.seek(7)
        ds._members.read(f, 3, "here")
        assert f.tell() == 7

    def read_all(start):
        return [int(ds[(start + i) % 8][0].astype(np.int64).sum()) for i in range(200)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sums = list(pool.map(read_all, range(4)))
    expected = images.astype(np.int64).sum(axis=(1, 2, 3))
    assert sums == [[int(expected[(start + i) % 8]) for i in range(200)] for start in range(4)]


def test_zip_directory_entries_out_of_range_are_damage(tmp_path, monkeypatch):
    """A directory entry whose member reaches past the end of the file, or whose ZIP64 size does not fit in 63 bits,
    is a DatasetError naming the file when the dataset is opened (not a read that reserves terabytes, nor an
    OverflowError)."""
    import struct

    data = bytearray(open(_make_zip(tmp_path / "d.zip", _images(3)), "rb").read())
    name = b"00000/img00000001.png"
    central = next(i for i in range(len(data)) if data[i:i + 4] == b"PK\x01\x02" and data[i + 46:i + 46 + len(name)]
                   == name)
    data[central + 20:central + 24] = struct.pack("<I", 1 << 31)  # compressed size: 2 GB in a file of a few KB
    (tmp_path / "past.zip").write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"past\.zip:00000/img00000001\.png: damaged ZIP file \(its directory "
                                           r"entry reaches past the end of the file"):
        ImageFolderDataset(str(tmp_path / "past.zip"))
    # A ZIP64 extra field may declare sizes up to 2**64 - 1, which zipfile accepts.
    original = zipfile.ZipFile.getinfo

    def huge(self, name):
        info = original(self, name)
        info.file_size = (1 << 64) - 1
        return info

    monkeypatch.setattr(zipfile.ZipFile, "getinfo", huge)
    with pytest.raises(DatasetError, match=r"d\.zip: damaged ZIP file \(a member's size or offset is out of range"):
        ImageFolderDataset(str(tmp_path / "d.zip"))

def test_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.zip: dataset path does not exist"):
        ImageFolderDataset(str(tmp_path / "nope.zip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no image files found"):
        ImageFolderDataset(str(tmp_path / "empty"))
    (tmp_path / "notzip.zip").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"notzip\.zip: cannot open ZIP file"):
        ImageFolderDataset(str(tmp_path / "notzip.zip"))

    path = _make_zip(tmp_path / "d.zip", _images(2))
    with pytest.raises(DatasetError, match=r"d\.zip: images are 8x8, but resolution=16 was requested"):
        ImageFolderDataset(path, resolution=16)
    assert ImageFolderDataset(path, resolution=8).resolution == 8


def test_dataset_json_must_match_the_images(tmp_path):
    folder = _make_folder(tmp_path / "d", _images(2), labels=[0, 1])
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"labels": [["img000.png", 0], ["img001.png", 1], ["gone.png", 1]]}, f)
    with pytest.raises(DatasetError, match=r"dataset\.json: names 1 file\(s\) that are not images .*'gone\.png'"):
        ImageFolderDataset(folder, use_labels=True)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"labels": [["img000.png", 0]]}, f)
    with pytest.raises(DatasetError, match=r"dataset\.json: has no label for 1 image\(s\), e.g. 'img001\.png'"):
        ImageFolderDataset(folder, use_labels=True)
    assert len(ImageFolderDataset(folder, use_labels=False)) == 2  # labels not requested: not read
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"labels": None}, f)
    assert ImageFolderDataset(folder, use_labels=True).label_dim == 0
    with open(os.path.join(folder, "dataset.json"), "w") as f:  # nested past Python's recursion limit
        f.write('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DatasetError, match=r"dataset\.json: expected JSON"):
        ImageFolderDataset(folder, use_labels=True)


def test_bad_images_fail_on_access_naming_the_file(tmp_path):
    folder = _make_folder(tmp_path / "d", _images(3))
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(folder, "img001.png"))
    PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(folder, "img002.png"))
    ds = ImageFolderDataset(folder, verify=False)  # verify=True finds these when opening (see below)
    with pytest.raises(DatasetError, match=r"img001\.png: image is 16x16 with 3 channel\(s\), but the dataset's "
                                           r"images are 8x8 with 3"):
        ds[1]
    with pytest.raises(DatasetError, match=r"img002\.png: image is 8x8 with 1 channel\(s\)"):
        ds[2]
    with open(os.path.join(folder, "img002.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DatasetError, match=r"img002\.png: cannot decode image"):
        ds[2]


def _one_odd_image(folder, name, array):
    PIL.Image.fromarray(array).save(os.path.join(folder, name))


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_damaged_images_are_found_when_opening(tmp_path, kind):
    """Every image the dataset will read is checked up front: shape from the PNG header, truncation, ZIP CRC-32."""
    folder = _make_folder(tmp_path / "d", _images(4))
    cases = {
        "size": (lambda: _one_odd_image(folder, "img002.png", np.zeros((16, 16, 3), np.uint8)),
                 r"img002\.png: image is 16x16 with 3 channel\(s\), but the dataset's images are 8x8 with 3 channel"),
        "channels": (lambda: _one_odd_image(folder, "img003.png", np.zeros((8, 8), np.uint8)),
                     r"img003\.png: image is 8x8 with 1 channel\(s\), but the dataset's images are 8x8 with 3"),
        "truncated": (lambda: open(os.path.join(folder, "img001.png"), "r+b").truncate(60),
                      r"img001\.png: truncated or damaged PNG"),
        "empty": (lambda: open(os.path.join(folder, "img001.png"), "wb").close(), r"img001\.png: "),
        "palette": (lambda: PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P").resize((4, 4)).save(
            os.path.join(folder, "img002.png")), r"img002\.png: image is 4x4 with 3 channel"),
    }
    pristine = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    for case, (damage, message) in cases.items():
        for name, data in pristine.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        damage()
        path = folder
        if kind == "zip":
            path = str(tmp_path / f"{case}.zip")
            with zipfile.ZipFile(path, "w") as z:
                for name in sorted(os.listdir(folder)):
                    z.write(os.path.join(folder, name), arcname=name)
        with pytest.raises(DatasetError, match=message):
            ImageFolderDataset(path)
        assert len(ImageFolderDataset(path, verify=False)) == 4  # the first image alone is fine


def test_zip_with_a_bad_crc_fails_when_opening(tmp_path):
    images = _images(3)
    path = _make_zip(tmp_path / "d.zip", images)
    data = bytearray(pathlib.Path(path).read_bytes())
    member = _png_bytes(images[2])
    offset = bytes(data).rindex(member) + len(member) // 2
    data[offset] ^= 0x01  # one flipped bit inside the last image's pixel data
    with open(tmp_path / "bad.zip", "wb") as f:
        f.write(bytes(data))
    with pytest.raises(DatasetError, match=r"bad\.zip:00000/img00000002\.png: damaged ZIP file \(bad CRC-32"):
        ImageFolderDataset(str(tmp_path / "bad.zip"))
    # The same damage inside a compressed (deflated) member's stream: a bad CRC-32 or no valid stream at all.
    with zipfile.ZipFile(tmp_path / "deflated.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i, image in enumerate(images):
            z.writestr(f"img{i}.png", _png_bytes(image))
        info = z.getinfo("img2.png")
    assert len(ImageFolderDataset(str(tmp_path / "deflated.zip"))) == 3
    data = bytearray((tmp_path / "deflated.zip").read_bytes())
    for flip in (0x01, 0xFF):
        damaged = bytearray(data)
        damaged[info.header_offset + 30 + len("img2.png") + info.compress_size // 2] ^= flip
        with open(tmp_path / "bad2.zip", "wb") as f:
            f.write(bytes(damaged))
        with pytest.raises(DatasetError, match=r"bad2\.zip:img2\.png: damaged ZIP file \(bad CRC-32 or size"):
            ImageFolderDataset(str(tmp_path / "bad2.zip"))


def test_zip_bombs_are_refused_before_they_are_read(tmp_path):
    # A valid PNG followed by 256 MB of zeros, deflated to a few hundred KB: refused from its declared sizes, in the
    # training/metrics reader and in dataset_tool.py, before anything is inflated.
    import resource

    from training.dataset_tool_lib import DatasetToolError, open_image_zip

    images = _images(2)
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("img0.png", _png_bytes(images[0]))
        with z.open("img1.png", "w", force_zip64=True) as member:
            member.write(_png_bytes(images[1]))
            for _ in range(16):
                member.write(bytes(16 << 20))
    assert path.stat().st_size < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = r"bomb\.zip:img1\.png: inflates from [\d,]+ to 268,435,\d{3} bytes \(more than 200x\)"
    with pytest.raises(DatasetError, match=message):
        ImageFolderDataset(str(path))
    with pytest.raises(DatasetToolError, match=message):
        list(open_image_zip(str(path)).images)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 128 << 10  # KiB: nothing inflated


def test_only_the_selected_subset_is_verified(tmp_path):
    folder = _make_folder(tmp_path / "d", _images(6))
    unused = sorted(set(range(1, 6)) - set(ImageFolderDataset(folder, max_size=3)._raw_idx.tolist()))[0]
    open(os.path.join(folder, f"img{unused:03d}.png"), "wb").close()
    with pytest.raises(DatasetError, match=rf"img{unused:03d}\.png: cannot decode image"):
        ImageFolderDataset(folder)
    assert len(ImageFolderDataset(folder, max_size=3)) == 3


@pytest.mark.parametrize("label, message", [
    (1000000000, r"label of 'img001\.png' is 1000000000; class labels must be integers in 0\.\.65535"),
    (1e9, r"label of 'img001\.png' is 1000000000\.0; class labels must be integers in 0\.\.65535"),
    (-3, r"label of 'img001\.png' is -3; class labels must be integers"),
    (2.7, r"label of 'img001\.png' is 2\.7; class labels must be integers"),
    ("cat", r"labels must all be integers \(class indices\) or all be float vectors"),
])
def test_bad_class_labels_fail_when_opening(tmp_path, label, message):
    folder = _make_folder(tmp_path / "d", _images(3), labels=[0, label, 1])
    with pytest.raises(DatasetError, match=r"dataset\.json: " + message):
        ImageFolderDataset(folder, use_labels=True)
    assert len(ImageFolderDataset(folder, use_labels=False)) == 3  # labels not asked for: not read


def test_label_edge_cases(tmp_path):
    ds = ImageFolderDataset(_make_folder(tmp_path / "a", _images(2), labels=[0.0, 65535]), use_labels=True)
    assert ds.label_dim == 65536 and ds.get_label(0).argmax() == 0
    folder = _make_folder(tmp_path / "b", _images(2), labels=[[0.5, float("nan")], [1.0, 2.0]])
    with pytest.raises(DatasetError, match=r"label of 'img000\.png' is \[0\.5, nan\]; label vectors must be finite"):
        ImageFolderDataset(folder, use_labels=True)
    folder = _make_folder(tmp_path / "c", _images(2), labels=[0, 1])
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"labels": [["img000.png", 0], ["img001.png", 1], ["img000.png", 1]]}, f)
    with pytest.raises(DatasetError, match=r"dataset\.json: lists 'img000\.png' more than once"):
        ImageFolderDataset(folder, use_labels=True)


# ---------------------------------------------------------------------------------------------------------------------
# InfiniteSampler.


def _reference_stream(size, rank, num_replicas, seed, window_size, count):
    """EDM's algorithm written out step by step: one random draw per global index, numpy scalars."""
    order = np.arange(size)
    rnd = np.random.RandomState(seed)
    rnd.shuffle(order)
    window = int(np.rint(size * window_size))
    out, idx = [], 0
    while len(out) < count:
        i = idx % size
        if idx % num_replicas == rank:
            out.append(int(order[i]))
        if window >= 2:
            j = (i - rnd.randint(window)) % size
            order[i], order[j] = order[j], order[i]
        idx += 1
    return out


def _take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


@pytest.mark.parametrize("size,num_replicas,window_size", [(10, 1, 0.5), (7, 2, 0.5), (13, 3, 0.3), (5, 2, 0.0),
                                                           (50, 4, 1.0)])
def test_sampler_matches_edm_algorithm(size, num_replicas, window_size):
    for rank in range(num_replicas):
        got = _take(InfiniteSampler(range(size), rank, num_replicas, seed=3, window_size=window_size), 150)
        assert got == _reference_stream(size, rank, num_replicas, 3, window_size, 150)
        assert all(isinstance(x, int) for x in got)


def test_sampler_chunked_draws_cross_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(InfiniteSampler, "_CHUNK", 7)  # many numpy calls must give the same stream as one
    assert _take(InfiniteSampler(range(11), 1, 2, seed=5), 60) == _reference_stream(11, 1, 2, 5, 0.5, 60)


@pytest.mark.parametrize("start_idx", [0, 1, 9, 10, 11, 37])
def test_sampler_start_idx_continues_exactly(start_idx, monkeypatch):
    monkeypatch.setattr(InfiniteSampler, "_CHUNK", 16)
    for rank in range(3):
        full = _take(InfiniteSampler(range(10), rank, 3, seed=7), start_idx + 40)
        resumed = _take(InfiniteSampler(range(10), rank, 3, seed=7, start_idx=start_idx), 40)
        assert resumed == full[start_idx:]


def test_sampler_resumed_from_a_resume_point_continues_exactly(monkeypatch):
    """A resume point (global draw, order, generator state; every 16 draws here) taken by any rank's stream, saved
    and read back as a training state is, continues every rank's stream exactly from any later start_idx, over many
    passes through the dataset (a wrong order shows only after the next wrap-around); a point past start_idx or of
    another stream is passed over for the full replay."""
    monkeypatch.setattr(InfiniteSampler, "_CHUNK", 8)
    monkeypatch.setattr(InfiniteSampler, "RESUME_POINT_DRAWS", 16)
    monkeypatch.setattr(InfiniteSampler, "RESUME_POINTS_KEPT", 100)
    size, world = 37, 3
    recorder = InfiniteSampler(range(size), 1, world, seed=5)
    _take(recorder, 150)
    points = []
    for point in recorder._resume_points:
        buffer = io.BytesIO()
        torch.save(point, buffer)
        points.append(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert [point["draw"] for point in points] == list(range(1, 3 * 150, 16))[:len(points)] and len(points) > 20
    assert recorder.resume_point(100)["draw"] == 97 and recorder.resume_point(0) is None
    for rank in range(world):
        for start_idx in (0, 40, 77, 120):
            expected = _take(InfiniteSampler(range(size), rank, world, seed=5, start_idx=start_idx), 120)
            first = start_idx * world + rank
            for point in points[::3]:
                resumed = InfiniteSampler(range(size), rank, world, seed=5, start_idx=start_idx, resume_from=point)
                assert _take(resumed, 120) == expected, (rank, start_idx, point["draw"])
                assert (resumed._start(first, 18)[2] == point["draw"]) == (point["draw"] <= first)
    other = InfiniteSampler(range(size), 0, world, seed=6, start_idx=77, resume_from=points[3])  # another seed
    assert other._start(77 * world, 18)[2] == 0
    assert _take(other, 50) == _take(InfiniteSampler(range(size), 0, world, seed=6, start_idx=77), 50)


def test_sampler_ranks_partition_one_global_stream():
    """Rank r takes global draws r, r + world, ...; without the window the first pass is the seeded permutation.

    With the window (EDM's default) the first pass is not a permutation: early swaps wrap around to slots near the
    end that are not visited yet, so some images come twice before others come once (EDM behaves the same).
    """
    size, world = 23, 3
    shares = [len(range(r, size, world)) for r in range(world)]
    streams = [_take(InfiniteSampler(range(size), r, world, seed=1, window_size=0), 100) for r in range(world)]
    first = [s[:n] for s, n in zip(streams, shares)]
    assert sorted(sum(first, [])) == list(range(size))
    perm = np.arange(size)
    np.random.RandomState(1).shuffle(perm)
    assert first[1] == perm[1::world].tolist()

    streams = [_take(InfiniteSampler(range(size), r, world, seed=1), 100) for r in range(world)]
    single = _take(InfiniteSampler(range(size), 0, 1, seed=1), world * 100)
    for r in range(world):
        assert streams[r] == single[r::world][:100]
    assert len(set(single[:size])) < size  # the wrap-around described above


def test_sampler_without_shuffle_and_errors():
    assert _take(InfiniteSampler(range(4), 1, 2, shuffle=False), 5) == [1, 3, 1, 3, 1]
    assert _take(InfiniteSampler(range(4), 0, 1, shuffle=False, start_idx=3), 3) == [3, 0, 1]
    with pytest.raises(ValueError, match="dataset is empty"):
        InfiniteSampler([])
    with pytest.raises(ValueError, match="rank=2, num_replicas=2"):
        InfiniteSampler(range(3), rank=2, num_replicas=2)
    with pytest.raises(ValueError, match="window_size must be in"):
        InfiniteSampler(range(3), window_size=1.5)


def test_sampler_drives_a_dataloader(tmp_path):
    images = _images(5)
    ds = ImageFolderDataset(_make_zip(tmp_path / "d.zip", images))
    sampler = InfiniteSampler(ds, seed=2)
    loader = iter(torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=4))
    batch = torch.cat([next(loader)[0] for _ in range(3)]).numpy()
    expected = _reference_stream(5, 0, 1, 2, 0.5, 12)
    np.testing.assert_array_equal(batch, images[expected].transpose(0, 3, 1, 2))


def test_pyspng_path_keeps_pils_pixel_limit(monkeypatch):
    # pyspng (optional) decodes without PIL's decompression-bomb limit: a 57-byte PNG header can declare 10^10
    # pixels. The limit is checked from the IHDR chunk before pyspng sees the bytes.
    import struct
    import zlib

    from training import dataset

    calls = []

    class FakePyspng:
        @staticmethod
        def load(data):
            calls.append(len(data))
            return np.zeros([2, 3, 3], np.uint8)

    def png(width, height):
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"

    monkeypatch.setattr(dataset, "pyspng", FakePyspng)
    limit = 2 * PIL.Image.MAX_IMAGE_PIXELS
    with pytest.raises(dataset.DatasetError, match=rf"^big\.png: the PNG declares 100000x100000 = 10,000,000,000 "
                                                   rf"pixels, more than the {limit:,} allowed"):
        dataset.decode_image(png(100_000, 100_000), "big.png")
    assert calls == []
    assert dataset.decode_image(png(3, 2), "small.png").shape == (2, 3, 3) and len(calls) == 1
    side = int(limit ** 0.5)  # at the limit: decoded
    dataset.decode_image(png(side, side), "edge.png")
    assert len(calls) == 2
