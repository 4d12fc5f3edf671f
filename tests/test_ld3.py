"""LD3 (samplers/ld3/, ld3.py): grid parameterisation, differentiating through the registered solvers, teacher data,
training on the closed-form Gaussian-mixture testbed, the safeguards (start from the best hand-made grid, never return
a worse one, held-out choice, the schedule file's record, ld3.py evaluate), and the gen-data -> train -> generate.py
--schedule path on a tiny network. LPIPS itself is tested in test_lpips.py."""

import glob
import math
import os
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import ld3 as ld3_cli
from samplers import ld3, load_schedule_file, make_grid, sample
from samplers.gaussian_mixture import GaussianMixture, PointSet
from torch_utils import persistence
from training.preconditioning import EDMPrecond


def edm_levels(num_levels, sigma_min=0.002, sigma_max=80.0):
    return make_grid("edm", num_levels - 1, sigma_min, sigma_max, end="sigma_min").sigmas


# ---------------------------------------------------------------------------------------------------------------
# The parameterisation.


@pytest.mark.parametrize("end", ["sigma_min", "zero"])
def test_grid_strictly_decreasing_for_any_logits(end):
    grid = ld3.GridParameterization(9, 0.002, 80.0, end=end)
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(8, generator=gen, dtype=torch.float64) * scale for scale in (0.1, 1, 10, 100)]
    cases += [torch.tensor([1e6, -1e6, 0, 0, 0, 0, 0, -1e6], dtype=torch.float64),  # softmax underflows
              torch.tensor([-800.0] * 7 + [800.0], dtype=torch.float64),
              torch.full([8], 1e300, dtype=torch.float64)]
    for logits in cases:
        for offsets in (torch.zeros(9), torch.randn(9, generator=gen) * 100, torch.full([9], -1e9)):
            with torch.no_grad():
                grid.logits.copy_(logits)
                grid.offsets.copy_(offsets)
                sigmas, eval_sigmas = grid()
            positive = sigmas[:-1] if end == "zero" else sigmas
            assert len(sigmas) == (10 if end == "zero" else 9)
            assert float(positive[0]) == 80.0 and float(positive[-1]) == 0.002  # endpoints exact
            assert (end == "zero") == (float(sigmas[-1]) == 0.0)
            for levels in (sigmas, eval_sigmas):
                assert torch.isfinite(levels).all() and (levels[1:] < levels[:-1]).all(), levels
            assert float(eval_sigmas[0]) == 80.0 and float(eval_sigmas[len(positive) - 1]) == 0.002
            # evaluation levels stay inside the window of eval_window x the neighbouring log-gaps
            u, u_eval = positive.log(), eval_sigmas[:len(positive)].log()
            shift = (u_eval - u)[1:-1]
            assert (shift <= 0.45 * (u[:-2] - u[1:-1]) + 1e-12).all()
            assert (shift >= -0.45 * (u[1:-1] - u[2:]) - 1e-12).all()


def test_grid_init_reproduces_schedule_and_matches_ld3_formula():
    target = edm_levels(7)
    grid = ld3.GridParameterization(7, 0.002, 80.0, init=target)
    sigmas, eval_sigmas = grid()
    assert torch.allclose(sigmas, target, rtol=1e-12, atol=0) and torch.equal(sigmas, eval_sigmas)
    # LD3's lambda mode with logits (p_0 arbitrary, p_1..p_N): lambda_k = lambda_min + c_k (lambda_max - lambda_min)
    logits = torch.tensor([0.3, -1.2, 0.5, 2.0, -0.7, 0.1], dtype=torch.float64)
    with torch.no_grad():
        grid.logits.copy_(logits)
    p = torch.softmax(torch.cat([torch.tensor([5.0], dtype=torch.float64), logits]), dim=0)
    c = torch.cumsum(p, 0)
    c = (c - c.min()) / (c.max() - c.min())
    lam = -math.log(80) + c * (-math.log(0.002) + math.log(80))
    assert torch.allclose(grid()[0], torch.exp(-lam), rtol=1e-4)  # MIN_STEP_FRACTION moves levels by ~1e-5


def test_steps_for_nfe():
    assert ld3.steps_for_nfe("heun", 35, "zero") == 18
    assert ld3.steps_for_nfe("heun", 6, "sigma_min") == 3
    assert ld3.steps_for_nfe("ipndm", 6, "sigma_min") == 6
    with pytest.raises(ValueError, match="cannot spend exactly 6 NFE"):
        ld3.steps_for_nfe("heun", 6, "zero")


def test_point_set_ideal_denoiser():
    """The point-set testbed's denoiser against the posterior mean computed from explicit differences."""
    points = PointSet(num_points=40, dim=6, seed=1)
    assert points.points.shape == (40, 6)
    assert float(points.points.square().mean().sqrt()) == pytest.approx(0.4, rel=0.25)  # data RMS 0.4 by design
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for sigma in (30.0, 1.0, 0.05):
        log_w = -(x[:, None, :] - points.points[None]).square().sum(-1) / (2 * sigma**2)
        expected = (torch.softmax(log_w, dim=1)[:, :, None] * points.points[None]).sum(1)
        assert torch.allclose(points(x, torch.tensor(sigma, dtype=torch.float64)), expected, rtol=1e-10, atol=1e-12)
    nearest = (x[:, None, :] - points.points[None]).square().sum(-1).argmin(1)
    assert torch.equal(points.component(x, 0.002), nearest)
    sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    points(x, sigma).sum().backward()
    assert sigma.grad is not None and torch.isfinite(sigma.grad)


