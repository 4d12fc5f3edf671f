"""Leftovers (issue point 5): temporary names identify their writer, the next run of the same command removes the
temporary files of dead writers (never those of live ones), and generate.py redoes an existing PNG that is empty or
truncated."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from dnnlib import util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _killed_writer(code: str) -> int:
    """Run `code` in a fresh Python that SIGKILLs itself where the code says `die()`; return its (now dead) pid."""
    prelude = "import os, signal, sys\nsys.path.insert(0, %r)\ndef die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.Popen([sys.executable, "-c", prelude % ROOT + code], stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -9, stderr
    return proc.pid


# ---------------------------------------------------------------------------------------------------------------------
# dnnlib.util: names, stale-file removal, atomic_output, check_output_path.


def test_temp_names_identify_the_writing_process(tmp_path):
    name = os.path.basename(util.temp_path(str(tmp_path / "out.json")))
    assert name.startswith(f"out.json.tmp-{util._host_tag()}-{os.getpid()}-") and len(name.rsplit("-", 1)[1]) == 8
    hidden = os.path.basename(util.temp_path(str(tmp_path / "000001.png"), hidden=True))
    assert hidden.startswith(".000001.png.tmp-") and util._TEMP_NAME_RE.search(hidden)
    assert not util.is_stale_temp_name(name)  # this process is alive


def test_a_killed_atomic_write_is_cleaned_by_the_next_write(tmp_path):
    target = tmp_path / "results.json"
    dead = _killed_writer(f"from dnnlib import util\nwith util.atomic_output({str(target)!r}, 'w') as f:\n"
                          f"    f.write('partial'); f.flush(); die()\n")
    (leftover,) = os.listdir(tmp_path)
    assert leftover.startswith(f"results.json.tmp-{util._host_tag()}-{dead}-")
    live = tmp_path / f"results.json.tmp-{util._host_tag()}-{os.getpid()}-0000aaaa"  # another writer, still running
    other_host = tmp_path / f"results.json.tmp-another.host-{dead}-0000bbbb"  # cannot be checked from here
    other_file = tmp_path / f"other.json.tmp-{util._host_tag()}-{dead}-0000cccc"  # not this output's
    for path in (live, other_host, other_file):
        path.write_text("x")

    with util.atomic_output(str(target), "w") as f:
        f.write("complete")
    assert sorted(os.listdir(tmp_path)) == sorted(["results.json", live.name, other_host.name, other_file.name])
    assert target.read_text() == "complete"
    assert util.remove_stale_temp_files(str(tmp_path)) == [str(other_file)]
    assert util.remove_stale_temp_files(str(tmp_path / "missing")) == []


def test_atomic_output_write_errors_name_the_file(tmp_path):
    import errno

    with pytest.raises(util.OutputPathError, match=r"^cannot write .*out\.bin \(No space left on device\)$"):
        with util.atomic_output(str(tmp_path / "out.bin")) as f:
            f.write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")  # what f.write raises on a full disk
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):  # an error of the block's own, reading another file: unchanged
        with util.atomic_output(str(tmp_path / "out.bin")):
            open(tmp_path / "missing.txt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("limit", [1000, 20000, 300000])
def test_torch_save_on_a_full_disk_is_an_error_naming_the_file(tmp_path, limit):
    """A training state (or teacher data, a DG state) written with torch.save on a full disk (here a file size limit:
    EFBIG): one OutputPathError naming the file, wherever the write fails. torch's zip writer, closed while the
    write error was raised, raised a RuntimeError ('unexpected pos 704 vs 598') over it, which train.py printed as a
    traceback, and ld3.py gen-data too."""
    code = (f"import resource, sys\nsys.path.insert(0, {ROOT!r})\nimport torch\n"
            f"from training.training_loop import save_training_state\nfrom dnnlib import util\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
            f"try:\n    save_training_state({str(tmp_path / 'training-state-000001.pt')!r}, "
            f"dict(weights=torch.zeros(100000)))\n"
            f"except util.OutputPathError as err:\n    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == f"cannot write {tmp_path / 'training-state-000001.pt'} (File too large)\n"
    assert os.listdir(tmp_path) == []


def test_check_output_path(tmp_path):
    util.check_output_path(str(tmp_path / "new" / "deeper" / "out.json"), "--out")  # created later by the writer
    util.check_output_path(str(tmp_path / "runs"), "--outdir", is_dir=True)
    assert os.listdir(tmp_path) == []  # nothing created, no probe left
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(util.OutputPathError, match=r"^--outdir: .*file\.txt exists and is not a folder$"):
        util.check_output_path(str(tmp_path / "file.txt"), "--outdir", is_dir=True)
    with pytest.raises(util.OutputPathError, match=r"^--out: .*tmp.* is a folder; expected a file name$"):
        util.check_output_path(str(tmp_path), "--out")
    with pytest.raises(util.OutputPathError, match=r"^--dest: cannot create .*file\.txt/a\.npz: .*file\.txt is a file"):
        util.check_output_path(str(tmp_path / "file.txt" / "a.npz"), "--dest")
    with pytest.raises(util.OutputPathError, match=r"^--out: expected a file path, got ''$"):
        util.check_output_path("", "--out")


def test_a_name_near_the_length_limit_is_written_and_its_killed_temp_removed(tmp_path):
    """A legal 240-byte --out (245 with '.json'; 'é' is 2 bytes, so a cut must not split it): the temporary name is
    cut to fit, where the full name plus '.tmp-<host>-<pid>-<hex>' failed with 'File name too long' after the work."""
    target = tmp_path / ("é" * 120 + ".json")
    assert len(os.fsencode(target.name)) == 245
    dead = _killed_writer(f"from dnnlib import util\nwith util.atomic_output({str(target)!r}, 'w') as f:\n"
                          f"    f.write('partial'); f.flush(); die()\n")
    (leftover,) = os.listdir(tmp_path)
    assert len(os.fsencode(leftover)) <= util.NAME_MAX and f"-{dead}-" in leftover
    util.check_output_path(str(target), "--out")
    with util.atomic_output(str(target), "w") as f:
        f.write("complete")
    assert os.listdir(tmp_path) == [target.name] and target.read_text() == "complete"
    hidden = os.path.basename(util.temp_path(str(target), hidden=True))
    assert hidden.startswith(".é") and len(os.fsencode(hidden)) <= util.NAME_MAX and util._TEMP_NAME_RE.search(hidden)
    too_long = str(tmp_path / ("x" * 256 + ".json"))
    with pytest.raises(util.OutputPathError, match=r"^--out: .*: the name x+\.\.\. is 261 bytes long; file systems "
                                                   r"take at most 255$"):
        util.check_output_path(too_long, "--out")


# ---------------------------------------------------------------------------------------------------------------------
# generate.py's PNGs (samplers.generation.write_images).


def _tiny_net():
    from training.preconditioning import EDMPrecond

    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=8,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return net.eval().requires_grad_(False)


SAMPLING = dict(batch_size=4, num_steps=2, solver="euler", device="cpu", progress=False)


def _digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("subdirs", [False, True])
def test_empty_or_truncated_pngs_are_regenerated_and_stale_temps_removed(tmp_path, subdirs):
    from samplers.generation import image_path, write_images

    net, seeds = _tiny_net(), [0, 1, 2, 3, 1005]
    clean = str(tmp_path / "clean")
    assert write_images(net, seeds, clean, subdirs=subdirs, **SAMPLING) == {"written": 5, "skipped": 0}

    out = str(tmp_path / "out")
    write_images(net, seeds, out, subdirs=subdirs, **SAMPLING)
    open(image_path(out, 1, subdirs), "wb").close()  # 0 bytes: e.g. the disk filled up
    with open(image_path(out, 2, subdirs), "r+b") as f:  # truncated: the image data is cut short
        f.truncate(os.path.getsize(image_path(out, 2, subdirs)) // 2)
    os.remove(image_path(out, 1005, subdirs))
    # A writer of seed 1005 killed mid-write, and one of seed 3 that is still running elsewhere (kept).
    dead = _killed_writer(
        "import PIL.Image\nfrom samplers import generation\n"
        "os.replace = lambda *args: die()\n"
        f"generation.save_png_atomic(PIL.Image.new('RGB', (8, 8)), {image_path(out, 1005, subdirs)!r})\n")
    folder_1005 = os.path.dirname(image_path(out, 1005, subdirs))
    stale = [name for name in os.listdir(folder_1005) if ".tmp-" in name]
    assert len(stale) == 1 and stale[0].startswith(f".001005.png.tmp-{util._host_tag()}-{dead}-")
    live = os.path.join(os.path.dirname(image_path(out, 3, subdirs)), f".000003.png.tmp-{util._host_tag()}-"
                                                                      f"{os.getpid()}-0000aaaa")
    open(live, "wb").close()

    assert write_images(net, seeds, out, subdirs=subdirs, **SAMPLING) == {"written": 3, "skipped": 2}
    os.remove(live)
    for folder in {os.path.dirname(image_path(out, s, subdirs)) for s in seeds}:
        clean_folder = folder.replace(out, clean)
        assert _digests(folder) == _digests(clean_folder)  # identical, nothing else (no temporary files)
    for seed in seeds:
        assert np.asarray(PIL.Image.open(image_path(out, seed, subdirs))).shape == (8, 8, 3)
