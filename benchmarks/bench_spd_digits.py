"""SPD vs its DDPM control on 16x16 digits: the classifier Frechet distance of the same small network trained with
`--loss=spd` (Sigma0 fitted to digits) and `--loss=ddpm` for the same kimg and seed, sampled by the all-T-steps
ancestral sampler and by the 35-NFE few-step sampler (DPM-Solver++(2M) per frequency, logsnr spacing).

    OMP_NUM_THREADS=1 python benchmarks/bench_spd_digits.py --outdir /tmp/spd-digits [--kimg 4] [--T 100] \
        [--samples 128] [--nfe 35] [--samplers dpmpp_2m,ancestral] [--threads 1] \
        [--json benchmarks/results/spd-digits.json]

Steps (each skipped when its output exists, so an interrupted run resumes): the digits dataset (dataset_tool.py
--source=digits, 16x16); the quick start's network (DDPM++, 32 channels, (1, 2, 2), one block, attention at 8;
batch 64, lr 2e-3, EMA 0.005 Mimg, seed 0) trained with --loss=spd --loss-opt fit=data and then with --loss=ddpm,
one after the other, both with --loss-opt T=<T>; the digit classifier (metrics/digits_classifier.py, 30 epochs);
then per run and sampler `--samples` images on fixed seeds (0..samples-1, the same latents for both runs) and their
classifier Frechet distance (NOT FID: the classifier's 64-d features) to one half of the real digits, with the
floor of the other half (as benchmarks/bench_dg.py). T: the reference's T = 4000 makes the all-steps ancestral
sampler cost 4000 network evaluations per image, beyond a CPU budget; a smaller T trains the same process on a
coarser grid of the same tau in (0, 1], and its ancestral sampler still runs all T steps.
The defaults are sized for a shared 2-core CPU: 4 kimg (train.py stops at the first tick end past it: 4032 images
= 63 steps of batch 64; each run's `trained_kimg` records it) and 128 images per setting (a small-sample Frechet
distance, biased upward, compared with a floor measured at the same count); the README reports the defaults with
--samples 512 (benchmarks/results/spd-digits.json). Results: <outdir>/results.json (and --json),
written after every setting.
"""

import json
import os
import subprocess
import sys
import time

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from digits_common import claim_run, frechet, latest  # noqa: E402  (benchmarks/, the script's folder)


