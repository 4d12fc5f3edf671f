"""ODE solvers: NFE, convergence order against a closed-form solution, equivalences, EDM's Heun, options; and adding a
solver by one registration, usable from generate.py and LD3."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from samplers import SOLVERS, SolverEntry, count_nfe, ld3, load_schedule_file, make_grid, sample, solver_options
from samplers.dpm_solver import step_orders
from samplers.gaussian_mixture import GaussianMixture
from samplers.solver_grid import read_grid
from torch_utils import persistence
from training.preconditioning import EDMPrecond

# Data N(mu, diag(ell)): D(x; sigma) = mu + ell / (ell + sigma^2) (x - mu), and the probability-flow ODE has the
# exact solution x(sigma) = mu + (x(sigma_0) - mu) sqrt((ell + sigma^2) / (ell + sigma_0^2)).
DIM = 16
ELL = torch.logspace(-2, 0, DIM, dtype=torch.float64)
MU = torch.linspace(-0.5, 0.5, DIM, dtype=torch.float64)


def make_denoiser(ell=ELL, mu=MU, calls=None):
    def denoiser(x, sigma, class_labels=None):
        if calls is not None:
            calls.append(sigma)
        s2 = torch.as_tensor(sigma, dtype=torch.float64) ** 2
        return (mu + ell / (ell + s2) * (x - mu)).to(torch.float32 if calls is not None else torch.float64)
    return denoiser


def exact(latents, sigma_0, sigma_end, ell=ELL, mu=MU):
    x0 = latents * sigma_0
    return mu + (x0 - mu) * torch.sqrt((ell + sigma_end**2) / (ell + sigma_0**2))


LATENTS = torch.randn(32, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def global_error(solver, num_steps, schedule="edm", sigma_min=0.002, sigma_max=80.0, ell=ELL, **kwargs):
    grid = make_grid(schedule, num_steps, sigma_min, sigma_max, end="sigma_min")
    out = sample(make_denoiser(ell), LATENTS, grid, solver=solver, **kwargs)
    return (out - exact(LATENTS, sigma_max, sigma_min, ell)).pow(2).mean().sqrt().item()


def fitted_order(solver, steps, **kwargs):
    errors = [global_error(solver, n, **kwargs) for n in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


ALL_CONFIGS = [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 1}),
               ("unipc", {"order": 2}), ("unipc", {"order": 3, "variant": "bh2"}), ("ipndm", {"max_order": 3}),
               ("ipndm", {"max_order": 4})]


@pytest.mark.parametrize(("solver", "kwargs"), ALL_CONFIGS)
@pytest.mark.parametrize("end", ["zero", "sigma_min"])
def test_nfe(solver, kwargs, end):
    calls = []
    grid = make_grid("edm", 18, end=end)
    out = sample(make_denoiser(calls=calls), LATENTS[:2], grid, solver=solver, **kwargs)
    expected = {"heun": 35 if end == "zero" else 36}.get(solver, 18)  # EDM: 18 steps -> 35 NFE
    assert len(calls) == expected == count_nfe(solver, 18, end)
    assert out.dtype == torch.float64  # float32 denoiser output is promoted, as EDM
    # The denoiser always receives the level as a 0-dim float64 tensor (no host scalars, no per-step syncs).
    assert all(isinstance(s, torch.Tensor) and s.ndim == 0 and s.dtype == torch.float64 for s in calls)
    calls.clear()
    sample(make_denoiser(calls=calls), LATENTS[:2], grid, solver=solver, denoise_to_zero=True, **kwargs)
    assert len(calls) == count_nfe(solver, 18, end, denoise_to_zero=True) == expected + (end == "sigma_min")


# Global-error orders, edm(rho=7) grid 80 -> 0.002, no final denoise.
@pytest.mark.parametrize(("solver", "kwargs", "order", "steps"), [
    ("euler", {}, 1, [32, 64, 128, 256]),
    ("heun", {}, 2, [32, 64, 128, 256]),
    ("dpmpp_2m", {}, 2, [32, 64, 128, 256]),
    ("dpmpp_3m", {"exact_third_order": True}, 3, [32, 64, 128, 256]),
    ("unipc", {"order": 1}, 2, [32, 64, 128, 256]),
    ("unipc", {"order": 2}, 3, [32, 64, 128, 256]),
    ("unipc", {"order": 3, "lower_order_final": False}, 4, [32, 64, 128, 256]),
    ("unipc", {"order": 3, "variant": "bh2", "lower_order_final": False}, 4, [32, 64, 128, 256]),
])
def test_convergence_order(solver, kwargs, order, steps):
    assert fitted_order(solver, steps, **kwargs) == pytest.approx(order, abs=0.25)


def test_dpmpp_3m_reference_update_is_second_order():
    """The reference codes' 3M update weights its second difference by half the third-order value (see dpmpp_3m):
    globally second order, with a smaller constant than 2M; exact_third_order restores order 3."""
    steps = [64, 128, 256]
    assert fitted_order("dpmpp_3m", steps, schedule="logsnr") == pytest.approx(2, abs=0.2)
    assert global_error("dpmpp_3m", 256) < 0.5 * global_error("dpmpp_2m", 256)
    assert fitted_order("dpmpp_3m", steps, exact_third_order=True) == pytest.approx(3, abs=0.2)


def kdiffusion_dpmpp_multistep(denoiser, latents, sigmas, order):
    """k-diffusion's sample_dpmpp_3m_sde with eta = 0 (its multistep DPM-Solver++ in log-sigma time, the reference
    3M update and a phi_2 second-order warm-up), written out independently: order 3 is that sampler; order 2 stops
    at its second-order branch (DPM-Solver++(2M) with the 'taylor' coefficient phi_2 = expm1(-h) / h + 1)."""
    x = latents * sigmas[0]
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        d = denoiser(x, sigmas[i])
        h = sigmas[i].log() - sigmas[i + 1].log()
        x = torch.exp(-h) * x - torch.expm1(-h) * d
        phi_2 = torch.expm1(-h) / h + 1
        if h_2 is not None and order == 3:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (d - d_1) / r0, (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * (d - d_1) / (h_1 / h)
        d_1, d_2, h_1, h_2 = d, d_1, h, h_1
    return x


@pytest.mark.parametrize("solver, order", [("dpmpp_3m", 3), ("dpmpp_2m", 2)])
def test_dpmpp_multistep_equals_k_diffusions_update(solver, order):
    """The published DPM-Solver++(3M) update itself (the order test above admits any weight near it), and the 2M
    'taylor' variant, against an independent transcription, step for step (variant='taylor': its warm-up step)."""
    grid = make_grid("edm", 10, 0.002, 80, end="sigma_min")
    denoiser = make_denoiser()
    ours = sample(denoiser, LATENTS, grid, solver=solver, variant="taylor", lower_order_final=False)
    ref = kdiffusion_dpmpp_multistep(denoiser, LATENTS, grid.sigmas.to(torch.float64), order)
    assert (ours - ref).abs().max().item() < 1e-12


def test_ipndm_order():
    """iPNDM's fixed Adams-Bashforth weights are exact on a uniform grid: order q there (pre-asymptotically; the
    Euler warm-up step caps the asymptotic order at 2). On a non-uniform grid such as edm(7) it is second order."""
    easy = dict(schedule="sigma_uniform", sigma_min=1.0, sigma_max=10.0, ell=torch.linspace(1, 4, DIM,
                                                                                             dtype=torch.float64))
    assert fitted_order("ipndm", [10, 20, 40, 80], max_order=2, **easy) == pytest.approx(2, abs=0.25)
    assert fitted_order("ipndm", [20, 40, 80, 160], max_order=3, **easy) == pytest.approx(3, abs=0.3)
    assert fitted_order("ipndm", [10, 20, 40, 80], max_order=4, **easy) > 3.2
    assert fitted_order("ipndm", [64, 128, 256], max_order=4) == pytest.approx(2, abs=0.2)


@pytest.mark.parametrize(("solver", "kwargs", "steps", "tolerance"), [
    ("heun", {}, 4096, 1e-6),
    ("dpmpp_2m", {}, 4096, 1e-6),
    ("dpmpp_3m", {}, 2048, 1e-6),
    ("dpmpp_3m", {"exact_third_order": True}, 512, 1e-6),
    ("unipc", {"order": 3}, 512, 1e-6),
    ("ipndm", {"max_order": 4}, 2048, 1e-6),
    ("euler", {}, 16384, 1e-4),  # first order: 1e-6 would take ~10^6 steps
])
def test_matches_exact_solution(solver, kwargs, steps, tolerance):
    assert global_error(solver, steps, **kwargs) < tolerance


def edm_algorithm_2(denoiser, latents, sigmas, randn_like, S_churn, S_min, S_max, S_noise):
    """EDM's stochastic sampler as written in the paper (Algorithm 2), straightforwardly, for comparison."""
    num_steps = len(sigmas) - 1
    x = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x)
        d_cur = (x_hat - denoiser(x_hat, t_hat).to(torch.float64)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x - denoiser(x, t_next).to(torch.float64)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


@pytest.mark.parametrize("churn", [dict(S_churn=0, S_min=0, S_max=math.inf, S_noise=1),
                                   dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),  # gamma at its cap
                                   dict(S_churn=2, S_min=0.05, S_max=50, S_noise=1.003)])  # 2 / 12 below it
