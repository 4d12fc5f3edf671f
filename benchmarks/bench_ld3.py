"""LD3 benchmark, run by hand (CPU is enough): held-out error of learned grids against EDM's rho = 7 grid and the
best hand-made grid, for LD3 as published and for this repository's guarded recipe, on closed-form testbeds.

Testbeds (samplers/gaussian_mixture.py): `gmm`, the Gaussian mixture of docs/solvers.md (d = 64, K = 16, power-law
variances; smooth, rare mode switches), and `points`, the ideal denoiser of 512 points in 64 dimensions with a
power-law spectrum (memorising: the posterior collapses onto one point). Teacher: UniPC-3 with 200 logSNR steps.
Noises: --train + --valid + --holdout teacher samples to learn from, then --test held-out noises that no recipe sees.
All grids end at sigma_min = 0.002 without a final denoise. Distance: L2 (the testbeds are vectors).

Recipes (LD3Config overrides; both use LD3's optimiser, 50 training and 50 validation samples by default):
- `ld3`: as published: logSNR start, its best grid on the (soft) validation loss, no held-out split.
- `ours`: this repository's defaults: start from the best hand-made grid, held-out samples (--holdout) decide.

Per cell: RMS error per coordinate vs the teacher on the test noises for rho = 7, the best hand-made grid on the test
noises (an oracle: no recipe can know it), and each recipe's result as a ratio to both; for `ours` also what
--min-gain-se 2 would have returned (same run, derived from the recorded held-out gain), the start, what was returned
and the test RMS of the learned candidate where the guard returned the hand-made grid.

    python benchmarks/bench_ld3.py [--testbeds gmm,points] [--solvers ipndm3,dpmpp_2m,unipc3] [--nfes 4,6,8,10]
                                   [--recipes ld3,ours] [--json out.json]
"""

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from samplers import SigmaGrid, ld3, make_grid, sample  # noqa: E402
from samplers.gaussian_mixture import GaussianMixture, PointSet  # noqa: E402
from samplers.ld3.selection import hand_made_grids  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SOLVER_CONFIGS = {
    "euler": ("euler", {}),
    "heun": ("heun", {}),
    "dpmpp_2m": ("dpmpp_2m", {}),
    "dpmpp_3m": ("dpmpp_3m", {}),
    "unipc3": ("unipc", {"order": 3, "variant": "bh1"}),
    "ipndm3": ("ipndm", {"max_order": 3}),
    "ipndm4": ("ipndm", {"max_order": 4}),
}
TESTBEDS = {"gmm": GaussianMixture, "points": PointSet}
RECIPES = {
    "ld3": dict(init="logsnr", guard=False, num_holdout=0),
    "ours": dict(),
}


def rms(denoiser, latents, targets, grid, solver, options) -> float:
    return float((sample(denoiser, latents, grid, solver=solver, **options) - targets).square().mean().sqrt())


