"""LD3 (samplers/ld3/, ld3.py): grid parameterisation, differentiating through the registered solvers, teacher data,
training on the closed-form Gaussian-mixture testbed, and the gen-data -> train -> generate.py --schedule path on a
tiny network. LPIPS itself is tested in test_lpips.py."""

import math
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import ld3 as ld3_cli
from samplers import ld3, load_schedule_file, make_grid, sample
from samplers.gaussian_mixture import GaussianMixture
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
    """Teacher: UniPC-3 with 100 logSNR steps (~1e-6 from the exact ODE); 1500 noises to learn from (500 train,
    1000 validation: mode switches are ~1 % events, a small validation split cannot see them); 2000 held out."""
    gmm = GaussianMixture()
    latents = torch.randn(3500, 64, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    teacher_grid = make_grid("logsnr", 100, 0.002, 80.0, end="sigma_min")
    images = ld3.teacher_samples(gmm, latents, teacher_grid, solver="unipc", batch_size=3500)
    data = ld3.TeacherData(latents=latents[:1500], images=images[:1500],
                           info={"sigmas": teacher_grid.sigmas.tolist()})
    return gmm, data, latents[1500:], images[1500:]


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
    assert result.train_time_s < 60
    baseline = held_out_rms(gmm, make_grid("edm", nfe, 0.002, 80.0, end="sigma_min"), solver, test_latents,
                            test_images)
    learned = held_out_rms(gmm, result.grid, solver, test_latents, test_images)
    print(f"{solver} NFE {nfe}: held-out RMS edm7 {baseline:.4f}, LD3 {learned:.4f} ({learned / baseline:.2f}), "
          f"{result.train_time_s:.1f} s")
    assert learned <= 0.7 * baseline, (learned, baseline)
    assert result.best_valid_loss < result.init_valid_loss


# L2 on mode switches is a rare-event objective: larger batches and learning rate than LD3's CIFAR recipe (2, 5e-3),
# the hard objective (a soft validation set hides switches), and edm as the starting grid.
MIXTURE_CONFIG = dict(num_train=500, num_valid=1000, batch_size=50, lr_logits=0.03, init="edm", prior_bound=0.0)


def test_soft_bound_keeps_noises_in_ball_and_schedule_file_round_trips(small_mixture, tmp_path):
    gmm, data = small_mixture
    test_latents = data.latents[24:]
    config = ld3.LD3Config(solver="dpmpp_3m", nfe=5, loss="l1", num_train=12, num_valid=12, batch_size=4,
                           rounds_v1=1, rounds_v2=1, prior_bound=0.05, shift_lr=50.0)
    logged = []
    result = ld3.train_ld3(gmm, data, config, log=logged.append)
    assert len(logged) == 2 and "LD3 round 2/2 (v2)" in logged[1]
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
    with pytest.raises(ValueError, match="fewer than num_train"):
        ld3.train_ld3(gmm, data, ld3.LD3Config(loss="l2", num_train=30, num_valid=20))
    with pytest.raises(ValueError, match="at least 3"):
        ld3.train_ld3(gmm, data, ld3.LD3Config(solver="euler", nfe=2, loss="l2", num_train=4, num_valid=4))
    with pytest.raises(ValueError, match="does not take option"):
        ld3.train_ld3(gmm, data, ld3.LD3Config(solver="euler", nfe=4, loss="l2", num_train=4, num_valid=4,
                                                     solver_kwargs={"order": 2}))
    with pytest.raises(ValueError, match="S_churn"):
        ld3.student_sample(gmm, data.latents[:2], edm_levels(4), solver="heun", S_churn=10)


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
    assert torch.allclose(data.images, expected.float(), atol=1e-6)  # per-seed noises as generate.py draws them
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
    result = runner.invoke(ld3_cli.cli, ["gen-data", "--network", network_pickle, "--out", teacher, "--seeds", "0-23",
                                         "--batch", "24", "--device", "cpu"])
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
    assert result.exit_code != 0 and "fewer than num_train" in result.output
    result = runner.invoke(ld3_cli.cli, [*base, "--solver", "ipndm", "--nfe", "4", "--order", "2", "--lpips-vgg",
                                     str(tmp_path / "none.pth")])
    assert result.exit_code != 0 and "could not fetch the LPIPS VGG16 weights" in result.output
    assert not os.path.exists(tmp_path / "s.json")
    result = runner.invoke(ld3_cli.cli, ["train", "--data", str(tmp_path / "missing.pt"), "--out", "x.json",
                                     "--solver", "euler", "--nfe", "4"])
    assert result.exit_code != 0 and "teacher data file not found" in result.output


def test_python_m_samplers_ld3_is_the_cli():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "samplers.ld3", "train", "--help"], cwd=root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: python -m samplers.ld3 train" in result.stdout and "--solver-opt" in result.stdout
