"""Sampler benchmarks, run by hand (CPU is enough).

accuracy: global error of every solver x schedule at NFE 4, 5, 6, 8, 10 on the closed-form Gaussian-mixture testbed
of docs/solvers.md (d = 64, K = 16, power-law variances), against an RK4 reference in log sigma. All grids end at
sigma_min = 0.002 without a final denoise; Heun runs N = NFE / 2 steps (even NFE only).
overhead: wall time of a sampling run / time spent inside the network during it (and / (NFE x one standalone call)),
with a small EDMPrecond(SongUNet) on CPU.

    python benchmarks/bench_samplers.py accuracy [--noises 1000] [--json out.json]
    python benchmarks/bench_samplers.py overhead [--batch 8] [--repeats 5]
"""

import json
import math
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from samplers import count_nfe, make_grid, sample  # noqa: E402
from samplers.gaussian_mixture import GaussianMixture  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
NFES = (4, 5, 6, 8, 10)
SCHEDULE_NAMES = ("edm", "logsnr", "vp_time_uniform", "time_quadratic", "sigma_uniform")
SOLVER_CONFIGS = {
    "euler": ("euler", {}),
    "heun": ("heun", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "dpmpp_3m_exact": ("dpmpp_3m", {"exact_third_order": True}),
    "unipc3_bh1": ("unipc", {"order": 3, "variant": "bh1"}),
    "unipc3_bh2": ("unipc", {"order": 3, "variant": "bh2"}),
    "ipndm3": ("ipndm", {"max_order": 3}),
    "ipndm4": ("ipndm", {"max_order": 4}),
}


def rk4_reference(gmm, x, num_steps=600):
    """Classical RK4 in u = log sigma on dx/du = x - D(x; e^u), uniform in u from log sigma_max to log sigma_min."""
    u = torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), num_steps + 1, dtype=torch.float64).tolist()

    def f(x, u):
        return x - gmm(x, math.exp(u))

    for u0, u1 in zip(u[:-1], u[1:]):
        h = u1 - u0
        k1 = f(x, u0)
        k2 = f(x + 0.5 * h * k1, u0 + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, u0 + 0.5 * h)
        k4 = f(x + h * k3, u1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def errors(gmm, out, reference, reference_modes):
    per_sample = (out - reference).pow(2).mean(1).sqrt()
    same = gmm.component(out, SIGMA_MIN) == reference_modes
    within = per_sample[same].pow(2).mean().sqrt().item() if same.any() else float("nan")
    return {"rms": per_sample.pow(2).mean().sqrt().item(), "switch": 1 - same.double().mean().item(),
            "within": within}


@click.group()
def cli():
    """Sampler accuracy and overhead benchmarks."""


@cli.command()
@click.option("--noises", default=1000, show_default=True, help="Number of test noises")
@click.option("--reference-steps", default=600, show_default=True, help="RK4 steps of the reference")
@click.option("--json", "json_path", default=None, help="Also write all numbers to this JSON file")
def accuracy(noises, reference_steps, json_path):
    """RMS global error vs an RK4 reference for every solver x schedule x NFE."""
    torch.set_num_threads(1)
    gmm = GaussianMixture()
    latents = torch.randn(noises, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = time.perf_counter()
    reference = rk4_reference(gmm, latents * SIGMA_MAX, reference_steps)
    check = rk4_reference(gmm, latents[:100] * SIGMA_MAX, 2 * reference_steps)
    print(f"reference: RK4 {reference_steps} steps, {time.perf_counter() - start:.1f} s; "
          f"vs {2 * reference_steps} steps: rms {(check - reference[:100]).pow(2).mean().sqrt():.1e}; "
          f"data rms {reference.pow(2).mean().sqrt():.3f}")
    reference_modes = gmm.component(reference, SIGMA_MIN)
    results = {}
    for label, (solver, kwargs) in SOLVER_CONFIGS.items():
        for schedule in SCHEDULE_NAMES:
            for nfe in NFES:
                if solver == "heun" and nfe % 2:
                    continue
                num_steps = nfe // 2 if solver == "heun" else nfe
                grid = make_grid(schedule, num_steps, SIGMA_MIN, SIGMA_MAX, end="sigma_min")
                assert count_nfe(solver, num_steps, "sigma_min") == nfe
                out = sample(gmm, latents, grid, solver=solver, **kwargs)
                results[(label, schedule, nfe)] = errors(gmm, out, reference, reference_modes)
    print(f"all solvers: {time.perf_counter() - start:.1f} s\n")

    for schedule in SCHEDULE_NAMES:
        print(f"RMS global error, schedule {schedule}, {noises} noises (NFE columns)")
        print("| solver | " + " | ".join(str(n) for n in NFES) + " |")
        print("|---" * (len(NFES) + 1) + "|")
        for label in SOLVER_CONFIGS:
            cells = [f"{results[(label, schedule, n)]['rms']:.3f}" if (label, schedule, n) in results else "-"
                     for n in NFES]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()
    print("NFE 10: RMS / mode-switch % / within-mode RMS")
    print("| solver | " + " | ".join(SCHEDULE_NAMES) + " |")
    print("|---" * (len(SCHEDULE_NAMES) + 1) + "|")
    for label in SOLVER_CONFIGS:
        cells = []
        for schedule in SCHEDULE_NAMES:
            r = results[(label, schedule, 10)]
            cells.append(f"{r['rms']:.3f} / {100 * r['switch']:.1f} / {r['within']:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d"),
                           rows=[{"solver": k[0], "schedule": k[1], "nfe": k[2], **v} for k, v in results.items()]),
                      f, indent=1)