def test_heun_equals_edm_algorithm_2(churn):
    grid = make_grid("edm", 12, end="zero")
    denoiser = make_denoiser(calls=[])  # float32 output, as a network
    noise = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    ours = sample(denoiser, LATENTS, grid, solver="heun",
                  randn_like=lambda x: torch.randn(x.shape, dtype=x.dtype, generator=noise[0]), **churn)
    ref = edm_algorithm_2(denoiser, LATENTS, grid.sigmas,
                          lambda x: torch.randn(x.shape, dtype=x.dtype, generator=noise[1]), **churn)
    assert torch.equal(ours, ref)
    if churn["S_churn"]:  # churn changes the result, and the noise stream was consumed once per step
        assert not torch.equal(ours, sample(denoiser, LATENTS, grid, solver="heun"))
        assert torch.equal(noise[0].get_state(), noise[1].get_state())


def test_churn_draws_every_step_like_edm():
    draws = []

    def randn_like(x):
        draws.append(1)
        return torch.zeros_like(x)

    grid = make_grid("edm", 8, end="zero")
    sample(make_denoiser(), LATENTS, grid, solver="heun", randn_like=randn_like, S_churn=10, S_min=1, S_max=10)
    assert len(draws) == 8  # also outside [S_min, S_max], to keep the per-seed stream aligned with EDM's
    draws.clear()
    sample(make_denoiser(), LATENTS, grid, solver="heun", randn_like=randn_like)
    assert not draws


