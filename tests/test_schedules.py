"""Noise-level schedules, grid end conventions, and schedule files (JSON and LD3's .pt vector)."""

import json
import math

import numpy as np
import pytest
import torch

from samplers import (
    SCHEDULES,
    count_nfe,
    import_ld3_schedule,
    load_schedule_file,
    make_grid,
    sample,
    save_schedule_file,
)
from samplers.schedules import DEFAULT_SIGMA_RANGE, iddpm_sigma_table, load_ld3_vector

# docs/solvers.md, "Grid ends": N = 10, sigma 80 -> 0.002 (4 significant digits).
REFERENCE_N10 = {
    "edm": [80, 45.31, 24.41, 12.38, 5.839, 2.515, 0.9654, 0.3183, 0.08509, 0.01672, 0.002],
    "logsnr": [80, 27.73, 9.609, 3.330, 1.154, 0.400, 0.1386, 0.04804, 0.01665, 0.005771, 0.002],
    "vp_time_uniform": [80, 34.80, 16.51, 8.514, 4.746, 2.824, 1.754, 1.098, 0.6502, 0.3047, 0.002],
}
# EDM's own 18-step CIFAR grid (docs/solvers.md, "Grid ends"): 17 intervals, then the appended 0.
EDM_18 = [80, 57.586, 40.786, 28.375, 19.352, 12.910, 8.401, 5.315, 3.257, 1.923, 1.088, 0.585, 0.296, 0.140, 0.060,
          0.023, 0.0075, 0.002, 0]


@pytest.mark.parametrize("name", sorted(REFERENCE_N10))
def test_reference_grids(name):
    grid = SCHEDULES[name](10, 0.002, 80)
    assert grid.dtype == torch.float64 and grid.shape == (11,)
    np.testing.assert_allclose(grid.numpy(), REFERENCE_N10[name], rtol=6e-4)


def test_sigma_uniform_and_time_quadratic():
    np.testing.assert_allclose(SCHEDULES["sigma_uniform"](10, 0.002, 80).numpy(),
                               80 - np.arange(11) * (80 - 0.002) / 10, rtol=1e-14)
    quadratic = SCHEDULES["time_quadratic"](10, 0.002, 80).numpy()
    expected = (math.sqrt(80) + np.arange(11) / 10 * (math.sqrt(0.002) - math.sqrt(80))) ** 2
    np.testing.assert_allclose(quadratic, expected, rtol=1e-13)
    assert quadratic[9] == pytest.approx(0.874, abs=5e-4)  # docs/solvers.md: DPM-Solver's, not LD3's 0.802


def test_edm_18_step_grid_equals_edm_sampler():
    grid = make_grid("edm", 18, 0.002, 80, end="zero")
    np.testing.assert_allclose(grid.sigmas.numpy(), EDM_18, rtol=5e-4, atol=5e-4)  # 3 decimals
    # Bit-exact against EDM's float64 expression (step indices over num_steps - 1, then t_N = 0).
    i = torch.arange(18, dtype=torch.float64)
    t = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.equal(grid.sigmas, torch.cat([t, torch.zeros(1, dtype=torch.float64)]))
    assert grid.end == "zero" and grid.num_steps == 18


def test_end_conventions():
    zero = make_grid("logsnr", 6, 0.002, 80, end="zero")
    stop = make_grid("logsnr", 6, 0.002, 80, end="sigma_min")
    assert len(zero.sigmas) == len(stop.sigmas) == 7
    assert zero.sigmas[-1] == 0 and zero.sigmas[-2] == pytest.approx(0.002, rel=1e-12)
    assert stop.sigmas[-1] == pytest.approx(0.002, rel=1e-12) and stop.sigmas[0] == pytest.approx(80, rel=1e-12)
    np.testing.assert_allclose(zero.sigmas[:-1].numpy(), SCHEDULES["logsnr"](5, 0.002, 80).numpy(), rtol=1e-15)


