"""Bad input to the CLIs: exit code != 0, exactly one "Error: ..." line naming the option or file, no traceback, and
nothing partial left behind. One table, one row per case.

Adding a case: add a row to CASES. `args` is the command line after the script name; in it, {out} is a fresh empty
folder that must still be empty afterwards (write every output of the case there), {ro} is a folder that cannot be
written (left empty), and every other {name} is an input prepared once by the `inputs` fixture below (add new ones
there). `message` is a regular expression searched in the single error line.
"""

import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Case:
    cli: str  # the script without .py: dataset_tool, fid, train, generate, phema, report
    args: str  # its arguments, with {fields} (see the module docstring)
    message: str  # regular expression that the one "Error: ..." line must match
    not_in_output: str = ""  # text that must not appear (work that must not have started), e.g. "Computing"
    fsize_limit: int | None = None  # run in a subprocess whose files cannot grow past this many bytes (a full disk)
    xfail: str = ""  # a known gap, with who fixes it; strict, so the fix makes the row fail until this is removed


FID_ARGS = "--workers 0 --detector inception={inception} --detector vgg16={vgg16}"

CASES = {
    # dataset_tool.py: labels (issue point 4) ...
    "dataset_tool-label-string": Case("dataset_tool", "--source {label_cat} --dest {out}/d.zip",
                                      r"label_cat/dataset\.json: label of 'b\.png' is \"cat\"; expected a class index"),
    "dataset_tool-label-fraction": Case("dataset_tool", "--source {label_fraction} --dest {out}/d.zip",
                                        r"label_fraction/dataset\.json: label of 'b\.png' is 2\.7; expected"),
    "dataset_tool-label-negative": Case("dataset_tool", "--source {label_negative} --dest {out}/d",
                                        r"label_negative/dataset\.json: label of 'b\.png' is -3; expected"),
    "dataset_tool-label-nan-vector": Case("dataset_tool", "--source {label_nan_vector} --dest {out}/d.zip",
                                          r"label_nan_vector/dataset\.json: label of 'b\.png' is \[NaN, 1\.0\]"),
    "dataset_tool-label-huge": Case("dataset_tool", "--source {label_huge} --dest {out}/d.zip",
                                    r"label_huge/dataset\.json: label of 'b\.png' is 1000000000\.0; expected a class "
                                    r"index, an integer in 0\.\.65535"),
    "dataset_tool-label-twice": Case("dataset_tool", "--source {label_twice} --dest {out}/d.zip",
                                     r"label_twice/dataset\.json: lists 'a\.png' more than once"),
    # ... and destinations (points 3 and 5).
    "dataset_tool-dest-read-only-zip": Case("dataset_tool", "--source {images} --dest {ro}/d.zip",
                                            r"^Error: --dest: cannot write to .*/ro \("),
    "dataset_tool-dest-read-only-folder": Case("dataset_tool", "--source {images} --dest {ro}/sub/d",
                                               r"^Error: --dest: cannot write to .*/ro \("),
    "dataset_tool-dest-below-a-file": Case("dataset_tool", "--source {images} --dest {a_file}/d.zip",
                                           r"^Error: --dest: cannot create .*a_file\.txt/d\.zip: .*a_file\.txt is a "
                                           r"file, not a folder"),
    "dataset_tool-dest-full": Case("dataset_tool", "--source {images} --dest {out}/d.zip",
                                   r"^Error: --dest .*/d\.zip: cannot write the dataset \(File too large\)$",
                                   fsize_limit=64 * 1024),
    "dataset_tool-dest-full-folder": Case("dataset_tool", "--source {images} --dest {out}/d",
                                          r"^Error: --dest .*/d: cannot write the dataset \(File too large\)$",
                                          fsize_limit=1000),
    # Datasets opened by train.py (point 3): checked when opened, before any training.
    "train-dataset-one-image-of-another-size": Case(
        "train", "--outdir {out} --data {odd_size} --device cpu --dry-run",
        r"^Error: Invalid value for --data: .*odd_size/img002\.png: image is 16x16 with 3 channel\(s\), but the "
        r"dataset's images are 8x8"),
    "train-dataset-only-image-not-square": Case(
        "train", "--outdir {out} --data {only_not_square} --device cpu --dry-run",
        r"^Error: Invalid value for --data: .*only_not_square: images are not square \(12x8, e\.g\. "
        r".*only_not_square/a\.png\)"),
    "train-dataset-bad-crc": Case("train", "--outdir {out} --data {bad_crc_zip} --device cpu --dry-run",
                                  r"^Error: Invalid value for --data: .*bad_crc\.zip:00000/img00000002\.png: damaged "
                                  r"ZIP file \(bad CRC-32"),
    "train-label-1e9-cond": Case("train", "--outdir {out} --data {huge_label_zip} --cond 1 --device cpu --dry-run",
                                 r"^Error: Invalid value for --data: .*huge_label\.zip:dataset\.json: label of "
                                 r"'00000/img00000001\.png' is 1000000000; class labels must be integers in "
                                 r"0\.\.65535"),
    # train.py options (point 3): every value checked before anything is created.
    "train-duration-nan": Case("train", "--outdir {out} --data {good_zip} --duration nan --device cpu",
                               r"^Error: Invalid value for '--duration'.*nan is not a finite number"),
    "train-duration-inf": Case("train", "--outdir {out} --data {good_zip} --duration inf --device cpu",
                               r"^Error: Invalid value for '--duration'.*inf is not a finite number"),
    "train-lr-nan": Case("train", "--outdir {out} --data {good_zip} --lr nan --device cpu",
                         r"^Error: Invalid value for '--lr'.*nan is not a finite number"),
    "train-dropout-nan": Case("train", "--outdir {out} --data {good_zip} --dropout nan --device cpu",
                              r"^Error: Invalid value for '--dropout'.*not a finite number"),
    "train-cres-empty": Case("train", "--outdir {out} --data {good_zip} --cres= --device cpu",
                             r"^Error: Invalid value for '--cres': expected a non-empty comma-separated list of "
                             r"positive integers, got ''"),
    "train-cres-zeros": Case("train", "--outdir {out} --data {good_zip} --cres 0,0 --device cpu",
                             r"^Error: Invalid value for '--cres': .*positive integers, got '0,0'"),
    "train-seed-negative": Case("train", "--outdir {out} --data {good_zip} --seed=-5 --device cpu",
                                r"^Error: Invalid value for '--seed': -5 is not in the range 0<=x<=2147483647"),
    "train-seed-too-large": Case("train", "--outdir {out} --data {good_zip} --seed 99999999999 --device cpu",
                                 r"^Error: Invalid value for '--seed': 99999999999 is not in the range"),
    "train-outdir-read-only": Case("train", "--outdir {ro}/runs --data {good_zip} --device cpu",
                                   r"^Error: --outdir: cannot write to .*/ro \("),
    "train-resume-empty": Case("train", "--outdir {out} --data {good_zip} --resume {state_empty} --device cpu",
                               r"^Error: Invalid value for --resume: .*empty/training-state-000001\.pt: not a readable "
                               r"training state"),
    "train-resume-text": Case("train", "--outdir {out} --data {good_zip} --resume {state_text} --device cpu",
                              r"^Error: Invalid value for --resume: .*text/training-state-000001\.pt: not a readable"),
    "train-resume-random": Case("train", "--outdir {out} --data {good_zip} --resume {state_random} --device cpu",
                                r"^Error: Invalid value for --resume: .*random/training-state-000001\.pt: not a "
                                r"readable"),
    "train-resume-truncated": Case("train", "--outdir {out} --data {good_zip} --resume {state_truncated} "
                                   "--device cpu", r"^Error: Invalid value for --resume: .*truncated/training-state-"
                                   r"000001\.pt: not a readable training state \(.*broken zip archive"),
    "train-resume-torchscript": Case("train", "--outdir {out} --data {good_zip} --resume {state_torchscript} "
                                     "--device cpu", r"^Error: Invalid value for --resume: .*refusing a TorchScript "
                                     r"archive"),
    "train-resume-hostile-edm-state": Case("train", "--outdir {out} --data {good_zip} --resume {state_hostile} "
                                           "--device cpu", r"^Error: Invalid value for --resume: .*hostile/training-"
                                           r"state-000001\.pt: a tensor storage in the pickle: refusing a TorchScript"),
    "train-transfer-hostile": Case("train", "--outdir {out} --data {good_zip} --transfer {pickle_hostile} --device cpu",
                                   r"^Error: Invalid value for --transfer: .*hostile\.pkl: a tensor storage in the "
                                   r"pickle: refusing a TorchScript archive"),
    # The same hostile pickle through the sampling CLIs (point 1): refused in one line, nothing runs.
    "generate-network-hostile": Case("generate", "--network {pickle_hostile} --outdir {out}/png --device cpu",
                                     r"^Error: .*hostile\.pkl: a tensor storage in the pickle: refusing a TorchScript"),
    "fid-network-hostile": Case("fid", f"calc --network {{pickle_hostile}} --ref {{ref}} --num-images 4 --device cpu "
                                f"{FID_ARGS}", r"^Error: .*hostile\.pkl: a tensor storage in the pickle: refusing a "
                                r"TorchScript", not_in_output="Computing"),
    "train-transfer-missing": Case("train", "--outdir {out} --data {good_zip} --transfer {out}/nope.pkl --device cpu",
                                   r"^Error: Invalid value for --transfer: .*nope\.pkl"),
    # fid.py: references (validated before the image pass) and outputs (checked before computing).
    "fid-ref-truncated": Case("fid", f"calc --images {{gen}} --ref {{ref_truncated}} --num 20 {FID_ARGS}",
                              r"^Error: cannot read reference statistics '.*truncated\.npz' \(truncated or damaged "
                              r"file\?\): BadZipFile", not_in_output="Computing"),
    "fid-ref-bit-flipped": Case("fid", f"calc --images {{gen}} --ref {{ref_flipped}} --num 20 {FID_ARGS}",
                                r"^Error: cannot read reference statistics '.*flipped\.npz' .*Bad CRC-32",
                                not_in_output="Computing"),
    "fid-ref-nan": Case("fid", f"calc --images {{gen}} --ref {{ref_nan}} --num 20 {FID_ARGS}",
                        r"^Error: reference statistics '.*nan\.npz': sigma has 1 non-finite value\(s\) \(NaN or inf\)",
                        not_in_output="Computing"),
    "fid-out-read-only": Case("fid", f"calc --images {{gen}} --ref {{ref}} --num 20 --out {{ro}}/r.json {FID_ARGS}",
                              r"^Error: --out: cannot write to .*/ro \(", not_in_output="Computing"),
    "fid-out-is-a-folder": Case("fid", f"calc --images {{gen}} --ref {{ref}} --num 20 --out {{out}} {FID_ARGS}",
                                r"^Error: --out: .*/out is a folder; expected a file name",
                                not_in_output="Computing"),
    "fid-out-full": Case("fid", f"calc --images {{gen}} --ref {{ref}} --num 20 --out {{out}}/r.json {FID_ARGS}",
                         r"^Error: cannot write .*/out/r\.json \(File too large\)$", fsize_limit=256),
    "fid-ref-dest-read-only": Case("fid", f"ref --data {{gen}} --dest {{ro}}/r.npz {FID_ARGS}",
                                   r"^Error: --dest: cannot write to .*/ro \(", not_in_output="Computing"),
    "fid-ref-dest-full": Case("fid", f"ref --data {{gen}} --dest {{out}}/r.npz {FID_ARGS}",
                              r"^Error: cannot write .*/out/r\.npz \(File too large\)$", fsize_limit=256),
    # An output named as an input (point 4): refused before the work, the input left as it was.
    "fid-out-is-the-ref": Case("fid", f"calc --images {{gen}} --ref {{ref}} --num 20 --out {{ref}} {FID_ARGS}",
                               r"^Error: --out .*ref\.npz is the --ref file, which the results would replace",
                               not_in_output="Computing"),
    "phema-out-a-run-file": Case("phema", "--run {out} --std 0.07 --out {out}/network-snapshot-000002.pkl",
                                 r"^Error: Invalid value for --out: .*network-snapshot-000002\.pkl: the name of a file "
                                 r"train\.py writes into its runs"),
    "report-out-not-png": Case("report", "--run {out} --out {out}/stats.jsonl",
                               r"^Error: Invalid value for --out: .*stats\.jsonl: expected a file name ending in "
                               r"\.png"),
    "fid-images-bad-crc": Case("fid", f"calc --images {{bad_crc_zip}} --ref {{ref}} --num 4 {FID_ARGS}",
                               r"^Error: .*bad_crc\.zip:00000/img00000002\.png: damaged ZIP file",
                               not_in_output="Computing"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Inputs, prepared once.


def _png(array) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="png")
    return buffer.getvalue()


def _folder(path, images: dict, labels=None) -> str:
    os.makedirs(path)
    for name, array in images.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(_png(array))
    if labels is not None:
        with open(os.path.join(path, "dataset.json"), "w") as f:
            json.dump({"labels": labels}, f)
    return str(path)


def _dataset_zip(path, images, labels=None) -> str:
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w") as z:
        for name, image in zip(names, images):
            z.writestr(name, _png(image))
        if labels is not None:
            z.writestr("dataset.json", json.dumps({"labels": [[n, label] for n, label in zip(names, labels)]}))
    return str(path)


def _flip_a_bit_in(path, payload: bytes, out_path) -> str:
    data = bytearray(open(path, "rb").read())
    data[bytes(data).index(payload) + len(payload) // 2] ^= 0x01
    with open(out_path, "wb") as f:
        f.write(bytes(data))
    return str(out_path)


def _read_only_folder(path) -> str | None:
    """A folder nobody can write: chmod, or for root (whom chmod does not stop) the immutable attribute."""
    os.makedirs(path)
    os.chmod(path, 0o555)
    probe = os.path.join(path, "probe")
    try:
        open(probe, "w").close()
    except OSError:
        return str(path)
    os.remove(probe)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return str(path)
    return None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from metrics import detectors as detectors_lib

    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    gray = {"a.png": np.zeros((4, 4), np.uint8), "b.png": np.ones((4, 4), np.uint8)}
    fields = dict(images=_folder(root / "images", {f"{i:02d}.png": rng.integers(0, 256, (32, 32, 3), np.uint8)
                                                   for i in range(40)}))
    for case, label in [("cat", "cat"), ("fraction", 2.7), ("negative", -3), ("nan_vector", [float("nan"), 1.0]),
                        ("huge", 1e9)]:
        fields[f"label_{case}"] = _folder(root / f"label_{case}", gray, [["a.png", 0], ["b.png", label]])
    fields["label_twice"] = _folder(root / "label_twice", gray, [["a.png", 0], ["b.png", 1], ["a.png", 1]])
    fields["a_file"] = str(root / "a_file.txt")
    open(fields["a_file"], "w").close()

    rgb8 = rng.integers(0, 256, (4, 8, 8, 3), np.uint8)
    fields["odd_size"] = _folder(root / "odd_size", {f"img{i:03d}.png": image for i, image in enumerate(rgb8)})
    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(fields["odd_size"], "img002.png"))
    fields["only_not_square"] = _folder(root / "only_not_square", {"a.png": np.zeros((8, 12, 3), np.uint8)})
    good_zip = _dataset_zip(root / "good.zip", rgb8)
    fields["bad_crc_zip"] = _flip_a_bit_in(good_zip, _png(rgb8[2]), root / "bad_crc.zip")
    fields["huge_label_zip"] = _dataset_zip(root / "huge_label.zip", rgb8[:2], labels=[0, 1000000000])

    fields["gen"] = _folder(root / "gen", {f"{i:06d}.png": image for i, image in
                                           enumerate(rng.integers(0, 256, (24, 12, 12, 3), np.uint8))})
    fields["inception"] = detectors_lib.save_standin(detectors_lib.StandinInception(), str(root / "inception.pt"))
    fields["vgg16"] = detectors_lib.save_standin(detectors_lib.StandinVGG16(), str(root / "vgg16.pt"))
    fields["ref"] = str(root / "ref.npz")
    np.savez(fields["ref"], mu=np.zeros(16), sigma=np.eye(16))
    good = open(fields["ref"], "rb").read()
    fields["ref_truncated"] = str(root / "truncated.npz")
    open(fields["ref_truncated"], "wb").write(good[: len(good) // 2])
    fields["ref_flipped"] = _flip_a_bit_in(fields["ref"], np.eye(16).tobytes(), root / "flipped.npz")
    sigma = np.eye(16)
    sigma[3, 3] = np.nan
    fields["ref_nan"] = str(root / "nan.npz")
    np.savez(fields["ref_nan"], mu=np.zeros(16), sigma=sigma)

    # Training states and pickles (train.py --resume / --transfer), hostile ones writing {marker} if loaded unsafely.
    import hostile_payloads as hostile
    fields["good_zip"] = good_zip
    marker = root / "PWNED"
    payload = hostile.torchscript_archive(marker)
    for kind, data in [("empty", b""), ("text", b"this is not a training state\n"),
                       ("random", rng.integers(0, 256, 4096, np.uint8).tobytes()), ("torchscript", payload),
                       ("hostile", hostile.training_state_with_storage(payload))]:
        os.makedirs(root / f"state_{kind}")
        fields[f"state_{kind}"] = str(root / f"state_{kind}" / "training-state-000001.pt")
        open(fields[f"state_{kind}"], "wb").write(data)
        if kind == "hostile":  # An EDM training state needs its snapshot beside it; give it one.
            open(root / f"state_{kind}" / "network-snapshot-000001.pkl", "wb").write(
                hostile.network_pickle_with_storage(payload))
    whole = io.BytesIO()
    torch.save({"networks": {}, "format": "x"}, whole)
    os.makedirs(root / "state_truncated")
    fields["state_truncated"] = str(root / "state_truncated" / "training-state-000001.pt")
    open(fields["state_truncated"], "wb").write(whole.getvalue()[: len(whole.getvalue()) // 2])
    fields["pickle_hostile"] = str(root / "hostile.pkl")
    open(fields["pickle_hostile"], "wb").write(hostile.network_pickle_with_storage(payload))
    fields["marker"] = str(marker)

    fields["ro"] = _read_only_folder(root / "ro")
    yield fields
    if fields["ro"] is not None:
        subprocess.run(["chattr", "-i", fields["ro"]], capture_output=True)
        os.chmod(fields["ro"], 0o755)


# ---------------------------------------------------------------------------------------------------------------------
# The test.


def _main(cli: str):
    """The click command of a CLI script, imported on first use."""
    import importlib

    return importlib.import_module(cli).main


def _run(case: Case, argv: list[str], tmp_path) -> tuple[int, str]:
    if case.fsize_limit is None:
        result = CliRunner().invoke(_main(case.cli), argv)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}\n{result.output}")
        return result.exit_code, result.output

    import resource

    def limit_file_size():  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize_limit, resource.RLIM_INFINITY))

    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{case.cli}.py"), *argv], capture_output=True,
                          text=True, cwd=tmp_path, env=env, preexec_fn=limit_file_size, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("case_id", [pytest.param(case_id, marks=pytest.mark.xfail(reason=case.xfail, strict=True))
                                     if case.xfail else case_id for case_id, case in CASES.items()])
def test_bad_input_gives_one_error_line_and_leaves_nothing(case_id, inputs, tmp_path):
    case = CASES[case_id]
    if "{ro}" in case.args and inputs["ro"] is None:
        pytest.skip("no read-only folder available (root without chattr)")
    out = tmp_path / "out"
    out.mkdir()
    argv = shlex.split(case.args.format(out=out, **inputs))
    exit_code, output = _run(case, argv, tmp_path)

    assert exit_code != 0, output
    assert "Traceback" not in output, output
    error_lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, output
    assert re.search(case.message, error_lines[0]), f"{error_lines[0]!r} does not match {case.message!r}"
    assert not case.not_in_output or case.not_in_output not in output, output
    assert os.listdir(out) == [], "partial output left behind"
    assert not os.path.exists(inputs["marker"]), "a hostile payload ran"
    if inputs["ro"] is not None:
        assert os.listdir(inputs["ro"]) == []


def test_the_table_covers_points_3_and_4():
    """The count the issue asks to report: bad-input cases tried (each row above is one)."""
    assert len(CASES) >= 20