def test_gaussian_mixture_denoiser_is_the_posterior_mean():
    """The mixture testbed's closed form against two independent computations: responsibilities from scipy's normal
    densities with each component's Wiener mean, and Tweedie's formula D = x + sigma^2 grad log p_sigma(x) by
    autograd of the noisy density written out (mean of the K components' normal densities)."""
    from scipy.stats import multivariate_normal
    mixture = GaussianMixture(dim=5, components=3, seed=2)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for sigma in (5.0, 0.5, 0.05):
        var = mixture.variances + sigma**2
        log_p = np.stack([multivariate_normal(mixture.means[k].numpy(), np.diag(var[k].numpy())).logpdf(x.numpy())
                          for k in range(3)], axis=1)
        resp = torch.from_numpy(np.exp(log_p - log_p.max(1, keepdims=True)))
        resp = resp / resp.sum(1, keepdim=True)
        wiener = mixture.means + mixture.variances / var * (x[:, None, :] - mixture.means)  # [B, K, d]
        expected = (resp[:, :, None] * wiener).sum(1)
        assert torch.allclose(mixture(x, sigma), expected, rtol=1e-10, atol=1e-12)

        xg = x.clone().requires_grad_(True)
        densities = torch.stack([torch.distributions.Normal(mixture.means[k], var[k].sqrt()).log_prob(xg).sum(-1)
                                 for k in range(3)], dim=1)
        torch.logsumexp(densities, dim=1).sum().backward()
        assert torch.allclose(mixture(x, sigma), x + sigma**2 * xg.grad, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------------
# Differentiating through the registered solvers.


def test_gradients_match_finite_differences():
    gmm = GaussianMixture(dim=8, components=3)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = sample(gmm, x, make_grid("logsnr", 40, 0.002, 80.0, end="sigma_min"), solver="dpmpp_3m")
    grid = ld3.GridParameterization(6, 0.002, 80.0, init=edm_levels(6))
    with torch.no_grad():
        grid.offsets.copy_(torch.tensor([0, 0.05, -0.1, 0.02, 0.03, 0]))

    def loss():
        sigmas, eval_sigmas = grid()
        return ld3.l2_distance(ld3.student_sample(gmm, x, sigmas, eval_sigmas, solver="unipc"), target).mean()

    loss().backward()
    for param, index in ((grid.logits, 2), (grid.offsets, 3)):
        with torch.no_grad():
            param[index] += 1e-6
            up = float(loss())
            param[index] -= 2e-6
            down = float(loss())
            param[index] += 1e-6
        numeric = (up - down) / 2e-6
        assert abs(float(param.grad[index]) - numeric) <= 1e-5 * abs(numeric) + 1e-10, (param.grad, numeric)
        assert numeric != 0


# ---------------------------------------------------------------------------------------------------------------
# Training on the Gaussian-mixture testbed.


@pytest.fixture(scope="module")
def mixture_problem():
    """Teacher: UniPC-3 with 100 logSNR steps (~1e-6 from the exact ODE); 2000 noises to learn from (500 train,
    1000 validation, 500 for the final choice: mode switches are ~1 % events, small splits cannot see them); 1500
    held out."""
    gmm = GaussianMixture()
    latents = torch.randn(3500, 64, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    teacher_grid = make_grid("logsnr", 100, 0.002, 80.0, end="sigma_min")
    images = ld3.teacher_samples(gmm, latents, teacher_grid, solver="unipc", batch_size=3500)
    data = ld3.TeacherData(latents=latents[:2000], images=images[:2000],
                           info={"sigmas": teacher_grid.sigmas.tolist()})
    return gmm, data, latents[2000:], images[2000:]


@pytest.fixture(scope="module")
def small_mixture():
    gmm = GaussianMixture()
    latents = torch.randn(40, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    teacher_grid = make_grid("logsnr", 40, 0.002, 80.0, end="sigma_min")
    images = ld3.teacher_samples(gmm, latents, teacher_grid, solver="unipc")
    return gmm, ld3.TeacherData(latents=latents, images=images, info={"sigmas": teacher_grid.sigmas.tolist()})


def held_out_rms(gmm, grid, solver, latents, images):
    return float((sample(gmm, latents, grid, solver=solver) - images).square().mean().sqrt())


@pytest.mark.slow
@pytest.mark.parametrize("nfe", [6, 10])
@pytest.mark.parametrize("solver", ["ipndm", "dpmpp_2m"])
def test_learned_grid_beats_edm_on_mixture(mixture_problem, solver, nfe):
    gmm, data, test_latents, test_images = mixture_problem
    config = ld3.LD3Config(solver=solver, nfe=nfe, loss="l2", **MIXTURE_CONFIG)
    result = ld3.train_ld3(gmm, data, config)
    assert result.train_time_s < 120
    hand_made = {name: held_out_rms(gmm, make_grid(schedule, nfe, 0.002, 80.0, end="sigma_min", **options), solver,
                                    test_latents, test_images)
                 for name, (schedule, options) in ld3.HAND_MADE_GRIDS.items()}
    best = min(hand_made, key=hand_made.get)
    learned = held_out_rms(gmm, result.grid, solver, test_latents, test_images)
    rho7 = hand_made["edm_rho7"]
    print(f"{solver} NFE {nfe}: held-out RMS edm7 {rho7:.4f}, best hand-made {best} {hand_made[best]:.4f}, LD3 "
          f"{learned:.4f} ({learned / rho7:.2f} / {learned / hand_made[best]:.2f}), started from {result.start}, "
          f"returned {result.chosen}, {result.train_time_s:.1f} s")
    assert learned <= hand_made[best], (learned, hand_made)
    if nfe <= 6:
        assert learned <= 0.7 * rho7, (learned, rho7)
    assert result.chosen == "learned" and result.valid_loss < result.init_valid_loss


# L2 on mode switches is a rare-event objective: larger batches and learning rate than LD3's CIFAR recipe (2, 5e-3),
# and the hard objective (a soft validation set hides switches).
MIXTURE_CONFIG = dict(num_train=500, num_valid=1000, batch_size=50, lr_logits=0.03, prior_bound=0.0)


def test_soft_bound_keeps_noises_in_ball_and_schedule_file_round_trips(small_mixture, tmp_path):
    gmm, data = small_mixture
    test_latents = data.latents[24:]
    config = ld3.LD3Config(solver="dpmpp_3m", nfe=5, loss="l1", num_train=12, num_valid=12, batch_size=4,
                           rounds_v1=1, rounds_v2=1, prior_bound=0.05, shift_lr=50.0, guard=False, init="logsnr")
    logged = []
    result = ld3.train_ld3(gmm, data, config, log=logged.append)
    rounds = [line for line in logged if line.startswith("LD3 round")]
    assert len(rounds) == 2 and "LD3 round 2/2 (v2)" in rounds[1]
    assert result.chosen == "learned" and "guard off" in result.reason
    assert [entry["phase"] for entry in result.history] == ["v1", "v2"]
    shifts = [entry["max_noise_shift"] for entry in result.history]
    assert 0 < max(shifts) <= 0.05 * (1 + 1e-9), shifts
    assert sum(entry["noises_moved_train"] for entry in result.history) > 0

    path = str(tmp_path / "dpmpp3m-nfe5.json")
    result.save(path)
    loaded = load_schedule_file(path)
    assert torch.equal(loaded.sigmas, result.sigmas) and loaded.end == "sigma_min" and loaded.solver == "dpmpp_3m"
    assert result.eval_sigmas is not None and torch.equal(loaded.eval_sigmas, result.eval_sigmas)
    assert loaded.provenance["loss"] == "l1" and loaded.provenance["num_train"] == 12
    assert len(loaded.provenance["history"]) == 2
    # the reloaded file samples bit-for-bit as the learned grid, and as the trained student up to rounding
    from_file = sample(gmm, test_latents, loaded, solver="dpmpp_3m")
    assert torch.equal(from_file, sample(gmm, test_latents, result.grid, solver="dpmpp_3m"))
    student = ld3.student_sample(gmm, test_latents, result.sigmas, result.eval_sigmas, solver="dpmpp_3m")
    assert torch.allclose(from_file, student, rtol=0, atol=1e-12)


def test_config_errors(small_mixture):
    gmm, data = small_mixture
    with pytest.raises(ValueError, match="fewer than --num-train"):
        ld3.train_ld3(gmm, data, ld3.LD3Config(loss="l2", num_train=30, num_valid=20))
    with pytest.raises(ValueError, match="at least 3"):
        ld3.train_ld3(gmm, data, ld3.LD3Config(solver="euler", nfe=2, loss="l2", num_train=4, num_valid=4))
    with pytest.raises(ValueError, match="does not take option"):
        ld3.train_ld3(gmm, data, ld3.LD3Config(solver="euler", nfe=4, loss="l2", num_train=4, num_valid=4,
                                                     solver_kwargs={"order": 2}))
    with pytest.raises(ValueError, match="S_churn"):
        ld3.student_sample(gmm, data.latents[:2], edm_levels(4), solver="heun", S_churn=10)
    # Option values the solver checks only when it runs are refused by validate(), before any network is loaded.
    with pytest.raises(ValueError, match="iPNDM max_order must be 1, 2, 3 or 4, got 7"):
        ld3.LD3Config(solver="ipndm", nfe=4, solver_kwargs={"max_order": 7}).validate()
    with pytest.raises(ValueError, match=r"deterministic sampler, but heun\(S_churn=1.0\) draws noise"):
        ld3.LD3Config(solver="heun", nfe=5, solver_kwargs={"S_churn": 1.0}).validate()


# ---------------------------------------------------------------------------------------------------------------
# The safeguards: start from the best hand-made grid, never return a worse one, say why, record it.


def test_hand_made_grids():
    for name, (schedule, options) in ld3.HAND_MADE_GRIDS.items():
        expected = make_grid(schedule, 6, 0.002, 80.0, end="sigma_min", **options).sigmas
        assert torch.equal(ld3.hand_made_levels(name, 7, 0.002, 80.0), expected)
    assert torch.equal(ld3.hand_made_levels("edm", 7, 0.002, 80.0), ld3.hand_made_levels("edm_rho7", 7, 0.002, 80.0))
    middle = ((80 ** 0.2 + 0.002 ** 0.2) / 2) ** 5  # Karras et al. eq. 5 at i / N = 1/2, rho = 5
    assert ld3.hand_made_levels("edm_rho5", 3, 0.002, 80.0).tolist() == pytest.approx([80, middle, 0.002], rel=1e-14)
    assert "sigma_uniform" in ld3.hand_made_grid_names() and "sigma_uniform" not in ld3.HAND_MADE_GRIDS
    with pytest.raises(ValueError, match="unknown grid 'rho7'"):
        ld3.hand_made_levels("rho7", 7, 0.002, 80.0)


def grid_score(values):
    values = torch.tensor(values, dtype=torch.float64)
    return ld3.GridScore(losses=values, squared_errors=values)


def test_paired_gain_and_the_final_choice():
    base, candidate = [1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 2.9, 4.2]
    gain, se = ld3.paired_gain(torch.tensor(base), torch.tensor(candidate))
    diffs = [b - c for b, c in zip(base, candidate)]
    mean = sum(diffs) / 4
    assert gain == pytest.approx(mean) and se == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3) / 2)

    valid_base, valid_learned = grid_score([1.0] * 8), grid_score([0.5] * 8)
    held_base = grid_score([1.0, 1.1, 0.9, 1.0] * 5)
    choice = ld3.choose_result("edm_rho7", valid_base, valid_learned, held_base, grid_score([0.5, 0.6, 0.4, 0.5] * 5))
    assert choice.chosen == "learned" and not choice.warning and choice.tested_on == "holdout"
    assert choice.gain == pytest.approx(0.5) and choice.gain_se == pytest.approx(0.0, abs=1e-12)
    # a held-out gain of 0.05 +- 0.22 is within its noise: the learned grid wins, with a warning; demanding 2 standard
    # errors keeps edm_rho7
    flat, noisy = grid_score([1.0] * 20), grid_score([0.0, 1.9] * 10)
    choice = ld3.choose_result("edm_rho7", valid_base, valid_learned, flat, noisy)
    assert choice.chosen == "learned" and choice.warning and "within its noise (< 2 standard errors)" in choice.reason
    assert choice.gain == pytest.approx(0.05) and choice.gain_se == pytest.approx(0.975 / math.sqrt(20), rel=1e-3)
    choice = ld3.choose_result("edm_rho7", valid_base, valid_learned, flat, noisy, min_gain_se=2)
    assert choice.chosen == "edm_rho7" and choice.warning and "below the required 2 standard errors" in choice.reason
    # worse on the held-out samples, not better on validation, a tie at rounding level, never improved
    choice = ld3.choose_result("edm_rho7", valid_base, valid_learned, flat, grid_score([1.01] * 20))
    assert choice.chosen == "edm_rho7" and "not better on the 20 held-out samples" in choice.reason
    choice = ld3.choose_result("logsnr", valid_base, grid_score([1.0] * 8), flat, grid_score([0.1] * 20))
    assert choice.chosen == "logsnr" and "did not improve" in choice.reason and choice.gain is None
    tie = grid_score([1.0 - 1e-9] * 20)
    assert ld3.choose_result("logsnr", valid_base, valid_learned, flat, tie).chosen == "logsnr"
    assert ld3.choose_result("logsnr", valid_base, None, flat, None).chosen == "logsnr"
    # no held-out split: checked on validation, said to be biased
    choice = ld3.choose_result("logsnr", valid_base, valid_learned, None, None)
    assert choice.chosen == "learned" and choice.tested_on == "validation" and "biased" in choice.reason


def test_a_gain_on_one_sample_has_no_standard_error():
    # One sample says nothing of the noise. Its standard error was 0, so a learned grid better on the one held-out
    # sample passed --min-gain-se=2 as "inf standard errors", and was returned without a warning.
    gain, se = ld3.paired_gain(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64))
    assert gain == pytest.approx(1.0 - 0.9) and se == math.inf
    valid_base, valid_learned = grid_score([1.0] * 8), grid_score([0.5] * 8)
    choice = ld3.choose_result("edm_rho7", valid_base, valid_learned, grid_score([1.0]), grid_score([0.9]),
                               min_gain_se=2)
    assert choice.chosen == "edm_rho7" and choice.warning and "below the required 2 standard errors" in choice.reason
    assert "one sample: its standard error is unknown" in choice.reason
    choice = ld3.choose_result("edm_rho7", valid_base, valid_learned, grid_score([1.0]), grid_score([0.9]))
    assert choice.chosen == "learned" and choice.warning and "within its noise" in choice.reason
    # No held-out split and one validation sample: the same.
    choice = ld3.choose_result("edm_rho7", grid_score([1.0]), grid_score([0.5]), None, None)
    assert choice.chosen == "learned" and choice.warning and choice.tested_on == "validation"