def test_first_order_equivalences():
    grid = make_grid("logsnr", 9, 0.002, 80, end="sigma_min")
    denoiser = make_denoiser()
    euler = sample(denoiser, LATENTS, grid, solver="euler")
    for solver, kwargs in [("unipc", dict(order=1, corrector=False)), ("ipndm", dict(max_order=1))]:
        torch.testing.assert_close(sample(denoiser, LATENTS, grid, solver=solver, **kwargs), euler, rtol=1e-12,
                                   atol=1e-12)
    # UniP-2 with B(h) = expm1(-h) is DPM-Solver++(2M) (lower-order final for both).
    torch.testing.assert_close(sample(denoiser, LATENTS, grid, solver="unipc", order=2, variant="bh2",
                                      corrector=False),
                               sample(denoiser, LATENTS, grid, solver="dpmpp_2m"), rtol=1e-12, atol=1e-12)
    # The corrector changes the result (and is what raises the order).
    assert not torch.allclose(sample(denoiser, LATENTS, grid, solver="unipc", order=2), euler, atol=1e-6)


@pytest.mark.parametrize(("solver", "kwargs"), [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {}), ("ipndm", {}),
                                                ("euler", {})])
def test_final_step_to_zero_denoises(solver, kwargs):
    """With EDM's appended zero the last step returns D at the last positive level (up to rounding for Euler)."""
    calls, outputs = [], []
    base = make_denoiser()

    def denoiser(x, sigma, class_labels=None):
        calls.append((x.clone(), sigma))
        outputs.append(base(x, sigma))
        return outputs[-1]

    out = sample(denoiser, LATENTS, make_grid("edm", 7, end="zero"), solver=solver, **kwargs)
    assert float(calls[-1][1]) == pytest.approx(0.002)
    torch.testing.assert_close(out, outputs[-1], rtol=0, atol=1e-12)


