"""LD3 benchmark, run by hand (CPU is enough): held-out global error with and without a learned grid, per solver and
NFE, on the closed-form Gaussian-mixture testbed of docs/solvers.md (d = 64, K = 16, power-law variances).

Teacher: UniPC-3 with 200 logSNR steps (close to the exact ODE). LD3 trains on --train noises, selects on --valid
noises (L2 loss, hard objective), and both grids are scored on --test held-out noises: RMS error per coordinate,
mode-switch rate (final component differs from the teacher's) and RMS within the same mode. All grids end at
sigma_min = 0.002 without a final denoise; Heun runs N = NFE / 2 steps (even NFE only).

    python benchmarks/bench_ld3.py [--solvers ipndm,dpmpp_2m] [--nfes 4,5,6,7,8,9,10] [--json out.json]
"""

import json
import math
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from samplers import ld3, make_grid, sample  # noqa: E402
from samplers.gaussian_mixture import GaussianMixture  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SOLVER_CONFIGS = {
    "euler": ("euler", {}),
    "heun": ("heun", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "unipc3_bh1": ("unipc", {"order": 3, "variant": "bh1"}),
    "ipndm3": ("ipndm", {"max_order": 3}),
    "ipndm4": ("ipndm", {"max_order": 4}),
}


def scores(gmm, outputs, targets, target_components) -> dict:
    same = gmm.component(outputs, SIGMA_MIN) == target_components
    err = (outputs - targets).square()
    return dict(rms=float(err.mean().sqrt()), switch_pct=100 * float(1 - same.double().mean()),
                within_rms=float(err[same].mean().sqrt()) if same.any() else math.nan)


@click.command()
@click.option("--solvers", default=",".join(SOLVER_CONFIGS), show_default=True, help="Comma-separated names")
@click.option("--nfes", default="4,5,6,7,8,9,10", show_default=True)
@click.option("--train", "num_train", default=500, show_default=True)
@click.option("--valid", "num_valid", default=1000, show_default=True)
@click.option("--test", "num_test", default=2000, show_default=True)
@click.option("--batch", "batch_size", default=50, show_default=True)
@click.option("--lr", "lr_logits", default=0.03, show_default=True)
@click.option("--init", default="edm", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Shuffling seed of LD3")
@click.option("--threads", default=1, show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the results as JSON")
def main(solvers, nfes, num_train, num_valid, num_test, batch_size, lr_logits, init, seed, threads, json_path):
    torch.set_num_threads(threads)
    gmm = GaussianMixture()
    latents = torch.randn(num_train + num_valid + num_test, 64, generator=torch.Generator().manual_seed(123),
                          dtype=torch.float64)
    start = time.time()
    teacher_grid = make_grid("logsnr", 200, SIGMA_MIN, SIGMA_MAX, end="sigma_min")
    images = ld3.teacher_samples(gmm, latents, teacher_grid, solver="unipc", batch_size=1000)
    print(f"teacher: UniPC-3 bh1, 200 logSNR steps, {len(latents)} noises, {time.time() - start:.1f} s")
    split = num_train + num_valid
    data = ld3.TeacherData(latents=latents[:split], images=images[:split],
                           info={"sigmas": teacher_grid.sigmas.tolist()})
    test_latents, test_images = latents[split:], images[split:]
    test_components = gmm.component(test_images, SIGMA_MIN)
    results = []
    print(f"{'solver':12s} {'NFE':>3s}  {'edm7 rms / switch % / within':>30s}  {'LD3 rms / switch % / within':>30s}"
          f"  {'ratio':>5s}  {'train s':>7s}")
    for name in solvers.split(","):
        solver, options = SOLVER_CONFIGS[name]
        for nfe in (int(n) for n in nfes.split(",")):
            if solver == "heun" and nfe % 2:
                continue
            num_steps = ld3.steps_for_nfe(solver, nfe, "sigma_min")
            baseline_grid = make_grid("edm", num_steps, SIGMA_MIN, SIGMA_MAX, end="sigma_min")
            baseline = scores(gmm, sample(gmm, test_latents, baseline_grid, solver=solver, **options), test_images,
                              test_components)
            config = ld3.LD3Config(solver=solver, nfe=nfe, solver_kwargs=options, end="sigma_min", loss="l2",
                                   num_train=num_train, num_valid=num_valid, batch_size=batch_size,
                                   lr_logits=lr_logits, init=init, prior_bound=0.0, seed=seed)
            try:
                result = ld3.train_ld3(gmm, data, config)
            except ValueError as err:  # e.g. too few levels to learn
                print(f"{name:12s} {nfe:3d}  skipped: {err}")
                continue
            learned = scores(gmm, sample(gmm, test_latents, result.grid, solver=solver, **options), test_images,
                             test_components)
            ratio = learned["rms"] / baseline["rms"]
            print(f"{name:12s} {nfe:3d}  {baseline['rms']:8.4f} / {baseline['switch_pct']:5.1f} / "
                  f"{baseline['within_rms']:7.4f}   {learned['rms']:8.4f} / {learned['switch_pct']:5.1f} / "
                  f"{learned['within_rms']:7.4f}   {ratio:5.2f}  {result.train_time_s:7.1f}", flush=True)
            results.append(dict(solver=name, nfe=nfe, edm7=baseline, ld3=learned, ratio=ratio,
                                train_time_s=result.train_time_s, grid=result.sigmas.tolist(),
                                eval_grid=None if result.eval_sigmas is None else result.eval_sigmas.tolist()))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(num_train=num_train, num_valid=num_valid, num_test=num_test, results=results), f, indent=1)


if __name__ == "__main__":
    main()