def test_split_sizes_and_safeguard_options():
    config = ld3.LD3Config(num_train=10, num_valid=10)
    assert config.split_sizes(50) == (10, 10, 30, None)
    assert config.split_sizes(5000)[2] == 1000
    train, valid, holdout, note = config.split_sizes(20)
    assert (train, valid, holdout) == (10, 5, 5) and "the last 5 validation samples are held out" in note
    assert ld3.LD3Config(num_train=10, num_valid=10, guard=False).split_sizes(50) == (10, 10, 0, None)
    assert ld3.LD3Config(num_train=10, num_valid=10, num_holdout=7).split_sizes(50) == (10, 10, 7, None)
    with pytest.raises(ValueError, match=r"fewer than --num-train \+ --num-valid \+ --holdout = 10 \+ 10 \+ 40"):
        ld3.LD3Config(loss="l2", num_train=10, num_valid=10, num_holdout=40).validate(50)
    with pytest.raises(ValueError, match="init must be 'best' or a grid name"):
        ld3.LD3Config(loss="l2", init="rho7").validate()
    with pytest.raises(ValueError, match="candidates must be grid names"):
        ld3.LD3Config(loss="l2", candidates=("edm_rho7", "rho9")).validate()
    assert ld3.LD3Config(init="sigma_uniform", candidates=("logsnr",)).candidate_names() == ["logsnr", "sigma_uniform"]


@pytest.fixture(scope="module")
def seeded_mixture():
    """48 teacher samples of the mixture with seeds 100-147 (16 train, 16 validation, 16 held out)."""
    gmm = GaussianMixture()
    latents = torch.randn(48, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    teacher_grid = make_grid("logsnr", 40, 0.002, 80.0, end="sigma_min")
    images = ld3.teacher_samples(gmm, latents, teacher_grid, solver="unipc")
    return gmm, ld3.TeacherData(latents=latents, images=images, seeds=torch.arange(100, 148),
                                info={"sigmas": teacher_grid.sigmas.tolist()})


def l2_on(denoiser, grid, latents, images, solver):
    """Mean L2 distance to the teacher, computed here with samplers.sample (teacher samples are used in float32)."""
    return float(ld3.l2_distance(sample(denoiser, latents, grid, solver=solver), images.float()).mean())


def test_bad_start_still_returns_at_least_the_best_hand_made_grid(seeded_mixture, tmp_path):
    gmm, data = seeded_mixture
    config = ld3.LD3Config(solver="dpmpp_2m", nfe=5, loss="l2", num_train=16, num_valid=16, batch_size=4,
                           rounds_v1=1, rounds_v2=1, init="sigma_uniform")
    logged = []
    result = ld3.train_ld3(gmm, data, config, log=logged.append)
    assert result.start == "sigma_uniform"
    assert any(line.startswith("LD3: starting from sigma_uniform") for line in logged)
    assert any(line.startswith("LD3: returning the ") or line.startswith("LD3: Warning: returning the ")
               for line in logged)

    # Independently: every hand-made grid's loss on the samples LD3 did not train on (validation + held-out); the
    # result is at least as good as the best of them, and the bad start was far worse.
    valid, unseen = slice(16, 32), slice(16, 48)
    grids = {name: make_grid(schedule, 5, data.sigma_min, data.sigma_max, end="sigma_min", **options)  # as LD3
             for name, (schedule, options) in [*ld3.HAND_MADE_GRIDS.items(), ("sigma_uniform", ("sigma_uniform", {}))]}
    losses = {name: l2_on(gmm, grid, data.latents[unseen], data.images[unseen], "dpmpp_2m")
              for name, grid in grids.items()}
    best = min(ld3.HAND_MADE_GRIDS, key=losses.get)
    mine = l2_on(gmm, result.grid, data.latents[unseen], data.images[unseen], "dpmpp_2m")
    assert mine <= losses[best] * (1 + 1e-12), (mine, losses)
    assert losses["sigma_uniform"] > 2 * losses[best]
    assert result.provenance["best_hand_made"]["name"] == best
    if result.chosen != "learned":
        assert result.chosen == best and torch.equal(result.sigmas, grids[best].sigmas) and result.eval_sigmas is None

    # The schedule file records the start grid, the validation errors and the splits.
    path = str(tmp_path / "dpmpp2m-nfe5.json")
    result.save(path)
    record = load_schedule_file(path).provenance
    assert record["start"]["name"] == "sigma_uniform"
    assert record["start"]["sigmas"] == grids["sigma_uniform"].sigmas.tolist()
    for name, grid in grids.items():
        expected = l2_on(gmm, grid, data.latents[valid], data.images[valid], "dpmpp_2m")
        assert record["hand_made_valid_losses"][name] == pytest.approx(expected, rel=1e-12)
    assert record["start"]["valid_loss"] == pytest.approx(result.init_valid_loss, rel=1e-15)
    assert [entry["round"] for entry in record["history"]] == [1, 2]
    assert all(entry["best_grid_valid_loss"] > 0 for entry in record["history"])
    assert record["result"]["chosen"] == result.chosen and record["result"]["valid_loss"] == result.valid_loss
    assert record["result"]["valid_loss"] == pytest.approx(
        l2_on(gmm, result.grid, data.latents[valid], data.images[valid], "dpmpp_2m"), rel=1e-12)
    assert record["splits"] == {"train": {"first": 0, "count": 16, "seeds": "100-115"},
                                "valid": {"first": 16, "count": 16, "seeds": "116-131"},
                                "holdout": {"first": 32, "count": 16, "seeds": "132-147"}}
    assert record["num_holdout"] == 16 and record["guard"] is True and record["init"] == "sigma_uniform"


class PointMass:
    """The data is one point: D(x; sigma) = mu, and x(sigma) = mu + (x_0 - mu) sigma / sigma_0 exactly. Every solver
    here is exact for it (the data-prediction step x <- rho x + (1 - rho) D, Euler in sigma, Adams-Bashforth on the
    constant derivative), so every grid gives the teacher's result up to rounding: there is nothing to learn."""

    def __init__(self, dim=16):
        self.mu = torch.linspace(-1, 1, dim, dtype=torch.float64)

    def __call__(self, x, sigma, class_labels=None):
        return self.mu.expand_as(x)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "ipndm", "unipc"])