@click.command()
@click.option("--testbeds", default="gmm,points", show_default=True, help="Comma-separated: gmm, points")
@click.option("--solvers", default="ipndm3,dpmpp_2m,unipc3", show_default=True, help="Comma-separated names")
@click.option("--nfes", default="4,6,8,10", show_default=True, help="Comma-separated NFE budgets")
@click.option("--recipes", default="ld3,ours", show_default=True, help="Comma-separated: ld3, ours")
@click.option("--train", "num_train", default=50, show_default=True, help="Teacher samples LD3 trains on")
@click.option("--valid", "num_valid", default=50, show_default=True, help="Teacher samples it validates on")
@click.option("--holdout", "num_holdout", default=500, show_default=True, help="Teacher samples only `ours` uses")
@click.option("--test", "num_test", default=1000, show_default=True, help="Fresh noises the table is measured on")
@click.option("--seed", default=0, show_default=True, help="Shuffling seed of LD3")
@click.option("--threads", default=1, show_default=True, help="CPU threads")
@click.option("--json", "json_path", default=None, help="Also write the results as JSON")
def main(testbeds, solvers, nfes, recipes, num_train, num_valid, num_holdout, num_test, seed, threads, json_path):
    torch.set_num_threads(threads)
    recipes = recipes.split(",")
    num_data = num_train + num_valid + num_holdout
    results = []
    run_start = time.time()
    for testbed in testbeds.split(","):
        denoiser = TESTBEDS[testbed]()
        latents = torch.randn(num_data + num_test, 64, generator=torch.Generator().manual_seed(123),
                              dtype=torch.float64)
        start = time.time()
        teacher_grid = make_grid("logsnr", 200, SIGMA_MIN, SIGMA_MAX, end="sigma_min")
        images = ld3.teacher_samples(denoiser, latents, teacher_grid, solver="unipc", batch_size=1000)
        print(f"{testbed}: teacher UniPC-3 bh1, 200 logSNR steps, {len(latents)} noises, {time.time() - start:.1f} s")
        data = ld3.TeacherData(latents=latents[:num_data], images=images[:num_data],
                               info={"sigmas": teacher_grid.sigmas.tolist()})
        test_latents, test_images = latents[num_data:], images[num_data:]
        print(f"{'testbed':8s} {'solver':9s} {'NFE':>3s} {'rho7':>7s}  {'best hand-made (test)':>24s}  "
              + "  ".join(f"{recipe + ' /rho7 /best':>17s}" for recipe in recipes)
              + "  2se/best  ours: start -> returned (learned candidate /best)")
        for name in solvers.split(","):
            solver, options = SOLVER_CONFIGS[name]
            for nfe in (int(n) for n in nfes.split(",")):
                if solver == "heun" and nfe % 2:
                    continue
                num_steps = ld3.steps_for_nfe(solver, nfe, "sigma_min")
                hand_made = {grid_name: rms(denoiser, test_latents, test_images,
                                            SigmaGrid(sigmas=levels, end="sigma_min"), solver, options)
                             for grid_name, levels in hand_made_grids(list(ld3.HAND_MADE_GRIDS), num_steps + 1,
                                                                      SIGMA_MIN, SIGMA_MAX, "sigma_min").items()}
                rho7 = hand_made["edm_rho7"]
                best = min(hand_made, key=hand_made.get)
                cell = dict(testbed=testbed, solver=name, nfe=nfe, rho7=rho7, hand_made=hand_made, best=best)
                texts = []
                for recipe in recipes:
                    config = ld3.LD3Config(solver=solver, nfe=nfe, solver_kwargs=options, end="sigma_min", loss="l2",
                                           num_train=num_train, num_valid=num_valid, seed=seed, **RECIPES[recipe])
                    result = ld3.train_ld3(denoiser, data, config)  # ld3: num_holdout=0, the first samples only
                    error = rms(denoiser, test_latents, test_images, result.grid, solver, options)
                    entry = dict(rms=error, vs_rho7=error / rho7, vs_best=error / hand_made[best], start=result.start,
                                 chosen=result.chosen, reason=result.reason, train_time_s=result.train_time_s,
                                 grid=result.sigmas.tolist(),
                                 eval_grid=None if result.eval_sigmas is None else result.eval_sigmas.tolist())
                    if result.learned_sigmas is not None:
                        learned = SigmaGrid(sigmas=result.learned_sigmas, end="sigma_min",
                                            eval_sigmas=result.learned_eval_sigmas)
                        entry["learned_candidate_rms"] = rms(denoiser, test_latents, test_images, learned, solver,
                                                             options)
                    record = result.provenance["result"]
                    entry.update(baseline=result.provenance["best_hand_made"]["name"], gain=record["gain"],
                                 gain_se=record["gain_se"])
                    if recipe == "ours":  # what --min-gain-se 2 would have returned: the same run, a stricter test
                        strict = result.chosen == "learned" and record["gain"] > 2 * record["gain_se"]
                        entry["strict_rms"] = error if strict or result.chosen != "learned" else \
                            hand_made[entry["baseline"]]
                    cell[recipe] = entry
                    texts.append(f"{error:7.4f} {entry['vs_rho7']:4.2f} {entry['vs_best']:4.2f}")
                line = (f"{testbed:8s} {name:9s} {nfe:3d} {rho7:7.4f}  {best:>16s} {hand_made[best]:7.4f}  "
                        + "  ".join(texts))
                if "ours" in cell:
                    ours = cell["ours"]
                    line += f"  {ours['strict_rms'] / hand_made[best]:4.2f}  {ours['start']} -> {ours['chosen']}"
                    if ours["chosen"] != "learned" and "learned_candidate_rms" in ours:
                        line += f" ({ours['learned_candidate_rms'] / hand_made[best]:.2f})"
                print(line, flush=True)
                results.append(cell)
                if json_path:  # after every cell (temp name + rename), so a cut-short run keeps what it measured
                    with open(json_path + ".tmp", "w") as f:
                        json.dump(dict(num_train=num_train, num_valid=num_valid, num_holdout=num_holdout,
                                       num_test=num_test, command=" ".join(sys.argv),
                                       wall_s=round(time.time() - run_start, 1), results=results), f, indent=1)
                    os.replace(json_path + ".tmp", json_path)


if __name__ == "__main__":
    main()