@cli.command()
@click.option("--batch", default=8, show_default=True, help="Batch size")
@click.option("--resolution", default=32, show_default=True, help="Image resolution")
@click.option("--channels", default=32, show_default=True, help="SongUNet model_channels")
@click.option("--repeats", default=5, show_default=True, help="Repeats (the minimum is reported)")
@click.option("--threads", default=1, show_default=True, help="torch intra-op threads")
def overhead(batch, resolution, channels, repeats, threads):
    """Sampling wall time / (NFE x one network call) for each solver, small real network on CPU."""
    from training.preconditioning import EDMPrecond

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=resolution, img_channels=3, model_type="SongUNet", model_channels=channels,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0).eval().requires_grad_(False)
    latents = torch.randn(batch, 3, resolution, resolution)
    x = latents.to(torch.float64) * 10
    sigma = torch.tensor(10.0, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3):
            net(x, sigma)
        call_times = []
        for _ in range(repeats * 10):
            t0 = time.perf_counter()
            net(x, sigma).to(torch.float64)
            call_times.append(time.perf_counter() - t0)
    t_call = min(call_times)
    print(f"network: {sum(p.numel() for p in net.parameters()):,} parameters, batch {batch}, {resolution}x"
          f"{resolution}; one call: min {1e3 * t_call:.2f} ms, median {1e3 * statistics.median(call_times):.2f} ms")
    print("| solver | steps | end | NFE | run (min) | inside the network | ratio (run / inside) | "
          "ratio (run / NFE x call) |")
    print("|---|---|---|---|---|---|---|---|")
    for solver, kwargs, steps, end in [("heun", {}, 18, "zero"), ("euler", {}, 10, "zero"),
                                       ("dpmpp_2m", {}, 10, "sigma_min"), ("dpmpp_3m", {}, 10, "sigma_min"),
                                       ("unipc", {"order": 3}, 10, "sigma_min"), ("ipndm", {}, 10, "sigma_min")]:
        grid = make_grid("edm", steps, end=end)
        nfe = count_nfe(solver, steps, end)
        runs = []
        with torch.no_grad():
            for _ in range(repeats):
                timed = TimedDenoiser(net)
                t0 = time.perf_counter()
                sample(timed, latents, grid, solver=solver, **kwargs)
                runs.append((time.perf_counter() - t0, timed.seconds))
        run, inside = min(runs)
        print(f"| {solver} | {steps} | {end} | {nfe} | {1e3 * run:.1f} ms | {1e3 * inside:.1f} ms | "
              f"{run / inside:.4f} | {run / (nfe * t_call):.3f} |")


class TimedDenoiser:
    """Accumulates the wall time spent inside the network, so overhead is measured within the same run (robust to
    other load on a shared machine)."""

    def __init__(self, net):
        self.net, self.seconds = net, 0.0

    def __call__(self, x, sigma, class_labels=None):
        t0 = time.perf_counter()
        out = self.net(x, sigma, class_labels)
        self.seconds += time.perf_counter() - t0
        return out


if __name__ == "__main__":
    cli()