def test_step_orders():
    levels = make_grid("edm", 6, end="sigma_min").sigmas.tolist()
    assert step_orders(levels, 3, True) == [1, 2, 3, 3, 2, 1]
    assert step_orders(levels, 3, False) == [1, 2, 3, 3, 3, 3]
    assert step_orders(levels, 3, 10) == [1, 2, 3, 3, 2, 1]  # DPM-Solver's rule: only below 10 steps
    assert step_orders(make_grid("edm", 12, end="sigma_min").sigmas.tolist(), 2, 10) == [1] + [2] * 11
    zero = make_grid("edm", 6, end="zero").sigmas.tolist()
    assert step_orders(zero, 3, True) == [1, 2, 3, 2, 1, 1]  # relative to the steps ending above 0

    def reference(num_steps, order):
        """UniPC's / DPM-Solver's loops (lower_order_final on): warm-up steps 1 .. order-1 at order = step, then
        steps order .. num_steps at min(order, num_steps + 1 - step)."""
        return list(range(1, order)) + [min(order, num_steps + 1 - step) for step in range(order, num_steps + 1)]

    for order in range(1, 7):
        for num_steps in range(order, 3 * order + 2):
            levels = make_grid("logsnr", num_steps, end="sigma_min").sigmas.tolist()
            assert step_orders(levels, order, True) == reference(num_steps, order), (order, num_steps)
    assert step_orders(make_grid("logsnr", 4, end="sigma_min").sigmas.tolist(), 4, True) == [1, 2, 3, 1]  # was 1,2,2,1
    assert step_orders(make_grid("logsnr", 2, end="sigma_min").sigmas.tolist(), 3, True) == [1, 1]  # shorter: capped


def test_revised_step_orders_are_those_that_changed_on_2026_12_02():
    """The orders of versions before c6f2e1c (warm-up steps capped too) differ only for orders >= 4: those grids name
    their orders (generate.py's record and sampler line), all others none, as the records of those versions."""
    from samplers.solver_grid import revised_step_orders
    levels = make_grid("logsnr", 4, end="sigma_min").sigmas.tolist()
    assert step_orders(levels, 4, True, capped_warmup=True) == [1, 2, 2, 1]
    assert revised_step_orders(levels, 4, True) == [1, 2, 3, 1]
    assert revised_step_orders(levels, 4, False) is None
    for order in range(1, 4):
        for num_steps in range(2, 12):
            for end in ("sigma_min", "zero"):
                grid = make_grid("logsnr", num_steps, end=end).sigmas.tolist()
                assert revised_step_orders(grid, order, True) is None, (order, num_steps, end)