def test_nothing_to_learn_returns_the_start_and_says_so(solver):
    point = PointMass()
    latents = torch.randn(36, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    teacher_grid = make_grid("logsnr", 20, 0.002, 80.0, end="sigma_min")
    images = ld3.teacher_samples(point, latents, teacher_grid, solver="unipc")
    exact = point.mu + (80 * latents - point.mu) * (0.002 / 80)
    assert torch.allclose(images, exact, rtol=0, atol=1e-14)
    data = ld3.TeacherData(latents=latents, images=images, info={"sigmas": teacher_grid.sigmas.tolist()})
    config = ld3.LD3Config(solver=solver, nfe=5, loss="l2", num_train=12, num_valid=12, batch_size=4, rounds_v1=1,
                           rounds_v2=1)
    logged = []
    result = ld3.train_ld3(point, data, config, log=logged.append)
    valid_losses = result.provenance["hand_made_valid_losses"]
    assert max(valid_losses.values()) <= min(valid_losses.values()) * (1 + 1e-6)  # every grid ties
    assert result.chosen == result.start and result.eval_sigmas is None
    assert torch.equal(result.sigmas, ld3.hand_made_levels(result.start, 6, data.sigma_min, data.sigma_max))
    assert any(line.startswith(f"LD3: Warning: returning the hand-made grid {result.start}: ")
               or line.startswith(f"LD3: returning the hand-made grid {result.start}: ") for line in logged), logged
    assert any(reason in result.reason for reason in ("did not improve", "not better", "never improved"))


def test_evaluate_schedule_on_samples_it_did_not_see(seeded_mixture):
    gmm, data = seeded_mixture
    learned_on = ld3.selection.subset(data, torch.arange(24))  # seeds 100-123
    config = ld3.LD3Config(solver="unipc", nfe=5, loss="l2", num_train=8, num_valid=8, batch_size=4, rounds_v1=1,
                           rounds_v2=0)
    grid = ld3.train_ld3(gmm, learned_on, config).grid
    candidates = ("edm_rho7", "logsnr", "vp_time_uniform")
    report = ld3.evaluate_schedule(gmm, data, grid, distance_fn=ld3.l2_distance, candidates=candidates,
                                   batch_size=10, name="mine")
    assert report.num_samples == 24 and "24 of 48 teacher samples (the 24 the schedule was learned on" in report.note
    unseen_latents, unseen_images = data.latents[24:], data.images[24:]
    rows = {row.name: row for row in report.rows}
    assert report.rows[0].name == "mine" and set(rows) == {"mine", *candidates}
    expected = {name: l2_on(gmm, make_grid(*ld3.HAND_MADE_GRIDS[name][:1], 5, 0.002, 80.0, end="sigma_min",
                                           **ld3.HAND_MADE_GRIDS[name][1]), unseen_latents, unseen_images, "unipc")
                for name in candidates}
    expected["mine"] = l2_on(gmm, grid, unseen_latents, unseen_images, "unipc")
    for name, loss in expected.items():
        assert rows[name].loss == pytest.approx(loss, rel=1e-12)
        assert rows[name].rms == pytest.approx(math.sqrt(loss), rel=1e-12)  # L2 is the mean squared error
    assert report.best_hand_made == min(candidates, key=expected.get)
    assert rows["mine"].gain == pytest.approx(expected[report.best_hand_made] - expected["mine"], rel=1e-9)
    assert rows[report.best_hand_made].gain == 0

    with pytest.raises(ValueError, match="all 24 teacher samples were used to learn the schedule"):
        ld3.evaluate_schedule(gmm, learned_on, grid, distance_fn=ld3.l2_distance)
    unseeded = ld3.TeacherData(latents=data.latents, images=data.images, info=data.info)
    with pytest.raises(ValueError, match="holds no seeds"):
        ld3.evaluate_schedule(gmm, unseeded, grid, distance_fn=ld3.l2_distance)
    imported = make_grid("edm", 5, 0.002, 80.0, end="sigma_min")  # a grid without provenance: every sample counts
    imported.solver = "unipc"
    report = ld3.evaluate_schedule(gmm, data, imported, distance_fn=ld3.l2_distance, candidates=["edm_rho7"])
    assert report.num_samples == 48 and "does not say" in report.note and report.rows[0].gain == 0


# ---------------------------------------------------------------------------------------------------------------
# Teacher data and the command line, on a tiny network.


def tiny_net(label_dim=0):
    """EDMPrecond(SongUNet) 8x8x1 with slightly perturbed default weights (a non-trivial, smooth denoiser)."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=label_dim, model_type="SongUNet", model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def network_pickle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ld3net") / "network-snapshot-000000.pkl")
    persistence.save_network_pickle(path, dict(ema=tiny_net()))
    return path


def test_teacher_data_matches_generate_and_round_trips(tmp_path):
    net = tiny_net(label_dim=3)
    data = ld3.generate_teacher(net, [5, 6, 7], solver="unipc", num_steps=6, batch_size=2, network="net.pkl")
    from samplers.generation import SamplerConfig, sample_seeds
    expected = sample_seeds(net, [5, 6, 7], SamplerConfig(solver="unipc", num_steps=6), device="cpu")
    # per-seed noises as generate.py draws them; 1e-5: fp32 kernels round batches of 2 and 3 apart (1.5e-6, AVX-512)
    assert torch.allclose(data.images, expected.float(), atol=1e-5)
    assert data.class_labels.shape == (3, 3) and torch.equal(data.class_labels.sum(1), torch.ones(3))
    assert data.info["nfe"] == 6 and data.info["end"] == "sigma_min" and data.sigma_max == pytest.approx(80)
    path = str(tmp_path / "teacher.pt")
    ld3.save_teacher_data(path, data)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == ld3.TEACHER_FILE_FORMAT and raw["seeds"].tolist() == [5, 6, 7]
    loaded = ld3.load_teacher_data(path)
    assert torch.equal(loaded.latents, data.latents) and torch.equal(loaded.images, data.images)
    assert torch.equal(loaded.class_labels, data.class_labels) and loaded.info == data.info
    # a conditional student trains on the labels (one short round)
    config = ld3.LD3Config(solver="euler", nfe=4, loss="l2", num_train=2, num_valid=1, rounds_v1=1, rounds_v2=0)
    result = ld3.train_ld3(net, loaded, config)
    assert result.end == "zero" and len(result.sigmas) == 5 and float(result.sigmas[-1]) == 0
    torch.save({"format": "something else"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not LD3 teacher data"):
        ld3.load_teacher_data(str(tmp_path / "bad.pt"))
    with pytest.raises(FileNotFoundError, match="teacher data file not found"):
        ld3.load_teacher_data(str(tmp_path / "missing.pt"))


def read_pngs(outdir, seeds):
    return np.stack([np.asarray(PIL.Image.open(os.path.join(outdir, f"{s:06d}.png")), dtype=np.float64)
                     for s in seeds])


@pytest.mark.slow
def test_cli_gen_data_train_generate(network_pickle, tmp_path):
    runner = CliRunner()
    teacher = str(tmp_path / "teacher.pt")
    result = runner.invoke(ld3_cli.cli, ["gen-data", "--network", network_pickle, "--out", teacher, "--seeds", "0-31",
                                         "--batch", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "solver=unipc(" in result.output and "20 NFE per image" in result.output
    schedule = str(tmp_path / "dpmpp2m-nfe4.json")
    args = ["train", "--data", teacher, "--out", schedule, "--solver", "dpmpp_2m", "--nfe", "4", "--loss", "l2",
            "--num-train", "16", "--num-valid", "8", "--rounds-v1", "1", "--rounds-v2", "2", "--device", "cpu"]
    result = runner.invoke(ld3_cli.cli, args)
    assert result.exit_code == 0, result.output
    log = open(str(tmp_path / "dpmpp2m-nfe4.log.txt")).read()
    assert "LD3 round 3/3 (v2)" in log and "Training time:" in log
    grid = load_schedule_file(schedule)
    assert grid.solver == "dpmpp_2m" and grid.num_steps == 4 and grid.provenance["teacher"]["nfe"] == 20

    # held-out seeds: teacher, rho = 7 grid and learned grid through generate.py, all 4 vs 20 NFE
    seeds = "100-131"
    common = ["--network", network_pickle, "--seeds", seeds, "--device", "cpu"]
    for name, extra in (("teacher", ["--solver", "unipc", "--steps", "20"]),
                        ("edm", ["--solver", "dpmpp_2m", "--steps", "4"]), ("ld3", ["--schedule", schedule])):
        result = runner.invoke(generate.main, [*common, "--outdir", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    assert "solver=dpmpp_2m(" in result.output and "4 NFE per image" in result.output
    teacher_images = read_pngs(tmp_path / "teacher", range(100, 132))
    edm_error = np.sqrt(np.mean((read_pngs(tmp_path / "edm", range(100, 132)) - teacher_images) ** 2))
    ld3_error = np.sqrt(np.mean((read_pngs(tmp_path / "ld3", range(100, 132)) - teacher_images) ** 2))
    assert ld3_error < 0.7 * edm_error, (ld3_error, edm_error)

    # the grid is solver-specific: another solver is refused
    result = runner.invoke(generate.main, [*common, "--outdir", str(tmp_path / "x"), "--schedule", schedule,
                                           "--solver", "ipndm"])
    assert result.exit_code != 0 and "learned for solver 'dpmpp_2m'" in result.output


def test_cli_errors(network_pickle, tmp_path):
    runner = CliRunner()
    teacher = str(tmp_path / "teacher.pt")
    result = runner.invoke(ld3_cli.cli, ["gen-data", "--network", network_pickle, "--out", teacher, "--seeds", "0-3",
                                         "--steps", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    base = ["train", "--data", teacher, "--out", str(tmp_path / "s.json"), "--device", "cpu", "--num-train", "2",
            "--num-valid", "2"]
    result = runner.invoke(ld3_cli.cli, [*base, "--solver", "heun", "--nfe", "6"])
    assert result.exit_code != 0 and "cannot spend exactly 6 NFE" in result.output
    result = runner.invoke(ld3_cli.cli, [*base, "--solver", "ipndm", "--nfe", "4", "--num-train", "3"])
    assert result.exit_code != 0 and "fewer than --num-train" in result.output
    with mock.patch.object(ld3_cli, "load_network", side_effect=AssertionError("the network was loaded")):
        result = runner.invoke(ld3_cli.cli, [*base, "--solver", "ipndm", "--nfe", "4", "--order", "7"])
    assert result.exit_code == 2 and "iPNDM max_order must be 1, 2, 3 or 4, got 7" in result.output, result.output
    assert not glob.glob(str(tmp_path / "s.json*")), "a log or schedule was left"
    result = runner.invoke(ld3_cli.cli, [*base, "--solver", "ipndm", "--nfe", "4", "--order", "2", "--lpips-vgg",
                                     str(tmp_path / "none.pth")])
    assert result.exit_code != 0 and "could not fetch the LPIPS VGG16 weights" in result.output
    assert not os.path.exists(tmp_path / "s.json")
    result = runner.invoke(ld3_cli.cli, ["train", "--data", str(tmp_path / "missing.pt"), "--out", "x.json",
                                     "--solver", "euler", "--nfe", "4"])
    assert result.exit_code != 0 and "teacher data file not found" in result.output


def _teacher_and_test_data(network_pickle, tmp_path):
    """ld3.py gen-data of seeds 0-5 (teacher.pt) and 10-13 (test.pt), 4 steps: their paths."""
    paths = str(tmp_path / "teacher.pt"), str(tmp_path / "test.pt")
    for path, seeds in zip(paths, ("0-5", "10-13")):
        result = CliRunner().invoke(ld3_cli.cli, ["gen-data", "--network", network_pickle, "--out", path, "--seeds",
                                                  seeds, "--steps", "4", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    return paths


def test_cli_train_records_the_choice_and_evaluate_reports_on_unseen_seeds(network_pickle, tmp_path):
    runner = CliRunner()
    teacher, test_data = _teacher_and_test_data(network_pickle, tmp_path)
    schedule = str(tmp_path / "s.json")
    result = runner.invoke(ld3_cli.cli, ["train", "--data", teacher, "--out", schedule, "--solver", "dpmpp_2m",
                                         "--nfe", "3", "--loss", "l2", "--num-train", "2", "--num-valid", "2",
                                         "--rounds-v1", "1", "--rounds-v2", "0", "--candidates", "edm_rho7,logsnr",
                                         "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 train / 2 validation / 2 held-out samples" in result.output
    assert "hand-made grids on the 2 validation + 2 held-out samples (l2): edm_rho7 " in result.output
    assert "LD3: starting from " in result.output and "returning the " in result.output
    record = load_schedule_file(schedule).provenance
    assert record["splits"]["holdout"] == {"first": 4, "count": 2, "seeds": "4-5"}
    assert record["start"]["name"] in ("edm_rho7", "logsnr") and record["result"]["chosen"]

    evaluate = ["evaluate", "--schedule", schedule, "--device", "cpu", "--candidates",
                "edm_rho7,logsnr,vp_time_uniform"]
    result = runner.invoke(ld3_cli.cli, [*evaluate, "--data", teacher])
    assert result.exit_code != 0 and "all 6 teacher samples were used to learn the schedule" in result.output
    result = runner.invoke(ld3_cli.cli, [*evaluate, "--data", test_data])
    assert result.exit_code == 0, result.output
    assert "Held-out: 4 of 4 teacher samples (none was used to learn the schedule)" in result.output
    assert "; loss l2" in result.output and "s.json" in result.output and "(best)" in result.output
    assert "vp_time_uniform" in result.output and "on these 4 samples." in result.output
    result = runner.invoke(ld3_cli.cli, [*evaluate, "--data", str(tmp_path / "missing.pt")])
    assert result.exit_code != 0 and "teacher data file not found" in result.output
    result = runner.invoke(ld3_cli.cli, [*evaluate, "--data", test_data, "--solver", "ipndm"])
    assert result.exit_code != 0 and "learned for solver 'dpmpp_2m', not 'ipndm'" in result.output

    # LD3's own .pt vector records no solver: --solver names it; no splits recorded, so every sample counts
    grid = load_schedule_file(schedule)
    vector = str(tmp_path / "best_v2.pt")
    torch.save({"best_t_steps": torch.cat([grid.sigmas, grid.sigmas if grid.eval_sigmas is None else
                                           grid.eval_sigmas])}, vector)
    evaluate = ["evaluate", "--schedule", vector, "--data", test_data, "--device", "cpu", "--loss", "l2"]
    result = runner.invoke(ld3_cli.cli, evaluate)
    assert result.exit_code != 0 and "pass --solver" in result.output
    result = runner.invoke(ld3_cli.cli, [*evaluate, "--solver", "dpmpp_2m", "--network", network_pickle])
    assert result.exit_code == 0, result.output
    assert "does not say which teacher samples it was learned on: all samples used" in result.output


@pytest.mark.slow  # three fresh interpreters importing torch
def test_python_m_samplers_ld3_runs_from_any_directory(network_pickle, tmp_path):
    """`python -m samplers.ld3` from a folder outside the repository (the repository on PYTHONPATH: Python must find
    the package) writes relative paths there; `python REPO/ld3.py` needs nothing."""
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(network_pickle, elsewhere / "net.pkl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = subprocess.run([sys.executable, "-m", "samplers.ld3", "gen-data", "--network", "net.pkl", "--out",
                             "teacher.pt", "--seeds", "0-1", "--steps", "2", "--device", "cpu"], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ld3.load_teacher_data(str(elsewhere / "teacher.pt")).seeds.tolist() == [0, 1]
    result = subprocess.run([sys.executable, "-m", "samplers.ld3", "train", "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: python -m samplers.ld3 train" in result.stdout and "--solver-opt" in result.stdout
    result = subprocess.run([sys.executable, os.path.join(root, "ld3.py"), "evaluate", "--help"], cwd=elsewhere,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--schedule" in result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# What the command line prints and refuses (issues 12 and 19).


def test_gen_data_on_an_spd_snapshot_is_refused_for_its_reason(tmp_path):
    """An SPD snapshot brings its own solvers (ancestral, ...): gen-data loads it before checking --solver, and
    refuses it in one line because LD3 learns sigma grids, not because 'ancestral' is unknown."""
    from losses.spd import SPDLoss
    from training import snapshots
    from training.preconditioning import EpsPrecond

    torch.manual_seed(0)
    net = EpsPrecond(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[]).eval().requires_grad_(False)
    pickle = str(tmp_path / "spd.pkl")
    snapshots.save_snapshot(pickle, ema=net, loss_kwargs=dict(class_name="losses.spd.SPDLoss", T=20),
                            process=SPDLoss(T=20).process)
    out = tmp_path / "teacher.pt"
    for extra in (["--solver", "ancestral"], []):
        result = CliRunner().invoke(ld3_cli.cli, ["gen-data", "--network", pickle, "--out", str(out), "--seeds", "0-1",
                                                  "--device", "cpu", *extra])
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and len(result.output.strip().splitlines()) == 2, result.output  # + "Loading ..."
        assert "process 'spd'" in errors[0] and "LD3 learns sigma grids" in errors[0]
        assert "unknown solver" not in result.output and not out.exists()
    # A one-step generator (GDD) is refused for its own reason: it was said not to be sampled over a sigma grid,
    # which generate.py does with any sampler option.
    from processes import OneStepProcess
    one_step = str(tmp_path / "gdd.pkl")
    snapshots.save_snapshot(one_step, ema=tiny_net(), process=OneStepProcess(80.0),
                            loss_kwargs=dict(class_name="losses.gdd.GDDLoss"))
    result = CliRunner().invoke(ld3_cli.cli, ["gen-data", "--network", one_step, "--out", str(out), "--seeds", "0-1",
                                              "--device", "cpu"])
    assert result.exit_code == 1 and "process 'one_step': a one-step generator, sampled in one step" in result.output
    assert "not sampled over a sigma grid" not in result.output and not out.exists()


def test_gen_data_checks_the_solver_after_loading_the_network(network_pickle, tmp_path):
    """The network is read first (a missing one is the error, whatever --solver says); then --solver is checked
    against its process's solvers: 'ancestral' is not one of a sigma-grid process's."""
    out = str(tmp_path / "t.pt")
    result = CliRunner().invoke(ld3_cli.cli, ["gen-data", "--network", str(tmp_path / "missing.pkl"), "--out", out,
                                              "--solver", "ancestral", "--device", "cpu"])
    assert result.exit_code != 0 and "missing.pkl" in result.output and "unknown solver" not in result.output
    result = CliRunner().invoke(ld3_cli.cli, ["gen-data", "--network", network_pickle, "--out", out, "--solver",
                                              "ancestral", "--device", "cpu"])
    assert result.exit_code != 0 and "unknown solver 'ancestral': expected one of" in result.output
    assert "dpmpp_2m" in result.output and not os.path.exists(out)


def test_gen_data_refuses_teacher_data_of_other_settings(network_pickle, tmp_path):
    from dnnlib import util

    runner = CliRunner()
    out = tmp_path / "teacher.pt"
    base = ["gen-data", "--network", network_pickle, "--out", str(out), "--device", "cpu"]
    result = runner.invoke(ld3_cli.cli, [*base, "--seeds", "0-3", "--steps", "4"])
    assert result.exit_code == 0, result.output
    info = ld3.load_teacher_data(str(out)).info
    assert info["network_sha256"] == util.file_sha256(network_pickle) and info["num_steps"] == 4
    assert info["solver"] == "unipc" and info["denoise_to_zero"] is False
    original = out.read_bytes()

    # the same settings: said to exist, left alone (the network by another path is the same network)
    copy = tmp_path / "copy.pkl"
    copy.write_bytes(open(network_pickle, "rb").read())
    result = runner.invoke(ld3_cli.cli, ["gen-data", "--network", str(copy), "--out", str(out), "--device", "cpu",
                                         "--seeds", "0-3", "--steps", "4"])
    assert result.exit_code == 0 and "already holds these 4 teacher samples" in result.output, result.output
    assert out.read_bytes() == original

    # other settings: one line naming what differs, the file untouched
    other_net = tmp_path / "other.pkl"
    persistence.save_network_pickle(str(other_net), dict(ema=EDMPrecond(
        img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
        attn_resolutions=[])))
    for args, what in ((["--seeds", "0-4", "--steps", "4"], "(seeds)"),
                       (["--seeds", "0-3", "--steps", "5"], "(grid (schedule, steps, sigma range))"),
                       (["--seeds", "0-3", "--steps", "4", "--solver", "dpmpp_2m"], "(solver)"),
                       (["--seeds", "0-3", "--steps", "4", "--lower-order-final", "never"], "(solver options)"),
                       (["--seeds", "0-3", "--steps", "4", "--network", str(other_net)], "(network)")):
        result = runner.invoke(ld3_cli.cli, [*base, *args])
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert errors == [f"Error: --out {out} holds teacher data of other settings {what}: pass --overwrite to "
                          f"replace it, or choose another --out"], result.output
        assert out.read_bytes() == original
    # --overwrite replaces it, through a temporary name renamed into place (nothing else left in the folder)
    result = runner.invoke(ld3_cli.cli, [*base, "--seeds", "0-4", "--steps", "4", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert ld3.load_teacher_data(str(out)).seeds.tolist() == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["copy.pkl", "other.pkl", "teacher.pt"]
    # an older file that does not record the network's hash, and a file that is not teacher data
    data = ld3.load_teacher_data(str(out))
    data.info.pop("network_sha256")
    ld3.save_teacher_data(str(out), data)
    result = runner.invoke(ld3_cli.cli, [*base, "--seeds", "0-4", "--steps", "4"])
    assert result.exit_code == 1 and "(network (not recorded))" in result.output, result.output
    out.write_bytes(b"not a teacher file")
    result = runner.invoke(ld3_cli.cli, [*base, "--seeds", "0-4", "--steps", "4"])
    assert result.exit_code == 1 and "exists and is not LD3 teacher data" in result.output
    assert out.read_bytes() == b"not a teacher file"


def render_terminal(text: str) -> list[str]:
    """What a terminal shows for `text`: a carriage return moves to the start of the line, later characters
    overwrite earlier ones."""
    lines = []
    for raw in text.split("\n"):
        line, column = [], 0
        for char in raw:
            if char == "\r":
                column = 0
                continue
            if column < len(line):
                line[column] = char
            else:
                line.append(char)
            column += 1
        lines.append("".join(line).rstrip())
    return lines


def test_round_summaries_do_not_run_into_the_progress_bar(small_mixture, monkeypatch):
    import io
    import sys

    gmm, data = small_mixture
    screen = io.StringIO()  # stdout and stderr on one terminal, as in a shell
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    config = ld3.LD3Config(solver="dpmpp_2m", nfe=4, loss="l2", num_train=8, num_valid=8, batch_size=4,
                           rounds_v1=1, rounds_v2=1)
    ld3.train_ld3(gmm, data, config, progress=True, log=print)
    monkeypatch.undo()
    shown = render_terminal(screen.getvalue())
    rounds = [line for line in shown if "LD3 round" in line]
    assert len(rounds) == 2 and all(line.startswith("LD3 round") for line in rounds), shown
    assert any(line.startswith("LD3 dpmpp_2m NFE 4: 100%") for line in shown), shown  # the bar is still drawn


def test_a_learned_schedule_warning_is_shown_once(network_pickle, tmp_path):
    """Overriding an option a schedule file was learned with warns once per run, although the grid is built more
    than once (the sampler line, the plan, the teacher)."""
    import warnings

    from samplers import save_schedule_file

    schedule = str(tmp_path / "learned.json")
    save_schedule_file(schedule, edm_levels(4), solver="dpmpp_2m", nfe=3, end="sigma_min",
                       solver_kwargs={"lower_order_final": True}, provenance={})
    args = ["gen-data", "--network", network_pickle, "--out", str(tmp_path / "t.pt"), "--seeds", "0-1", "--device",
            "cpu", "--schedule", schedule, "--steps", "3", "--solver", "dpmpp_2m", "--lower-order-final", "never"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: once per location
        result = CliRunner().invoke(ld3_cli.cli, args)
    assert result.exit_code == 0, result.output
    texts = [str(w.message) for w in caught if "was learned with lower_order_final=True" in str(w.message)]
    assert len(texts) == 1, texts
    # Under torchrun every rank builds the same grid: rank 0 says it (8 GPUs printed it 8 times).
    from torch_utils import distributed
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(distributed, "get_rank", lambda: 1)
        result = CliRunner().invoke(ld3_cli.cli, [*args[:4], str(tmp_path / "t1.pt"), *args[5:]])
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if "was learned with" in str(w.message)]


def test_cli_train_and_evaluate_refuse_another_network_and_check_out_first(network_pickle, tmp_path, monkeypatch):
    """A path is only a name: from another folder, 'net.pkl' may be another network, and training or evaluating
    against teacher samples of a different network gives a silently wrong schedule or verdict. The network's sha256
    (recorded by gen-data) decides. --out is checked before any work: a .json name, not a folder, not an existing
    file without --overwrite; the log beside it is this run's only. Learning rates must be positive."""
    import shutil

    from dnnlib import util
    runner = CliRunner()
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    shutil.copy(network_pickle, work / "net.pkl")
    with torch.no_grad():  # a different network under the same name
        changed = tiny_net()
        next(changed.parameters()).add_(1.0)
    persistence.save_network_pickle(str(other / "net.pkl"), dict(ema=changed))
    monkeypatch.chdir(work)
    result = runner.invoke(ld3_cli.cli, ["gen-data", "--network", "net.pkl", "--out", "teacher.pt", "--seeds", "0-7",
                                         "--steps", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    teacher = str(work / "teacher.pt")
    assert ld3.load_teacher_data(teacher).info["network"] == str(work / "net.pkl")  # absolute: found from anywhere
    fast = ["--solver", "dpmpp_2m", "--nfe", "3", "--loss", "l2", "--num-train", "2", "--num-valid", "2",
            "--holdout", "2", "--rounds-v1", "1", "--rounds-v2", "0", "--candidates", "edm_rho7,logsnr",
            "--device", "cpu"]
    result = runner.invoke(ld3_cli.cli, ["train", "--data", teacher, "--out", "s.json", *fast])
    assert result.exit_code == 0, result.output
    record = load_schedule_file("s.json").provenance
    assert record["network"] == str(work / "net.pkl") and record["network_sha256"] == util.file_sha256("net.pkl")

    monkeypatch.chdir(other)
    expected = (f"net.pkl (sha256 {util.file_sha256('net.pkl')[:12]}...) is not the network {teacher} was made with "
                f"({work / 'net.pkl'}, sha256 {util.file_sha256(str(work / 'net.pkl'))[:12]}...): pass that network "
                f"with --network")
    result = runner.invoke(ld3_cli.cli, ["train", "--data", teacher, "--out", "s2.json", "--network", "net.pkl",
                                         *fast])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert not os.path.exists("s2.json") and not os.path.exists("s2.log.txt")
    result = runner.invoke(ld3_cli.cli, ["evaluate", "--schedule", str(work / "s.json"), "--data", teacher,
                                         "--network", "net.pkl", "--loss", "l2", "--device", "cpu"])
    assert result.exit_code == 2 and expected in result.output, result.output
    # generate.py samples another network with the schedule (a legitimate transfer), and says so
    note = f"Note: schedule file '{work / 's.json'}' was learned with another network ({work / 'net.pkl'})"
    result = runner.invoke(generate.main, ["--network", "net.pkl", "--schedule", str(work / "s.json"), "--seeds", "0",
                                           "--outdir", "images", "--device", "cpu"])
    assert result.exit_code == 0 and note in result.output, result.output
    result = runner.invoke(generate.main, ["--network", str(work / "net.pkl"), "--schedule", str(work / "s.json"),
                                           "--seeds", "0", "--outdir", "same", "--device", "cpu"])
    assert result.exit_code == 0 and "learned with another network" not in result.output, result.output

    monkeypatch.chdir(work)
    log_before = open("s.log.txt").read()
    for out, message in (("s.json", "--out s.json exists: pass --overwrite to replace it, or choose another --out"),
                         ("s.pt", "s.pt: a schedule file is JSON; name it .json"),
                         ("folder.json", "--out: folder.json is a folder")):
        os.makedirs("folder.json", exist_ok=True)
        result = runner.invoke(ld3_cli.cli, ["train", "--data", teacher, "--out", out, *fast])
        assert result.exit_code != 0 and message in result.output, result.output
    assert open("s.log.txt").read() == log_before and not os.path.exists("s.pt")
    result = runner.invoke(ld3_cli.cli, ["train", "--data", teacher, "--out", "s.json", "--overwrite", *fast])
    assert result.exit_code == 0, result.output
    assert open("s.log.txt").read().count("LD3: dpmpp_2m(") == 1  # rewritten, not appended
    for flag in ("--lr", "--lr-offsets"):
        result = runner.invoke(ld3_cli.cli, ["train", "--data", teacher, "--out", "t.json", flag, "0", *fast])
        assert result.exit_code == 2 and f"Invalid value for '{flag}': 0.0 is not in the range x>0." in result.output
    result = runner.invoke(ld3_cli.cli, ["train", "--data", teacher, "--out", "t.json", "--shift-lr", "-1", *fast])
    assert result.exit_code == 2 and "Invalid value for '--shift-lr'" in result.output

    # A schedule of the wrong kind names the file (tracebacks before).
    shutil.copy("s.json", "s-copy.pt")
    for schedule, message in (("s-copy.pt", "s-copy.pt: not LD3's .pt vector"),
                              ("net.pkl", "net.pkl: not valid JSON, so not a schedule file")):
        result = runner.invoke(ld3_cli.cli, ["evaluate", "--schedule", schedule, "--data", teacher, "--solver",
                                             "euler", "--device", "cpu"])
        assert result.exit_code == 2 and message in result.output, result.output
        result = runner.invoke(generate.main, ["--network", "net.pkl", "--schedule", schedule, "--seeds", "0",
                                               "--outdir", "images", "--device", "cpu"])
        assert result.exit_code == 2 and message in result.output, result.output


def test_gen_data_refuses_a_teacher_that_draws_noise_and_takes_a_schedule_files_steps(network_pickle, tmp_path):
    """LD3 fits the teacher's image as a function of its noise: a teacher that draws noise (Heun with churn) has none
    (train refused it as a student only). A schedule file brings its own step count: gen-data no longer compared it
    with a --steps the user never gave (20, the default for named schedules)."""
    from samplers import SigmaGrid
    grid = SigmaGrid(sigmas=torch.tensor([80.0, 1.0, 0.002], dtype=torch.float64), end="sigma_min")
    with pytest.raises(ValueError, match=r"draws noise"):
        ld3.check_deterministic(grid, "heun", {"S_churn": 10.0})
    for solver, options in (("heun", {}), ("unipc", {}), ("dpmpp_2m", {}), ("ipndm", {}), ("euler", {})):
        ld3.check_deterministic(grid, solver, options)  # no noise drawn: no error
    # its probe pixel is made on the grid's device (gen-data's grid is on the GPU there): seen through a meta grid
    import samplers.ld3.student as student
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(student, "sample", lambda denoiser, x, grid, **kwargs: seen.append(x.device))
        ld3.check_deterministic(SigmaGrid(sigmas=grid.sigmas.to("meta"), end="sigma_min"), "heun", {})
    assert seen == [torch.device("meta")]

    runner = CliRunner()
    base = ["gen-data", "--network", network_pickle, "--seeds", "0-1", "--device", "cpu"]
    result = runner.invoke(ld3_cli.cli, [*base, "--out", str(tmp_path / "churn.pt"), "--solver", "heun", "--S_churn",
                                         "10", "--steps", "4"])
    assert result.exit_code == 2 and "LD3 learns the grid of a deterministic sampler, but heun(S_churn=10.0) draws " \
        "noise" in result.output, result.output
    assert not os.path.exists(tmp_path / "churn.pt")
    schedule = str(tmp_path / "grid.json")
    from samplers import save_schedule_file
    save_schedule_file(schedule, torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0], dtype=torch.float64), solver="heun",
                       nfe=7, end="zero")
    result = runner.invoke(ld3_cli.cli, [*base, "--out", str(tmp_path / "file.pt"), "--schedule", schedule,
                                         "--solver", "heun"])
    assert result.exit_code == 0, result.output
    assert ld3.load_teacher_data(str(tmp_path / "file.pt")).info["num_steps"] == 4
    result = runner.invoke(ld3_cli.cli, [*base, "--out", str(tmp_path / "named.pt"), "--steps", "3"])
    assert result.exit_code == 0 and ld3.load_teacher_data(str(tmp_path / "named.pt")).info["num_steps"] == 3
    result = runner.invoke(ld3_cli.cli, [*base, "--out", str(tmp_path / "default.pt")])
    assert result.exit_code == 0 and ld3.load_teacher_data(str(tmp_path / "default.pt")).info["num_steps"] == 20


def test_train_records_default_options_creates_the_out_folder_and_logs_a_failure(network_pickle, tmp_path):
    """A schedule learned with a solver's defaults records them (it recorded none, so a later --order 2 passed
    without a word); generate.py also warns for an option a file leaves out. --out in a folder that does not exist
    is written (the run trained to the end, then failed). A failed --overwrite run says so in its log, and that the
    schedule at --out is an earlier run's. --nfe too small is refused naming --nfe before anything is loaded."""
    import warnings

    from samplers import save_schedule_file

    runner = CliRunner()
    teacher = str(tmp_path / "teacher.pt")
    result = runner.invoke(ld3_cli.cli, ["gen-data", "--network", network_pickle, "--out", teacher, "--seeds", "0-5",
                                         "--steps", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "new" / "deeper" / "ipndm.json"
    train = ["train", "--data", teacher, "--out", str(out), "--solver", "ipndm", "--nfe", "4", "--loss", "l2",
             "--num-train", "2", "--num-valid", "2", "--rounds-v1", "1", "--rounds-v2", "0", "--device", "cpu",
             "--log", str(tmp_path / "elsewhere.log")]
    result = runner.invoke(ld3_cli.cli, train)
    assert result.exit_code == 0, result.output
    assert load_schedule_file(str(out)).solver_kwargs == {"max_order": 4}
    assert "LD3: ipndm(max_order=4) at 4 NFE" in result.output

    # A file that leaves the option out (an older one): the solver's default is what it was learned with.
    bare = str(tmp_path / "bare.json")
    grid = load_schedule_file(str(out))
    save_schedule_file(bare, grid.sigmas, solver="ipndm", nfe=4, eval_sigmas=grid.eval_sigmas)
    for schedule in (str(out), bare):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runner.invoke(generate.main, ["--network", network_pickle, "--outdir", str(tmp_path / "g"),
                                                   "--seeds", "0", "--device", "cpu", "--schedule", schedule,
                                                   "--order", "2", "--overwrite"])
        assert result.exit_code == 0, result.output
        assert any("was learned with max_order=4; overriding with max_order=2" in str(w.message) for w in caught)

    # --overwrite that fails: the log says so, and that the schedule is the earlier run's.
    result = runner.invoke(ld3_cli.cli, [*train[:-2], "--overwrite", "--loss", "lpips", "--lpips-vgg",
                                         str(tmp_path / "none.pth")])
    assert result.exit_code == 1, result.output
    log = (out.parent / "ipndm.log.txt").read_text()
    assert "\nFailed: LPIPSUnavailableError: " in log and log.endswith(f"; {out} is an earlier run's\n")
    result = runner.invoke(ld3_cli.cli, [*train[:-2], "--overwrite", "--solver", "euler", "--nfe", "1"])
    message = "--nfe 1: euler with end='zero' has 1 positive noise levels; LD3 needs at least 3"
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert "Loading network" not in result.output


def test_evaluate_scores_lpips_at_the_size_the_schedule_was_learned_at(network_pickle, tmp_path):
    """evaluate without --lpips-resize scored LPIPS at the images' own size although the schedule was learned at
    --lpips-resize 16 (and on 8x8 images told the user to set it): it now takes the recorded size, and says it."""
    from test_lpips import fake_lpips_weights

    _, _, vgg, lin = fake_lpips_weights(tmp_path)
    runner = CliRunner()
    teacher, test_data = _teacher_and_test_data(network_pickle, tmp_path)
    schedule = str(tmp_path / "s.json")
    lpips = ["--lpips-vgg", vgg, "--lpips-lin", lin]
    result = runner.invoke(ld3_cli.cli, ["train", "--data", teacher, "--out", schedule, "--solver", "euler", "--nfe",
                                         "3", "--loss", "lpips", *lpips, "--lpips-resize", "16", "--num-train", "2",
                                         "--num-valid", "2", "--rounds-v1", "1", "--rounds-v2", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    evaluate = ["evaluate", "--schedule", schedule, "--data", test_data, "--device", "cpu", *lpips]
    recorded = runner.invoke(ld3_cli.cli, evaluate)
    assert recorded.exit_code == 0 and "; loss lpips at 16x16" in recorded.output, recorded.output
    explicit = runner.invoke(ld3_cli.cli, [*evaluate, "--lpips-resize", "16"])
    assert explicit.exit_code == 0, explicit.output
    table = [line for line in recorded.output.splitlines() if line.startswith("s.json")]
    assert table == [line for line in explicit.output.splitlines() if line.startswith("s.json")]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), a file whose writes fail ENOSPC")
def test_train_on_a_full_disk_ends_in_one_line_naming_the_file_and_keeps_the_grid(network_pickle, tmp_path,
                                                                                   monkeypatch):
    """A full disk met by the log (--log /dev/full) and then by the schedule: the run goes on with its log on the
    terminal, and the schedule's write error names --out in one line, with the learned grid in the log (minutes of
    training not lost). Before, the first failing log line ended the run in a traceback, and a failing schedule
    write in one naming no file, leaving '{out}.tmp-{pid}', which no later run removed."""
    import errno
    import json

    runner = CliRunner()
    teacher = str(tmp_path / "teacher.pt")
    result = runner.invoke(ld3_cli.cli, ["gen-data", "--network", network_pickle, "--out", teacher, "--seeds", "0-5",
                                         "--steps", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    real_dump = json.dump

    def dump_on_a_full_disk(doc, f, **kwargs):
        real_dump(doc, f, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("samplers.schedules.json.dump", dump_on_a_full_disk)
    out = tmp_path / "out" / "s.json"
    result = runner.invoke(ld3_cli.cli, ["train", "--data", teacher, "--out", str(out), "--solver", "euler", "--nfe",
                                         "3", "--loss", "l2", "--num-train", "2", "--num-valid", "2", "--rounds-v1",
                                         "1", "--rounds-v2", "0", "--device", "cpu", "--log", "/dev/full"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Cannot write /dev/full (No space left on device); the rest of the log is on the terminal only" in \
        result.output
    assert f"\nFailed: cannot write {out} (No space left on device); the grid: 80.0, " in result.output
    assert f"Error: cannot write {out} (No space left on device)" in result.output.splitlines(), result.output
    assert os.listdir(out.parent) == []


def test_home_folder_in_data_out_and_log_paths(network_pickle, tmp_path, monkeypatch):
    """gen-data --out=~/..., train --data=~/... --out=~/... --log=~/..., evaluate --schedule=~/... --data=~/...: the
    shell expands no ~ after "=", and ld3.py wrote into a folder named '~' in the current one, then did not find it."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for out, seeds in (("~/teacher.pt", "0-5"), ("~/test.pt", "10-13")):
        result = runner.invoke(ld3_cli.cli, ["gen-data", "--network", network_pickle, f"--out={out}", "--seeds",
                                             seeds, "--steps", "4", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(ld3_cli.cli, ["train", "--data=~/teacher.pt", "--out=~/s.json", "--log=~/s.log", "--solver",
                                         "euler", "--nfe", "3", "--loss", "l2", "--num-train", "2", "--num-valid", "2",
                                         "--rounds-v1", "1", "--rounds-v2", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(ld3_cli.cli, ["evaluate", "--schedule=~/s.json", "--data=~/test.pt", "--loss", "l2",
                                         "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "home")) == ["s.json", "s.log", "teacher.pt", "test.pt"]
    assert os.listdir(tmp_path) == ["home"]


def test_gen_data_on_a_full_disk_is_one_line_naming_out(network_pickle, tmp_path, monkeypatch):
    """The teacher file's write failing (a full disk) after sampling: one error line naming --out and nothing left
    there (it was an OutputPathError traceback)."""
    import errno

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("samplers.ld3.teacher.torch.save", save_on_a_full_disk)
    out = tmp_path / "teacher.pt"
    result = CliRunner().invoke(ld3_cli.cli, ["gen-data", "--network", network_pickle, "--out", str(out), "--seeds",
                                              "0-3", "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.splitlines()[-1] == f"Error: cannot write {out} (No space left on device)", result.output
    assert os.listdir(tmp_path) == []


def test_gen_data_with_an_empty_network_is_one_line(tmp_path):
    # --network= (an empty value): open_url's ValueError was a traceback, as in generate.py before 965826c.
    result = CliRunner().invoke(ld3_cli.cli, ["gen-data", "--network=", "--out", str(tmp_path / "t.pt"), "--device",
                                              "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Error: open_url expects a path or URL string, got ''" in result.output, result.output
