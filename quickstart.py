"""The quick start: the whole pipeline on the built-in `digits` data set, offline, on CPU.

    dataset_tool.py (digits -> zip)  ->  train.py (small DDPM++, EDM loss)  ->  generate.py (Heun, 18 steps, grid)
    ->  evaluation (metrics.json): a Frechet distance in the feature space of a small digit classifier, with the same
        distance between two disjoint halves of the real data as its floor; and FID when the Inception detector is
        available (cached, or given with --inception).

Every step calls the project's own command-line tools, as a user would, and is skipped when its output already exists,
so running it again finishes an interrupted run (training resumes from its last state). Everything lands in --outdir.
training-run/quickstart.json records the settings that made the run: a rerun with other ones is refused, not scored
with the old network; samples/quickstart.json records the snapshot and steps that made the samples, which are
regenerated when either changes.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import click
import numpy as np
import torch

import dnnlib
from training import run_folder

ROOT = os.path.dirname(os.path.abspath(__file__))
SETTINGS_RECORD = "quickstart.json"  # in training-run/ and samples/: what made their contents
FID_RECORD = "fid-quickstart.json"  # in --outdir: what fid-ref.npz and fid.json were computed from
STOP_GRACE_S = 30  # after Ctrl-C or SIGTERM, how long a step may take to stop by itself (writing a training state)


class _Terminated(Exception):
    """SIGTERM reached quickstart while a step ran."""


def _raise_terminated(signum, frame):
    del signum, frame
    raise _Terminated


def _stop_step(proc: subprocess.Popen, forward: int | None) -> None:
    """Stop a running step: send it `forward` (None: it got the signal itself), give it STOP_GRACE_S to finish what it
    is writing, then SIGTERM (train.py takes it as a stop request unless it already has one; the other steps write
    atomically and just end), STOP_GRACE_S more, then SIGKILL. Ctrl-C or SIGTERM again moves to the next signal."""
    for signum in dict.fromkeys([forward, signal.SIGTERM]):
        if signum is not None and proc.poll() is None:
            proc.send_signal(signum)
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except (subprocess.TimeoutExpired, KeyboardInterrupt, _Terminated):
            pass
    proc.kill()
    proc.wait()


def _run(step: str, args: list[str]) -> None:
    """Run one of the project's CLIs in a subprocess, streaming its output; stop with its error on failure."""
    cmd = [sys.executable, *args]
    print(f"\n[quickstart] {step}: {' '.join(args)}", flush=True)
    with subprocess.Popen(cmd, cwd=ROOT) as proc:
        previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C went to the step as well (the terminal's whole foreground group): let it finish the file it may
            # be writing rather than leave a traceback and click's "Aborted!" here on top of its own.
            _stop_step(proc, forward=None)
            returncode = 130
        except _Terminated:
            # `kill PID` reaches this process alone: pass it on, or the step (train.py) would run on by itself. A job-
            # wide SIGTERM reaches the step twice, which train.py takes as one.
            _stop_step(proc, forward=signal.SIGTERM)
            returncode = 143
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
    # train.py stopped by Ctrl-C or SIGTERM (130, 143; it wrote a state) or a step killed by one: an interruption,
    # not a failure, also when this process did not see the signal itself (SIGINT ignored in a background job).
    if returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        print(f"\n[quickstart] interrupted during '{step}'; rerun the same command to resume (finished steps are "
              "skipped, training continues from its last state)", file=sys.stderr, flush=True)
        raise SystemExit(130 if returncode in (130, -signal.SIGINT) else 143)
    if returncode != 0:
        raise click.ClickException(f"step '{step}' failed (exit code {returncode}): {' '.join(cmd)}")


def _atomic_json(path: str, data: dict) -> None:
    with dnnlib.util.atomic_output(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _latest(folder: str, name_pattern: str) -> str | None:
    """The file of `folder` matching `name_pattern` (one *) with the largest kimg (run_folder.file_kimg). The folder is
    escaped: --outdir named like a sweep's (runs [lr=2e-4]) is a folder, not a glob pattern (unescaped, no state
    was found and the run was started over)."""
    # A copy kept under another name (training-state-best.pt) has no kimg: it is not one of the run's files.
    numbered = {path: kimg for path in glob.glob(os.path.join(glob.escape(folder), name_pattern))
                if (kimg := run_folder.file_kimg(path)) is not None}
    return max(numbered, key=numbered.get) if numbered else None


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _check_training_run(run_dir: str, settings: dict) -> None:
    """Refuse a training run made with other settings (scoring its network as if made with these would mislead);
    a run with nothing saved yet is simply started over."""
    if not os.path.isdir(run_dir):
        return
    saved = [name for name in os.listdir(run_dir) if name == "DONE" or re.fullmatch(r"training-state-\d+\.pt", name)]
    record = _read_json(os.path.join(run_dir, SETTINGS_RECORD))
    recorded = record.get("settings") if isinstance(record, dict) else None
    if recorded == settings:
        return
    if not saved:
        print(f"[quickstart] training: {run_dir} holds no training state yet, and no record of these settings: "
              "starting it over", flush=True)
        shutil.rmtree(run_dir)
        return
    if isinstance(recorded, dict):
        differ = [f"--{key} {recorded.get(key)} (now {settings.get(key)})"
                  for key in sorted(set(recorded) | set(settings)) if recorded.get(key) != settings.get(key)]
        what = "was trained with other settings: " + ", ".join(differ)
    else:
        what = "was made by an older quickstart that did not record its settings"
    raise click.ClickException(
        f"{run_dir} {what}. Its network would be sampled and scored as if trained with the current settings. Keep it "
        "and give the new settings another --outdir, or delete that training-run/ folder to retrain in this one "
        "(its samples and metrics are then redone as well).")


def _stage_samples(samples_dir: str, samples: int, dest: str) -> None:
    """Link seeds 0..samples-1 (the PNGs generate.py wrote for this run) into `dest`: PNGs left by an earlier run
    with more --samples stay in samples/ but are not evaluated."""
    from samplers.generation import image_path

    for name in [image_path("", seed) for seed in range(samples)] + ["generation.json"]:
        src = os.path.join(samples_dir, name)
        if not os.path.isfile(src):
            if name.endswith(".png"):
                raise click.ClickException(f"{src} is missing: the sampling step did not write every seed")
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        try:
            os.link(src, os.path.join(dest, name))
        except OSError:  # a file system without hard links
            shutil.copyfile(src, os.path.join(dest, name))


def _load_images(path: str) -> np.ndarray:
    """All images of a dataset zip or folder as uint8 [N, C, H, W]."""
    from training.dataset import ImageFolderDataset

    dataset = ImageFolderDataset(path)
    return np.stack([dataset[i][0] for i in range(len(dataset))])


def _frechet(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    from metrics.frechet import frechet_distance

    def stats(f):
        return f.mean(axis=0), np.cov(f, rowvar=False)

    return float(frechet_distance(*stats(feats_a), *stats(feats_b)))


def evaluate(dataset_zip: str, samples_dir: str, samples: int, classifier_path: str, seed: int,
             inception: str | None, outdir: str) -> dict:
    """The metrics JSON: classifier Frechet distance of the samples, the real-data floor, and FID when possible."""
    with tempfile.TemporaryDirectory(prefix="eval-samples-", dir=outdir) as staged:
        _stage_samples(samples_dir, samples, staged)
        return _evaluate(dataset_zip, staged, classifier_path, seed, inception, outdir)


def _evaluate(dataset_zip: str, samples_dir: str, classifier_path: str, seed: int, inception: str | None,
              outdir: str) -> dict:
    from metrics import digits_classifier as dc
    from metrics.detectors import DETECTORS

    model, info = dc.load_classifier(classifier_path)
    real = _load_images(dataset_zip)
    fake = _load_images(samples_dir)
    # Two disjoint halves of the real data; the samples are compared with the first half, at the same size, so the
    # floor and the sample distance share their finite-sample bias.
    order = np.random.RandomState(seed).permutation(len(real))
    half_a, half_b = real[order[: len(real) // 2]], real[order[len(real) // 2:]]
    num = min(len(fake), len(half_a), len(half_b))
    feats = {name: dc.extract_features(model, images[:num]) for name, images in
             [("real_a", half_a), ("real_b", half_b), ("samples", fake)]}
    with torch.no_grad():
        predicted = model(torch.as_tensor(fake[:num])).argmax(1).numpy()
    result = dict(
        classifier_frechet_distance=_frechet(feats["samples"], feats["real_a"]),
        classifier_frechet_distance_floor=_frechet(feats["real_b"], feats["real_a"]),
        classifier_frechet_note=("NOT FID: Frechet distance in the 64-d penultimate features of the project's digit "
                                 "classifier (metrics/digits_classifier.py); the floor is the same distance between "
                                 "two disjoint halves of the real digits."),
        num_images=int(num),
        classifier=dict(path=os.path.relpath(classifier_path, outdir), **info),
        sample_class_histogram=np.bincount(predicted, minlength=10).tolist(),
    )

    # Standard FID, only when the Inception detector is at hand (no download attempt from the quick start).
    from dnnlib import util

    detector = inception
    if detector is None:
        spec = DETECTORS["inception"]
        detector = next((p for p in map(util.cached_path, (spec.url, *spec.alternate_urls)) if p), None)
    if detector is None:
        result["fid"] = None
        result["fid_note"] = ("Inception detector not available offline; pass --inception PATH (inception-2015-12-05"
                              ".pkl) or place it in the dnnlib download cache to also report FID.")
    else:
        # Both passes are minutes on a CPU with the real Inception: each is skipped when what it was computed from
        # (recorded in FID_RECORD) is unchanged.
        ref = os.path.join(outdir, "fid-ref.npz")
        fid_json = os.path.join(outdir, "fid.json")
        record_path = os.path.join(outdir, FID_RECORD)
        recorded = _read_json(record_path) or {}
        detector_sha256 = util.file_sha256(detector)
        ref_inputs = dict(dataset_sha256=util.file_sha256(dataset_zip), detector_sha256=detector_sha256)
        if recorded.get("reference") == ref_inputs and os.path.isfile(ref):
            print("[quickstart] FID reference: fid-ref.npz is of this dataset and detector, skipping", flush=True)
        else:
            _run("FID reference", ["fid.py", "ref", "--data", dataset_zip, "--dest", ref, "--workers", "0",
                                   "--detector", f"inception={detector}"])
            recorded = dict(reference=ref_inputs)
            _atomic_json(record_path, recorded)
        fid_inputs = dict(samples_sha256=_folder_sha256(samples_dir), num=len(fake),
                          reference_sha256=util.file_sha256(ref), detector_sha256=detector_sha256)
        if recorded.get("fid") == fid_inputs and os.path.isfile(fid_json):
            print("[quickstart] FID: fid.json is of these samples, reference and detector, skipping", flush=True)
        else:
            _run("FID", ["fid.py", "calc", "--images", samples_dir, "--ref", ref, "--num", str(len(fake)),
                         "--workers", "0", "--detector", f"inception={detector}", "--out", fid_json])
            _atomic_json(record_path, dict(reference=ref_inputs, fid=fid_inputs))
        with open(fid_json) as f:
            record = json.load(f)
        result["fid"] = float(record["results"]["fid"])
        result["fid_note"] = f"FID with the standard Inception detector over {len(fake)} samples vs all real digits."
    return result


def _folder_sha256(folder: str) -> str:
    """One hash of every file under `folder`: names and contents, in sorted order."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode() + b"\0")
            digest.update(bytes.fromhex(dnnlib.util.file_sha256(path)))
    return digest.hexdigest()


def _int_list(value: str) -> str:
    """'1, 2,2' -> '1,2,2': one spelling per setting, so the recorded settings compare equal."""
    try:
        return ",".join(str(int(x)) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


@click.command(context_settings=dict(show_default=True))
@click.option("--outdir", default="quickstart-out", metavar="DIR", type=click.Path(file_okay=False),
              help="Everything goes here")
@click.option("--resolution", default=16, metavar="INT", type=click.IntRange(min=8),
              help="Image resolution (power of two)")
@click.option("--kimg", default=40, metavar="INT", type=click.IntRange(min=1),
              help="Training length (kimg; whole, as train.py names its snapshots)")
@click.option("--batch", default=64, metavar="INT", type=click.IntRange(min=1), help="Training batch size")
@click.option("--cbase", default=32, metavar="INT", type=click.IntRange(min=4), help="Network channel base")
@click.option("--cres", default="1,2,2", metavar="LIST", callback=lambda ctx, param, value: _int_list(value),
              help="Channel multipliers per resolution")
@click.option("--blocks", default=1, metavar="INT", type=click.IntRange(min=1), help="Residual blocks per resolution")
@click.option("--lr", default=2e-3, metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), help="Learning rate")
@click.option("--samples", default=898, metavar="INT", type=click.IntRange(min=2), help="Number of images to generate")
@click.option("--steps", default=18, metavar="INT", type=click.IntRange(min=2),
              help="Heun sampling steps (NFE = 2*steps - 1)")
@click.option("--classifier-epochs", default=30, metavar="INT", type=click.IntRange(min=1),
              help="Digit classifier training epochs")
@click.option("--inception", default=None, metavar="PATH", type=click.Path(dir_okay=False),
              help="Inception detector for FID")
@click.option("--seed", default=0, metavar="INT", type=int,
              help="Seed for training and the real-data splits (sampling always uses seeds 0..samples-1)")
@click.option("--device", metavar="DEVICE", default=None, help="cpu or cuda (default: cuda if available)")
def main(outdir, resolution, kimg, batch, cbase, cres, blocks, lr, samples, steps, classifier_epochs, inception,
         seed, device):
    """Build `digits`, train a small DDPM++ with the EDM loss, sample, and evaluate; print where the results are."""
    start = time.time()
    os.makedirs(outdir, exist_ok=True)
    # The steps run with the repository as their working directory: paths given relative to the user's must not be
    # read from there.
    outdir = os.path.abspath(outdir)
    inception = os.path.abspath(inception) if inception is not None else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset_zip = os.path.join(outdir, f"digits-{resolution}x{resolution}.zip")
    run_dir = os.path.join(outdir, "training-run")
    samples_dir = os.path.join(outdir, "samples")
    grid_png = os.path.join(outdir, "samples-grid.png")
    classifier_path = os.path.join(outdir, "digits_classifier.pt")
    metrics_json = os.path.join(outdir, "metrics.json")

    # What determines the trained network (not where, on what device, nor how often it logs and saves).
    settings = dict(resolution=resolution, kimg=kimg, batch=batch, cbase=cbase, cres=cres, blocks=blocks, lr=lr,
                    seed=seed)
    _check_training_run(run_dir, settings)

    # 1. Dataset.
    if not os.path.isfile(dataset_zip):
        _run("dataset", ["dataset_tool.py", "--source", "digits", "--dest", dataset_zip,
                         "--resolution", f"{resolution}x{resolution}"])
    else:
        print(f"[quickstart] dataset: {dataset_zip} exists, skipping")

    # 2. Training (resumes from the last state when a previous run was interrupted). A state every tick (5 kimg,
    # under a minute on 2 CPU cores; a dump takes 0.1 s) so that an interruption loses little; the last one is kept.
    done_marker = os.path.join(run_dir, "DONE")
    if not os.path.isfile(done_marker):
        train_args = ["train.py", "--outdir", run_dir, "--nosubdir", "--data", dataset_zip, "--cond", "0",
                      "--arch", "ddpmpp", "--precond", "edm", "--loss", "edm", "--batch", str(batch),
                      "--cbase", str(cbase), "--cres", cres, "--blocks", str(blocks), "--attn", str(resolution // 2),
                      "--duration", str(kimg / 1000), "--lr", str(lr), "--lr-rampup", "1", "--ema", "0.005",
                      "--dropout", "0", "--augment", "0", "--tick", "5", "--snap", "4", "--dump", "1",
                      "--seed", str(seed), "--workers", "0", "--device", device]
        state = _latest(run_dir, "training-state-*.pt")
        if state is not None:
            train_args += ["--resume", state]
        elif os.path.isdir(run_dir):
            print(f"[quickstart] training: {run_dir} stopped before its first training state (one every 5 kimg): "
                  "starting it over", flush=True)
            shutil.rmtree(run_dir)
        if state is None:
            os.makedirs(run_dir)
            _atomic_json(os.path.join(run_dir, SETTINGS_RECORD), dict(settings=settings, train_args=train_args))
        _run("training", train_args)
        # The states only serve a resume: keep the last (20 MB at the default size), not one per 5 kimg.
        final_state = _latest(run_dir, "training-state-*.pt")
        for path in glob.glob(os.path.join(glob.escape(run_dir), "training-state-*.pt")):
            if path != final_state:
                os.remove(path)
        open(done_marker, "w").close()
    else:
        print(f"[quickstart] training: {run_dir} is complete, skipping")
    snapshot = _latest(run_dir, "network-snapshot-*.pkl")
    if snapshot is None:
        raise click.ClickException(f"no network snapshot in {run_dir}")

    # The run at a glance: loss, loss by noise level, learning rate, non-finite steps.
    report_png = os.path.join(outdir, "training-report.png")
    _run("report", ["report.py", "--run", run_dir, "--out", report_png])

    # 3. Sampling (generate.py skips images that already exist; the grid shows training digits on the right).
    # Samples are cheap: when the snapshot or the steps differ from those that made samples/, regenerate them all
    # (generate.py would otherwise refuse the folder with advice meant for its own users).
    sampling_record = os.path.join(samples_dir, SETTINGS_RECORD)
    sampling = dict(snapshot=os.path.relpath(snapshot, outdir), snapshot_sha256=dnnlib.util.file_sha256(snapshot),
                    steps=steps)
    overwrite = os.path.isdir(samples_dir) and _read_json(sampling_record) != sampling
    if overwrite:
        print(f"[quickstart] sampling: {samples_dir} was made by another snapshot or --steps: regenerating it",
              flush=True)
    _run("sampling", ["generate.py", "--network", snapshot, "--outdir", samples_dir, "--seeds", f"0-{samples - 1}",
                      "--steps", str(steps), "--batch", "256", "--grid", grid_png, "--device", device]
         + (["--overwrite"] if overwrite else []))
    _atomic_json(sampling_record, sampling)

    # 4. Evaluation.
    if not os.path.isfile(classifier_path):
        _run("digit classifier", ["-m", "metrics.digits_classifier", "--out", classifier_path,
                                  "--epochs", str(classifier_epochs), "--seed", "0"])
    print("\n[quickstart] evaluation", flush=True)
    result = evaluate(dataset_zip, samples_dir, samples, classifier_path, seed, inception, outdir)
    result.update(snapshot=os.path.relpath(snapshot, outdir), sampler=dict(solver="heun", steps=steps,
                  nfe=2 * steps - 1), training_kimg=run_folder.file_kimg(snapshot), training_settings=settings,
                  total_seconds=round(time.time() - start, 1))
    _atomic_json(metrics_json, result)

    print(f"\n[quickstart] done in {result['total_seconds']:.0f} s. Results in {outdir}:")
    print(f"  dataset           {os.path.basename(dataset_zip)}")
    print(f"  training run      training-run/ (snapshot {os.path.basename(snapshot)}, stats.jsonl, log.txt)")
    print("  training report   training-report.png (loss, loss by noise level, learning rate)")
    print(f"  samples           samples/ ({samples} PNGs) and samples-grid.png")
    print("  metrics           metrics.json")
    print(f"  classifier Frechet distance (not FID): samples {result['classifier_frechet_distance']:.3f}, "
          f"real-data floor {result['classifier_frechet_distance_floor']:.3f}")
    fid = result["fid"]
    print(f"  FID: {fid:.3f}" if isinstance(fid, float) else f"  FID: not computed ({result['fid_note']})")


if __name__ == "__main__":
    dnnlib.util.run_cli(main)