def test_solvers_without_a_decoupled_grid_refuse_one():
    """EDM's time-ODE solvers step in another time variable: LD3's decoupled evaluation grid is refused by name."""
    from samplers.ld3.optimize import LD3Config
    grid = make_grid("logsnr", 6, 0.002, 80, end="sigma_min")
    grid.eval_sigmas = grid.sigmas.clone()
    for solver in ("euler_time", "heun_time"):
        with pytest.raises(ValueError, match=f"solver '{solver}' takes no eval_sigmas, so it cannot use a decoupled"):
            sample(make_denoiser(), LATENTS, grid, solver=solver)
        with pytest.raises(ValueError, match=f"solver '{solver}' takes no decoupled evaluation grid"):
            LD3Config(solver=solver, nfe=6).validate()


@pytest.mark.parametrize("solver", sorted(name for name in SOLVERS if SOLVERS[name].takes_input("eval_sigmas")))
def test_decoupled_evaluation_grid(solver):
    """LD3: D is evaluated at eval_sigmas; the solver's coefficients still use sigmas. A solver that draws noise
    (randn_like) gets the same stream in every call, so that a stochastic solver can declare eval_sigmas too."""
    def seeded():
        generator = torch.Generator().manual_seed(7)
        return lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype)

    def sample_seeded(*args, **kwargs):
        return sample(*args, randn_like=seeded(), **kwargs)

    grid = make_grid("logsnr", 6, 0.002, 80, end="sigma_min")
    eval_sigmas = grid.sigmas.clone()
    eval_sigmas[1:-1] *= 1.1
    calls = []
    sample_seeded(make_denoiser(calls=calls), LATENTS, grid, solver=solver)
    plain = [float(s) for s in calls]
    calls.clear()
    grid.eval_sigmas = eval_sigmas
    out = sample_seeded(make_denoiser(calls=calls), LATENTS, grid, solver=solver)
    assert len(calls) == len(plain)
    index = [int(np.argmin(np.abs(grid.sigmas.numpy() - p))) for p in plain]  # the grid level of each call
    np.testing.assert_allclose([float(s) for s in calls], eval_sigmas.numpy()[index], rtol=1e-15)
    assert sum(0 < i < 6 for i in index) >= 4
    grid.eval_sigmas = grid.sigmas.clone()  # an identical evaluation grid changes nothing
    plain_grid = make_grid("logsnr", 6, 0.002, 80, end="sigma_min")
    torch.testing.assert_close(sample_seeded(make_denoiser(), LATENTS, grid, solver=solver),
                               sample_seeded(make_denoiser(), LATENTS, plain_grid, solver=solver), rtol=0, atol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("solver", "kwargs", "message"), [
    ("unipc", {"order": 3, "varaint": "bh2"}, r"does not take option\(s\) \['varaint'\]"),
    ("unipc", {"variant": "bh3"}, "variant must be 'bh1' or 'bh2'"),
    ("dpmpp_2m", {"variant": "midpoint"}, "variant must be 'dpmsolver' or 'taylor'"),
    ("ipndm", {"max_order": 5}, "max_order must be 1, 2, 3 or 4"),
    ("heun", {"order": 2}, r"does not take option\(s\) \['order'\]"),
    ("rk4", {}, "unknown solver 'rk4'"),
    ("dpmpp_3m", {"lower_order_final": "yes"}, "lower_order_final must be"),
    # A negative or NaN churn sampled deterministically, recorded as given (the --S_churn flag refuses it).
    ("heun", {"S_churn": -1.0}, r"heun: S_churn must be >= 0 \(0: deterministic\), got -1.0"),
    ("heun", {"S_churn": math.nan}, "heun: S_churn must be >= 0"),
    ("heun_time", {"ode_schedule": "vp", "ode_scaling": "vp", "S_churn": -1.0}, "heun_time: S_churn must be >= 0"),
])
def test_solver_errors(solver, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(make_denoiser(), LATENTS, make_grid("edm", 5, end="sigma_min"), solver=solver, **kwargs)


def test_boosted_heun_refuses_a_negative_churn():
    # Its gamma would be negative: sqrt(t_hat^2 - t^2) of a negative number, NaN images.
    from samplers.guidance import boosted_heun
    with pytest.raises(ValueError, match=r"heun with --dg: S_churn must be >= 0 \(0: deterministic\), got -1.0"):
        boosted_heun(make_denoiser(), None, LATENTS, make_grid("edm", 5).sigmas, S_churn=-1.0)


def test_heun_decoupled_grid_with_churn_is_refused():
    grid = make_grid("edm", 5, end="sigma_min")
    grid.eval_sigmas = grid.sigmas.clone()
    with pytest.raises(ValueError, match="cannot be combined with S_churn"):
        sample(make_denoiser(), LATENTS, grid, solver="heun", S_churn=10)


# ---------------------------------------------------------------------------------------------------------------
# Adding a solver (docs/solvers.md, "Adding a solver"): a function and one registry line, nothing else. The example
# is DPM-Solver++(2S), a singlestep second-order solver not in the registry: two calls per step, an option r.


def dpmpp_2s(denoiser, x, sigmas, class_labels=None, *, r: float = 0.5, eval_sigmas=None):
    """DPM-Solver++(2S): from sigma_i, an intermediate point at lambda_i + r h (lambda = -log sigma), then the step
    with the blend (1 - 1/(2r)) D_i + 1/(2r) D_mid. NFE: 2 per step, 1 for a step to sigma = 0 (x <- D_i)."""
    levels, eval_grid = read_grid(sigmas, eval_sigmas)
    for i in range(len(levels) - 1):
        denoised = denoiser(x, eval_grid[i], class_labels).to(torch.float64)
        if levels[i + 1] == 0:
            x = denoised
            continue
        h = sigmas[i].log() - sigmas[i + 1].log()
        sigma_mid = sigmas[i] * torch.exp(-r * h)
        x_mid = (sigma_mid / sigmas[i]) * x - torch.expm1(-r * h) * denoised
        denoised_mid = denoiser(x_mid, sigma_mid, class_labels).to(torch.float64)
        blend = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_mid
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * blend
    return x


def dpmpp_2s_nfe(num_steps, end):
    return 2 * num_steps - (end == "zero")


@pytest.fixture
def toy_solver(monkeypatch):
    monkeypatch.setitem(SOLVERS, "dpmpp_2s", SolverEntry(dpmpp_2s, default_end="sigma_min", nfe=dpmpp_2s_nfe))
    return "dpmpp_2s"


def test_added_solver_samples_with_its_order_and_nfe(toy_solver):
    assert fitted_order(toy_solver, [32, 64, 128, 256]) == pytest.approx(2, abs=0.25)
    assert fitted_order(toy_solver, [32, 64, 128, 256], r=1.0) == pytest.approx(2, abs=0.25)  # any r in (0, 1]
    for end in ("zero", "sigma_min"):
        calls = []
        sample(make_denoiser(calls=calls), LATENTS[:2], make_grid("edm", 6, end=end), solver=toy_solver)
        assert len(calls) == count_nfe(toy_solver, 6, end) == {"zero": 11, "sigma_min": 12}[end]
    assert solver_options(toy_solver) == ["r"]
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['order'\]"):
        sample(make_denoiser(), LATENTS, make_grid("edm", 5, end="sigma_min"), solver=toy_solver, order=2)


def test_added_solver_through_generate_cli(toy_solver, tmp_path):
    """generate.py takes the new solver and its option by name, typed from its signature, and writes what the function
    computes on generate.py's grid from the per-seed latents."""
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet", model_channels=8,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval().requires_grad_(False)
    network = str(tmp_path / "network-snapshot-000000.pkl")
    persistence.save_network_pickle(network, dict(ema=net))
    args = ["--network", network, "--outdir", str(tmp_path / "out"), "--seeds", "3,7", "--device", "cpu",
            "--solver", toy_solver, "--steps", "3", "--solver-opt", "r=0.4"]
    result = CliRunner().invoke(generate.main, args)
    assert result.exit_code == 0, result.output
    assert "solver=dpmpp_2s(r=0.4)" in result.output and "end=sigma_min" in result.output
    assert "6 NFE per image" in result.output
    grid = make_grid("edm", 3, end="sigma_min", sigma_range=(net.sigma_min, net.sigma_max),
                     round_sigma=net.round_sigma)
    for seed in (3, 7):
        latent = torch.randn([1, 1, 8, 8], generator=torch.Generator().manual_seed(seed))
        x = dpmpp_2s(net, latent.to(torch.float64) * grid.sigmas[0], grid.sigmas, r=0.4)
        expected = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)[0, 0].numpy()
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out" / f"{seed:06d}.png")), expected)
    for bad, message in ((["--solver-opt", "r=half"], "--solver-opt r=half: expected a number"),
                         (["--solver-opt", "order=2"], "'order' is not an option of solver 'dpmpp_2s'"),
                         (["--order", "2"], "--order does not apply to solver 'dpmpp_2s'")):
        result = CliRunner().invoke(generate.main, [*args, *bad])
        assert result.exit_code != 0 and message in result.output, result.output


