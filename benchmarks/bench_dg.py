"""Discriminator guidance on the quick start's digits: does guidance bring the samples closer to the data, how well
does the discriminator tell them apart by noise level, and what does a guided step cost?

    python benchmarks/bench_dg.py --outdir=bench-dg                       # trains what it needs (1-2 hours, 1 core)
    python benchmarks/bench_dg.py --outdir=bench-dg --measure=timing      # only the interleaved timing
    python benchmarks/bench_dg.py --outdir=bench-dg --network=quickstart-out/training-run/network-snapshot-000040.pkl
    python benchmarks/bench_dg.py --outdir=/tmp/dg-trial --kimg=1 --fakes=64 --epochs=1 --samples=10 --weights=2 \
        --sigmas=1 --repeats=1     # the pipeline end to end in minutes (its numbers mean nothing)

Steps (each skipped when its output exists, so a second run only measures): the digits dataset (16x16, 1,797
images); the quick start's network (DDPM++ 32 channels, EDM loss) trained for --kimg unless --network is given; the
fake set (generate.py, Heun 18 steps, seeds 0..N-1); the discriminator (train_dg.py on the network's own features,
--epochs, optionally --aot); the digit classifier of the quick start. Then, on seeds the discriminator never saw:
- the classifier Frechet distance (NOT FID: the 64-d features of metrics/digits_classifier.py) of unguided and
  guided samples at the same NFE (Heun, 18 steps, 35 NFE) for each weight in --weights (the reference's setting:
  the corrector unguided) and for w = 1 on both Heun evaluations, with the real-data floor (two halves), and how
  far guidance moved the samples (8-bit pixel change against the unguided samples of the same seeds);
- the discriminator's accuracy on real images and held-out generated ones at fixed noise levels;
- seconds per denoiser call, unguided and guided (w = 2: 15 discriminator forward and backward passes per image
  included), on one batch of 64, interleaved repeats (medians).
Runs at one thread by default (--threads), so numbers are comparable on a shared machine. Results: results.json.
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
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"\n[bench_dg] {step}: {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
    if result.returncode != 0:
        raise click.ClickException(f"step '{step}' failed (exit code {result.returncode})")


@click.command(context_settings=dict(show_default=True))
@click.option("--outdir", default="bench-dg", type=click.Path(file_okay=False), help="Everything goes here")
@click.option("--network", default=None, help="The score network (default: train the quick start's at --kimg)")
@click.option("--kimg", default=20.0, type=click.FloatRange(min=0, min_open=True), help="Training length if training")
@click.option("--epochs", default=60, type=click.IntRange(min=1),
              help="Discriminator epochs (on the digits it is at chance until about 40)")
@click.option("--fakes", "num_fakes", default=0, type=click.IntRange(min=0),
              help="Generated images the discriminator trains on (0: as many as real images, 1,797; fewer for a "
                   "quick trial: generating them is the long step)")
@click.option("--aot", default=0, type=click.IntRange(min=0), help="AOT pool size for the discriminator (0: off)")
@click.option("--width", default=128, type=click.IntRange(min=32), help="Discriminator head width")
@click.option("--weights", default="0.5,1,2,4", help="DG weights to measure (Heun's corrector unguided)")
@click.option("--samples", default=898, type=click.IntRange(min=10), help="Evaluation samples per setting")
@click.option("--sigmas", default="0.02,0.05,0.1,0.2,0.5,1,2,5,10", help="Noise levels of the accuracy table")
@click.option("--threads", default=1, type=click.IntRange(min=1), help="CPU threads")
@click.option("--measure", default="quality,accuracy,timing", help="What to measure (comma-separated)")
@click.option("--repeats", default=5, type=click.IntRange(min=1), help="Timing: interleaved repeats per setting")
def main(outdir, network, kimg, epochs, num_fakes, aot, width, weights, samples, sigmas, threads, measure, repeats):
    try:
        weight_list = [float(w) for w in weights.split(",")]
        sigma_list = [float(s) for s in sigmas.split(",")]
    except ValueError:
        raise click.BadParameter("comma-separated numbers expected", param_hint="--weights/--sigmas") from None
    torch.set_num_threads(threads)
    os.makedirs(outdir, exist_ok=True)
    outdir = os.path.abspath(outdir)
    dataset = os.path.join(outdir, "digits-16x16.zip")
    if not os.path.isfile(dataset):
        _run("dataset", ["dataset_tool.py", "--source", "digits", "--dest", dataset, "--resolution", "16x16"],
             threads)
    if network is None:
        run_dir = os.path.join(outdir, "training-run")
        try:
            claim_run(run_dir, dict(kimg=kimg))
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        network = latest(run_dir, "network-snapshot-", ".pkl")
        if network is None or not os.path.isfile(os.path.join(run_dir, "DONE")):
            _run("score network", ["train.py", "--outdir", run_dir, "--nosubdir", "--data", dataset, "--cond", "0",
                                   "--arch", "ddpmpp", "--precond", "edm", "--loss", "edm", "--batch", "64",
                                   "--cbase", "32", "--cres", "1,2,2", "--blocks", "1", "--attn", "8",
                                   "--duration", str(kimg / 1000), "--lr", "2e-3", "--lr-rampup", "1", "--ema",
                                   "0.005", "--dropout", "0", "--augment", "0", "--tick", "5", "--snap", "4",
                                   "--dump", "4", "--seed", "0", "--workers", "0", "--device", "cpu"]
                 + (["--resume", state] if (state := latest(run_dir, "training-state-", ".pt")) else []), threads)
            open(os.path.join(run_dir, "DONE"), "w").close()
            network = latest(run_dir, "network-snapshot-", ".pkl")
    from training.dataset import ImageFolderDataset
    num_real = len(ImageFolderDataset(dataset, verify=False))
    num_fakes = num_fakes or num_real
    tag = "" if num_fakes == num_real else f"-{num_fakes}"  # another fake set, another discriminator
    fakes = os.path.join(outdir, f"fakes{tag}")
    _run("fake set", ["generate.py", "--network", network, "--outdir", fakes, "--seeds", f"0-{num_fakes - 1}",
                      "--batch", "256", "--device", "cpu"], threads)
    dg_dir = os.path.join(outdir, f"dg-run{tag}{'-aot' + str(aot) if aot else ''}")
    dg_pkl = os.path.join(dg_dir, f"discriminator-{epochs:06d}.pkl")
    if not os.path.isfile(dg_pkl):
        _run("discriminator", ["train_dg.py", "train", "--real", dataset, "--fake", fakes, "--network", network,
                               "--outdir", dg_dir, "--epochs", str(epochs), "--aot", str(aot), "--width", str(width),
                               "--device", "cpu", "--resume", "auto"], threads)
    classifier_path = os.path.join(outdir, "digits_classifier.pt")
    if not os.path.isfile(classifier_path):
        _run("digit classifier", ["-m", "metrics.digits_classifier", "--out", classifier_path, "--epochs", "30"],
             threads)

    import training.snapshots
    from metrics import digits_classifier as dc
    from samplers import generation
    from samplers.dg.discriminator import load_discriminator
    from training import dg

    net = training.snapshots.load_snapshot(network, "cpu").net
    model, _ = dc.load_classifier(classifier_path)
    real = dg.load_image_set(dataset, use_labels=False).images
    order = np.random.RandomState(0).permutation(len(real))
    half_a, half_b = real[order[: len(real) // 2]], real[order[len(real) // 2:]]
    num = min(samples, len(half_a), len(half_b))
    feats_real = dc.extract_features(model, half_a[:num])
    floor = frechet(dc.extract_features(model, half_b[:num]), feats_real)
    seeds = list(range(100000, 100000 + num))  # never seen by the discriminator (its fakes are seeds 0..N-1)

    settings = [("unguided", {})] + [(f"w={w:g}", {"dg": dict(value=dg_pkl, weight=w)}) for w in weight_list]
    settings.append(("w=1, corrector w=1", {"dg": dict(value=dg_pkl, weight=1.0, weight_corrector=1.0)}))
    measure = set(measure.split(","))
    path = os.path.join(outdir, "results.json")
    result = json.load(open(path)) if os.path.isfile(path) else {}
    result.update(command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d"),
                  network=network, discriminator=dg_pkl, epochs=epochs, num_fakes=num_fakes, aot=aot, threads=threads,
                  num_images=num,
                  classifier_frechet_floor=round(floor, 4),
                  note="classifier Frechet distance: NOT FID (64-d features of metrics/digits_classifier.py)")
    held_out = None
    if "quality" in measure or "accuracy" in measure:
        rows = []
        for name, guidance in settings if "quality" in measure else settings[:1]:
            config = generation.SamplerConfig(num_steps=18, guidance=guidance)
            summary = generation.GRID_SAMPLING.describe(net, config)
            images = torch.cat([batch for _, batch in generation.generate_images(
                net, seeds, batch_size=256, device="cpu", num_steps=18, guidance=guidance)]).cpu()
            held_out = images if held_out is None else held_out
            distance = frechet(dc.extract_features(model, images), feats_real)
            # How far guidance moved the samples: 8-bit pixel change against the unguided images of the same seeds.
            change = (images.to(torch.int16) - held_out.to(torch.int16)).abs()
            rows.append(dict(setting=name, classifier_frechet_distance=round(distance, 4), sampler=summary,
                             pixel_change_vs_unguided=dict(mean=round(float(change.float().mean()), 4),
                                                           max=int(change.max()))))
            print(f"{name:22s} classifier FD {distance:8.4f} (floor {floor:.4f}); 8-bit pixel change vs unguided: "
                  f"mean {float(change.float().mean()):.4f}, max {int(change.max())}", flush=True)
        if "quality" in measure:
            result["settings"] = rows
    if "accuracy" in measure:
        disc = load_discriminator(dg_pkl)
        accuracy = dg.accuracy_by_noise_level(disc, real, held_out, sigma_list)
        for level, rates in accuracy.items():
            print(f"sigma {level:6g}: accuracy real {rates['real']:.3f}, generated {rates['fake']:.3f}, mean "
                  f"{rates['mean']:.3f}")
        result["accuracy_by_sigma"] = {str(k): v for k, v in accuracy.items()}
        result["training_stats"] = [json.loads(line) for line in open(os.path.join(dg_dir, dg.STATS_FILE))][-1]
    if "timing" in measure:
        # One batch of 64, unguided and guided (w = 2) alternately, so that load on a shared machine hits both.
        timed = {"unguided": {}, "guided": {"dg": dict(value=dg_pkl, weight=2.0)}}
        times = {name: [] for name in timed}
        for _ in range(repeats):
            for name, guidance in timed.items():
                start = time.perf_counter()
                generation.sample_seeds(net, seeds[:64], generation.SamplerConfig(num_steps=18, guidance=guidance),
                                        device="cpu")
                times[name].append(time.perf_counter() - start)
        median = {name: float(np.median(values)) for name, values in times.items()}
        result["timing"] = dict(batch=64, nfe=35, discriminator_gradient_evaluations=15, repeats=repeats,
                                seconds_per_batch={k: round(v, 3) for k, v in median.items()},
                                ms_per_denoiser_call={k: round(1e3 * v / 35, 2) for k, v in median.items()},
                                guided_over_unguided=round(median["guided"] / median["unguided"], 3),
                                seconds_all={k: [round(t, 3) for t in v] for k, v in times.items()})
        print(f"time per step (Heun, 35 NFE, batch 64): unguided {1e3 * median['unguided'] / 35:.1f} ms per call, "
              f"guided (w = 2, +15 discriminator passes) {1e3 * median['guided'] / 35:.1f} ms per call: x"
              f"{median['guided'] / median['unguided']:.2f}")
    from dnnlib import util
    with util.atomic_output(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n[bench_dg] results in {os.path.join(outdir, 'results.json')}")


if __name__ == "__main__":
    main()