def test_edm_ablation_discretisations():
    vp_min, vp_max = DEFAULT_SIGMA_RANGE["vp"]
    assert vp_min == pytest.approx(0.0105, abs=5e-5) and vp_max == pytest.approx(152.17, abs=5e-3)
    vp = make_grid("vp", 6, end="zero").sigmas
    assert vp[0] == pytest.approx(vp_max, rel=1e-12) and vp[-2] == pytest.approx(vp_min, rel=1e-9)
    ve = make_grid("ve", 6, end="zero").sigmas
    np.testing.assert_allclose(ve[:-1].numpy(), SCHEDULES["logsnr"](5, 0.02, 100).numpy(), rtol=1e-13)
    table = iddpm_sigma_table()
    assert table[-1] == 0 and table[-2] == pytest.approx(0.00642, abs=1e-5)
    assert table[0] == pytest.approx(20291, rel=1e-4)
    iddpm = make_grid("iddpm", 6, end="zero").sigmas
    assert all(bool((table == s).any()) for s in iddpm[:-1])  # every level is a table entry
    assert 0.002 <= float(iddpm[-2]) and float(iddpm[0]) <= 81


def test_clamp_and_round_sigma():
    grid = make_grid("edm", 5, end="zero", sigma_range=(0.01, 50.0), round_sigma=lambda s: torch.round(s, decimals=2))
    assert float(grid.sigmas[0]) == 50 and float(grid.sigmas[-2]) == 0.01 and float(grid.sigmas[-1]) == 0
    assert torch.equal(grid.sigmas, torch.round(grid.sigmas, decimals=2))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(schedule="nope"), "unknown schedule 'nope'"),
    (dict(schedule="edm", end="both"), "end must be one of"),
    (dict(schedule="edm", num_steps=1, end="zero"), "needs num_steps >= 2"),
    (dict(schedule="edm", sigma_min=5.0, sigma_max=1.0), "sigma_min < sigma_max"),
])
def test_grid_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_grid(**kwargs)


def _gaussian_denoiser(x, sigma, class_labels=None):
    return 0.25 / (0.25 + torch.as_tensor(sigma, dtype=torch.float64) ** 2) * x


def test_schedule_file_round_trip(tmp_path):
    sigmas = SCHEDULES["logsnr"](6, 0.002, 80)
    eval_sigmas = sigmas.clone()
    eval_sigmas[1:-1] *= 1.0 + 0.01 * torch.arange(1, 6, dtype=torch.float64) / 3
    path = str(tmp_path / "ipndm-nfe6.json")
    save_schedule_file(path, sigmas, solver="ipndm", nfe=6, eval_sigmas=eval_sigmas, solver_kwargs={"max_order": 3},
                       provenance={"method": "LD3", "seed": 0})
    doc = json.load(open(path))
    assert doc["solver"] == "ipndm" and doc["nfe"] == 6 and doc["end"] == "sigma_min" and len(doc["sigmas"]) == 7
    grid = load_schedule_file(path)
    assert torch.equal(grid.sigmas, sigmas) and torch.equal(grid.eval_sigmas, eval_sigmas)  # bit-exact
    assert grid.solver == "ipndm" and grid.solver_kwargs == {"max_order": 3} and grid.provenance["seed"] == 0
    # The same registry entry point: make_grid accepts the path; a wrong step count is refused.
    assert torch.equal(make_grid(path, None).sigmas, sigmas)
    with pytest.raises(ValueError, match="holds a 6-step grid, but 8 steps"):
        make_grid(path, 8)
    # The decoupled grid reaches the denoiser: outputs differ from the plain grid and reload reproduces them.
    latents = torch.randn(3, 4, dtype=torch.float64)
    out = sample(_gaussian_denoiser, latents, grid, solver="ipndm", max_order=3)
    assert torch.equal(out, sample(_gaussian_denoiser, latents, load_schedule_file(path), solver="ipndm", max_order=3))
    plain = sample(_gaussian_denoiser, latents, make_grid("logsnr", 6, 0.002, 80, end="sigma_min"), solver="ipndm",
                   max_order=3)
    assert not torch.equal(out, plain) and torch.allclose(out, plain, atol=0.1)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(nfe=7), "nfe=7 but solver 'ipndm' with 6 steps"),
    (lambda d: d.update(sigmas=d["sigmas"][::-1]), "strictly decreasing"),
    (lambda d: d.update(solver="rk45"), "unknown solver 'rk45'"),
    (lambda d: d.update(eval_sigmas=d["sigmas"][:-1]), "eval_sigmas has 6 entries"),
    (lambda d: d.pop("sigmas"), "missing key 'sigmas'"),
    (lambda d: d.update(format="other"), "not a schedule file"),
    (lambda d: d.update(solver_kwargs={"bogus": 1}), r"solver 'ipndm' does not take option\(s\) \['bogus'\]"),
    (lambda d: d.update(solver_kwargs=[3]), "solver_kwargs must be an object"),
])
def test_schedule_file_errors(tmp_path, edit, message):
    path = str(tmp_path / "s.json")
    save_schedule_file(path, SCHEDULES["edm"](6, 0.002, 80), solver="ipndm", nfe=6)
    doc = json.load(open(path))
    edit(doc)
    json.dump(doc, open(path, "w"))
    with pytest.raises(ValueError, match=message) as info:
        load_schedule_file(path)
    assert path in str(info.value)