def test_added_solver_learns_a_grid_with_ld3(toy_solver, tmp_path):
    """LD3 differentiates through the new solver as registered; the learned schedule file samples with it."""
    gmm = GaussianMixture()
    latents = torch.randn(48, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    teacher_grid = make_grid("logsnr", 40, 0.002, 80.0, end="sigma_min")
    images = ld3.teacher_samples(gmm, latents, teacher_grid, solver="unipc")
    data = ld3.TeacherData(latents=latents[:32], images=images[:32], info={"sigmas": teacher_grid.sigmas.tolist()})
    # guard=False: LD3's own result, so the test sees the learning itself (8 held-out samples are too few for the
    # guard to accept a gain beyond its noise).
    config = ld3.LD3Config(solver=toy_solver, nfe=6, solver_kwargs={"r": 0.5}, loss="l2", num_train=16,
                           num_valid=16, batch_size=4, rounds_v1=1, rounds_v2=1, lr_logits=0.03, init="edm",
                           prior_bound=0.0, guard=False)
    result = ld3.train_ld3(gmm, data, config)
    assert result.best_valid_loss < 0.8 * result.init_valid_loss
    path = str(tmp_path / "dpmpp2s-nfe6.json")
    result.save(path)
    loaded = load_schedule_file(path)
    assert loaded.solver == toy_solver and loaded.num_steps == 3 and loaded.solver_kwargs == {"r": 0.5}
    held_out = sample(gmm, latents[32:], loaded, solver=toy_solver, r=0.5)
    baseline = sample(gmm, latents[32:], make_grid("edm", 3, 0.002, 80.0, end="sigma_min"), solver=toy_solver)
    assert (held_out - images[32:]).square().mean() < (baseline - images[32:]).square().mean()


@pytest.mark.parametrize("solver", ["euler", "ipndm"])
def test_decoupled_grid_slope_divides_by_the_evaluation_sigma(solver):
    """One step of x <- x + (sigma_1 - sigma_0) (x - D(x; sigma_0')) / sigma_0' by hand: D(x; s) = 0.25 / (0.25 + s^2) x
    (a Gaussian of variance 0.25), x = 1, sigmas [2, 1], sigma_0' = 2.2: x_1 = 1 - (1 - 0.25 / 5.09) / 2.2."""
    from samplers.euler_heun import euler
    from samplers.ipndm import ipndm

    def denoiser(x, sigma, class_labels=None):
        return 0.25 / (0.25 + sigma ** 2) * x

    step = {"euler": euler, "ipndm": ipndm}[solver]
    x = step(denoiser, torch.ones(1, dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64),
             eval_sigmas=torch.tensor([2.2, 1.0], dtype=torch.float64))
    assert float(x) == pytest.approx(1 - (1 - 0.25 / 5.09) / 2.2, rel=1e-14)  # 0.5677799607072691