def _run(step: str, args: list[str], threads: int) -> None:
    print(f"\n[bench_spd_digits] {step}: python {' '.join(args)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable] + args, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise click.ClickException(f"step '{step}' failed (exit code {result.returncode}; its error is above)")


def _check_T(ctx, param, T: int) -> int:
    """Both runs' processes must exist at this T before the first trains (the DDPM control's betas, scaled by
    1000 / T, leave (0, 1) for T <= 20: it failed after the SPD run had trained)."""
    from processes.spd import DDPMProcess, SPDProcess
    try:
        SPDProcess(T=T)
        DDPMProcess(T=T)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return T


def _trained_kimg(run_dir: str) -> float | None:
    """The kimg the run trained (train.py stops at the first tick end past --duration): its last stats line."""
    last = None
    for line in open(os.path.join(run_dir, "stats.jsonl")):
        if line.strip():
            last = line
    return round(json.loads(last)["Progress/kimg"]["mean"], 3) if last else None


def _atomic_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _sec_per_kimg(run_dir: str) -> float | None:
    """The median sec/kimg of the run's ticks after the first (log.txt)."""
    values = []
    for line in open(os.path.join(run_dir, "log.txt")):
        parts = line.split()
        if line.startswith("tick") and "sec/kimg" in parts and parts[1] != "0":
            values.append(float(parts[parts.index("sec/kimg") + 1]))
    return float(np.median(values)) if values else None


def _train(outdir: str, dataset: str, loss: str, kimg: float, T: int, threads: int) -> str:
    run_dir = os.path.join(outdir, f"run-{loss}")
    try:
        claim_run(run_dir, dict(loss=loss, T=T, kimg=kimg))
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if not os.path.isfile(os.path.join(run_dir, "DONE")):
        args = ["train.py", "--outdir", run_dir, "--nosubdir", "--data", dataset, "--cond", "0", "--arch", "ddpmpp",
                "--loss", loss, "--loss-opt", f"T={T}", "--batch", "64", "--cbase", "32", "--cres", "1,2,2",
                "--blocks", "1", "--attn", "8", "--duration", str(kimg / 1000), "--lr", "2e-3", "--lr-rampup", "1",
                "--ema", "0.005", "--dropout", "0", "--augment", "0", "--tick", "1", "--snap", "4", "--dump", "4",
                "--seed", "0", "--workers", "0", "--device", "cpu"]
        if loss == "spd":
            args += ["--loss-opt", "fit=data"]
        state = latest(run_dir, "training-state-", ".pt")
        if state is not None:
            args += ["--resume", state]
        _run(f"train --loss={loss}", args, threads)
        open(os.path.join(run_dir, "DONE"), "w").close()
    return run_dir


@click.command(context_settings=dict(show_default=True))
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Working folder (resumable)")
@click.option("--kimg", default=4.0, type=click.FloatRange(min=0, min_open=True), help="Training length per run")
@click.option("--T", "T", default=100, type=click.IntRange(min=2), callback=_check_T,
              help="The process's T (both runs; the DDPM control needs T > 20)")
@click.option("--samples", default=128, type=click.IntRange(min=10), help="Images per setting (at most 898)")
@click.option("--nfe", default=35, type=click.IntRange(min=2), help="Few-step sampler's NFE (dpmpp_2m: = steps)")
@click.option("--samplers", default="dpmpp_2m,ancestral", help="Which samplers, in this order (the cheap first)")
@click.option("--threads", default=1, type=click.IntRange(min=1), help="CPU threads")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write results here")
def main(outdir, kimg, T, samples, nfe, samplers, threads, json_out):
    settings = {"dpmpp_2m": (f"dpmpp_2m-{nfe}", "dpmpp_2m", nfe), "ancestral": ("ancestral", "ancestral", None)}
    unknown = [key for key in samplers.split(",") if key not in settings]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}: expected dpmpp_2m and/or ancestral",
                                 param_hint="--samplers")
    torch.set_num_threads(threads)
    os.makedirs(outdir, exist_ok=True)
    outdir = os.path.abspath(outdir)
    dataset = os.path.join(outdir, "digits-16x16.zip")
    if not os.path.isfile(dataset):
        _run("dataset", ["dataset_tool.py", "--source", "digits", "--dest", dataset, "--resolution", "16x16"],
             threads)
    runs = {loss: _train(outdir, dataset, loss, kimg, T, threads) for loss in ("spd", "ddpm")}
    classifier_path = os.path.join(outdir, "digits_classifier.pt")
    if not os.path.isfile(classifier_path):
        _run("digit classifier", ["-m", "metrics.digits_classifier", "--out", classifier_path, "--epochs", "30",
                                  "--seed", "0"], threads)

    import training.snapshots
    from metrics import digits_classifier as dc
    from samplers import generation
    from training import dg

    model, _ = dc.load_classifier(classifier_path)
    real = dg.load_image_set(dataset, use_labels=False).images
    order = np.random.RandomState(0).permutation(len(real))
    half_a, half_b = real[order[: len(real) // 2]], real[order[len(real) // 2:]]
    num = min(samples, len(half_a), len(half_b))
    feats_real = dc.extract_features(model, half_a[:num])
    floor = frechet(dc.extract_features(model, half_b[:num]), feats_real)
    path = os.path.join(outdir, "results.json")
    result = json.load(open(path)) if os.path.isfile(path) else {}
    same = (result.get("num_images"), result.get("T"), result.get("kimg")) == (num, T, kimg)
    rows = {(r["loss"], r["sampler"]): r for r in result.get("rows", [])} if same else {}  # else measured anew
    result.update(command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d"),
                  T=T, kimg=kimg, threads=threads, num_images=num, seeds=f"0-{num - 1}",
                  network="ddpmpp --cbase 32 --cres 1,2,2 --blocks 1 --attn 8 (1.26 M parameters), batch 64, "
                          "lr 2e-3, lr ramp 1 kimg, EMA 0.005 Mimg, seed 0, fp32, CPU",
                  classifier_frechet_floor=round(floor, 4),
                  note="classifier Frechet distance: NOT FID (64-d features of metrics/digits_classifier.py); "
                       "floor: the other half of the real digits, same count")
    snapshots = {}
    for loss, run_dir in runs.items():
        snapshot_path = latest(run_dir, "network-snapshot-", ".pkl")
        snapshots[loss] = training.snapshots.load_snapshot(snapshot_path, "cpu")
        options = json.load(open(os.path.join(run_dir, "training_options.json")))["loss_kwargs"]
        result.setdefault("runs", {})[loss] = dict(
            snapshot=snapshot_path, sec_per_kimg=round(_sec_per_kimg(run_dir) or 0, 1),
            trained_kimg=_trained_kimg(run_dir),
            loss_kwargs={k: v for k, v in options.items() if k != "class_name"})
    for key in samplers.split(","):
        name, solver, steps = settings[key]
        for loss, snapshot in snapshots.items():
            if (loss, name) in rows:
                continue
            sampling = snapshot.process.sampling
            config = generation.SamplerConfig(solver=solver, num_steps=steps)
            summary = sampling.describe(snapshot.net, config)
            start = time.time()
            images = torch.cat([imgs.cpu() for _, imgs in generation.generate_images(
                snapshot.net, list(range(num)), batch_size=256, solver=solver, num_steps=steps, device="cpu",
                sampling=sampling)]).numpy()
            seconds = time.time() - start
            distance = frechet(dc.extract_features(model, images), feats_real)
            rows[(loss, name)] = dict(loss=loss, sampler=name, classifier_frechet_distance=round(distance, 4),
                                      describe=summary, sample_seconds=round(seconds, 1))
            print(f"{loss:5s} {name:14s} classifier FD {distance:8.4f} (floor {floor:.4f}) [{seconds:.0f} s] "
                  f"{summary}", flush=True)
            result["rows"] = list(rows.values())
            _atomic_json(path, result)
            if json_out:
                _atomic_json(json_out, result)
    result["rows"] = list(rows.values())
    _atomic_json(path, result)
    if json_out:
        _atomic_json(json_out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