def test_schedule_file_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_schedule_file(str(path))
    with pytest.raises(FileNotFoundError, match="schedule file not found"):
        load_schedule_file(str(tmp_path / "missing.json"))


def test_ld3_vector_import(tmp_path):
    sigmas = SCHEDULES["logsnr"](5, 0.002, 80).to(torch.float32)
    eval_sigmas = sigmas.clone()
    eval_sigmas[2] *= 1.05
    vector = torch.cat([sigmas, eval_sigmas])  # LD3's best_t_steps, length 2(N + 1)
    torch.save({"params1": torch.ones(6), "params2": torch.zeros(6), "best_t_steps": vector}, tmp_path / "best_v2.pt")
    torch.save(vector, tmp_path / "t_steps.pt")
    for name in ("best_v2.pt", "t_steps.pt"):
        grid = load_ld3_vector(str(tmp_path / name), "ipndm")
        assert grid.end == "sigma_min" and grid.num_steps == 5 and grid.solver == "ipndm"
        assert grid.solver_kwargs == {"max_order": 3}  # LD3's configs: order 3
        assert torch.equal(grid.sigmas, sigmas.double()) and torch.equal(grid.eval_sigmas, eval_sigmas.double())
    assert make_grid(str(tmp_path / "t_steps.pt"), 5).eval_sigmas is not None
    imported = import_ld3_schedule(str(tmp_path / "best_v2.pt"), str(tmp_path / "ld3.json"), "uni_pc")
    assert imported.solver == "unipc" and imported.solver_kwargs == {"order": 3, "variant": "bh1"}
    assert torch.equal(imported.sigmas, sigmas.double()) and count_nfe("unipc", 5, "sigma_min") == 5
    assert "LD3" in imported.provenance["source"]
    torch.save(vector[:-1], tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="even length"):
        load_ld3_vector(str(tmp_path / "odd.pt"))
    torch.save({"params1": torch.ones(3)}, tmp_path / "nokey.pt")
    with pytest.raises(ValueError, match="best_t_steps"):
        load_ld3_vector(str(tmp_path / "nokey.pt"))
    # A stride-0 view: 10^8 values in a 1 KB file, refused before any copy (it was expanded to float64 first).
    torch.save(torch.ones(1).expand(10 ** 8), tmp_path / "wide.pt")
    assert (tmp_path / "wide.pt").stat().st_size < 2048
    with pytest.raises(ValueError, match="wide.pt: a tensor of 100,000,000 values; LD3's vector has 2"):
        load_ld3_vector(str(tmp_path / "wide.pt"))


def test_vp_time_uniform_with_rho_spaces_t_to_the_one_over_rho():
    """DEIS's rho = 2, computed independently: t_i = (1 - (i / N)(1 - eps_s^(1/2)))^2, beta_d and beta_min solved from
    sigma(1) = sigma_max and sigma(eps_s) = sigma_min, sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    from samplers.schedules import VP_EPSILON_S, vp_time_uniform

    sigma_min, sigma_max, eps, n = 0.002, 80.0, VP_EPSILON_S, 5
    # log(1 + sigma^2) = beta_d t^2 / 2 + beta_min t at t = 1 and t = eps: two linear equations.
    a = np.array([[0.5, 1.0], [0.5 * eps ** 2, eps]])
    beta_d, beta_min = np.linalg.solve(a, np.log1p(np.array([sigma_max, sigma_min]) ** 2))
    t = (1 - np.arange(n + 1) / n * (1 - eps ** 0.5)) ** 2
    expected = np.sqrt(np.expm1(0.5 * beta_d * t ** 2 + beta_min * t))
    got = vp_time_uniform(n, sigma_min, sigma_max, rho=2).to(torch.float64).numpy()
    np.testing.assert_allclose(got[:len(expected)], expected, rtol=1e-10)
