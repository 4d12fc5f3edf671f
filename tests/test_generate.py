"""Seeds -> images (samplers/generation.py) and the generate.py CLI: EDM parity, seeding, sharding, resume, PNGs."""

import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import types

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from launch import torchrun

import generate
from samplers import make_grid
from samplers.generation import (
    SamplerConfig,
    generate_images,
    image_path,
    parse_int_list,
    rank_batches,
    sample_seeds,
    save_image_grid,
    write_images,
)
from torch_utils import persistence
from training.preconditioning import EDMPrecond

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_net(label_dim=0, channels=3, **kwargs):
    """An 8x8 EDMPrecond(SongUNet) with random (not near-zero) weights, so the network shapes the images."""
    net = EDMPrecond(img_resolution=8, img_channels=channels, label_dim=label_dim, model_type="SongUNet",
                     model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0, **kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return net.eval().requires_grad_(False)


class Recorder(torch.nn.Module):
    """Wraps a network and records its calls (batch size, class labels)."""

    def __init__(self, net, fail_after=None):
        super().__init__()
        self.net, self.fail_after, self.calls = net, fail_after, []
        for name in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max"):
            setattr(self, name, getattr(net, name))

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((x.shape[0], None if class_labels is None else class_labels.clone()))
        return self.net(x, sigma, class_labels)


def collect(net, seeds, **kwargs):
    kwargs.setdefault("device", "cpu")
    out = {}
    for batch_seeds, images in generate_images(net, seeds, **kwargs):
        assert images.dtype == torch.uint8 and images.shape[1:] == (net.img_channels, 8, 8)
        out.update(zip(batch_seeds, images))
    return out


def test_parse_int_list():
    assert parse_int_list("1,2,5-10") == [1, 2, 5, 6, 7, 8, 9, 10]
    assert parse_int_list("0-3") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot parse 'x'"):
        parse_int_list("1,x")
    with pytest.raises(ValueError, match="cannot parse '5-3' in '0,5-3': a range N-M needs M >= N"):
        parse_int_list("0,5-3")


@pytest.mark.parametrize("seeds, message", [("1,1,2", "seed 1 given more than once"),
                                            ("0-9,5-20,3", "seed 3, 5, 6, 7 and 8 ... given more than once"),
                                            ("4294967296", "seeds must be below 2^32"),
                                            ("5-3", "a range N-M needs M >= N")])
def test_seeds_that_would_repeat_an_image_are_refused(seeds, message):
    import generate

    result = CliRunner().invoke(generate.main, ["--network", "unused.pkl", "--outdir", "unused", "--seeds", seeds])
    assert result.exit_code == 2 and message in result.output and "--seeds" in result.output, result.output


@pytest.mark.parametrize(("num_seeds", "batch", "world"),
                         [(10, 4, 1), (10, 4, 2), (7, 64, 3), (1000, 64, 8), (3, 2, 4)])
def test_rank_batches_follow_edm(num_seeds, batch, world):
    seeds = list(range(100, 100 + num_seeds))
    num_batches = math.ceil(num_seeds / (batch * world)) * world
    chunks = np.array_split(np.array(seeds), num_batches)  # same split as torch.tensor_split
    per_rank = [rank_batches(seeds, batch, rank, world) for rank in range(world)]
    for rank in range(world):
        assert per_rank[rank] == [c.tolist() for c in chunks[rank::world]]
        assert len(per_rank[rank]) == num_batches // world and all(len(b) <= batch for b in per_rank[rank])
    assert sorted(s for batches in per_rank for b in batches for s in b) == seeds


@pytest.mark.parametrize("label_dim", [0, 3])
def test_images_depend_only_on_seed(label_dim):
    net = tiny_net(label_dim)
    kwargs = dict(solver="dpmpp_3m", num_steps=5)
    one = collect(net, [5, 3, 8, 0], batch_size=1, **kwargs)
    four = collect(net, [0, 8, 3, 5], batch_size=4, **kwargs)
    shard = collect(net, [5, 3, 8, 0], batch_size=1, rank=1, world_size=2, **kwargs)
    assert sorted(one) == [0, 3, 5, 8] and len(shard) == 2
    for seed in one:
        assert torch.equal(one[seed], four[seed])
    for seed in shard:
        assert torch.equal(shard[seed], one[seed])
    assert not torch.equal(one[0], one[3])


def edm_reference(net, seeds, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0,
                  S_max=float("inf"), S_noise=1, class_idx=None):
    """EDM's generate.py for one batch written out independently: per-seed generators (latent, then label),
    Algorithm 2 on the rho grid clamped to the net's range, round_sigma, t_N = 0, EDM's uint8 conversion."""
    gens = [torch.Generator().manual_seed(s % (1 << 32)) for s in seeds]
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    latents = torch.stack([torch.randn(shape, generator=g) for g in gens])
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim)[torch.stack([torch.randint(net.label_dim, size=[], generator=g)
                                                       for g in gens])]
        if class_idx is not None:
            labels = torch.zeros_like(labels)
            labels[:, class_idx] = 1
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([net.round_sigma(t), torch.zeros(1, dtype=torch.float64)])
    x = latents.to(torch.float64) * t[0]
    for n in range(num_steps):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t[n] <= S_max else 0
        t_hat = net.round_sigma(t[n] + gamma * t[n])
        noise = torch.stack([torch.randn(shape, dtype=torch.float64, generator=g) for g in gens])
        x_hat = x + (t_hat**2 - t[n] ** 2).sqrt() * S_noise * noise
        d = (x_hat - net(x_hat, t_hat, labels).to(torch.float64)) / t_hat
        x = x_hat + (t[n + 1] - t_hat) * d
        if n < num_steps - 1:
            d2 = (x - net(x, t[n + 1], labels).to(torch.float64)) / t[n + 1]
            x = x_hat + (t[n + 1] - t_hat) * (0.5 * d + 0.5 * d2)
    return x, (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


@pytest.mark.parametrize(("options", "class_idx"), [
    ({}, None),
    ({"num_steps": 6, "S_churn": 40, "S_min": 0.05, "S_max": 50, "S_noise": 1.003}, 2),
])
def test_default_path_equals_edm(options, class_idx):
    net = tiny_net(label_dim=3, sigma_min=0.01, sigma_max=50.0)  # a range that EDM's clamp must respect
    seeds = [4, 17, 2]
    reference_x, reference_images = edm_reference(net, seeds, class_idx=class_idx, **options)
    solver_kwargs = {k: v for k, v in options.items() if k.startswith("S_")}
    config = SamplerConfig(num_steps=options.get("num_steps"), solver_kwargs=solver_kwargs)
    x = sample_seeds(net, seeds, config, class_idx=class_idx, device="cpu")
    assert torch.equal(x, reference_x)  # bit-identical float64
    images = collect(net, seeds, batch_size=2, class_idx=class_idx, num_steps=options.get("num_steps"),
                     solver_kwargs=solver_kwargs)
    for index, seed in enumerate(seeds):
        assert torch.equal(images[seed], reference_images[index])


def test_class_labels():
    recorder = Recorder(tiny_net(label_dim=4))
    seeds = [0, 1, 2, 3, 4, 5]
    collect(recorder, seeds, batch_size=6, num_steps=2, solver="euler")
    drawn = []
    for seed in seeds:  # the label is drawn after the latent, from the same per-seed generator
        g = torch.Generator().manual_seed(seed)
        torch.randn([3, 8, 8], generator=g)
        drawn.append(int(torch.randint(4, size=[], generator=g)))
    labels = recorder.calls[0][1]
    assert torch.equal(labels, torch.eye(4)[drawn])
    recorder.calls.clear()
    collect(recorder, seeds, batch_size=6, num_steps=2, solver="euler", class_idx=3)
    assert torch.equal(recorder.calls[0][1], torch.eye(4)[[3] * 6])
    with pytest.raises(ValueError, match="network is unconditional"):
        collect(tiny_net(), seeds, class_idx=1)
    with pytest.raises(ValueError, match="out of range"):
        collect(recorder, seeds, class_idx=4)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_interrupted_run_resumes(tmp_path):
    seeds = list(range(10))
    kwargs = dict(batch_size=3, num_steps=3, solver="heun", device="cpu", progress=False)
    clean = str(tmp_path / "clean")
    assert write_images(tiny_net(), seeds, clean, **kwargs) == {"written": 10, "skipped": 0}

    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):  # killed during the third batch (5 NFE per batch)
        write_images(Recorder(tiny_net(), fail_after=12), seeds, out, **kwargs)
    done = sorted(os.listdir(out))
    assert done == [f"{s:06d}.png" for s in range(6)]  # finished batches only, no temporary files left
    before = {name: (os.stat(os.path.join(out, name)).st_ino, os.stat(os.path.join(out, name)).st_mtime_ns)
              for name in done}
    os.remove(os.path.join(out, "000004.png"))  # a hole in the middle is filled too

    recorder = Recorder(tiny_net())
    assert write_images(recorder, seeds, out, **kwargs) == {"written": 5, "skipped": 5}
    assert sum(batch for batch, _ in recorder.calls) == 5 * 5  # only the 5 missing seeds were sampled
    for name, stat in before.items():
        if name != "000004.png":
            assert (os.stat(os.path.join(out, name)).st_ino, os.stat(os.path.join(out, name)).st_mtime_ns) == stat
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))
    for name in os.listdir(clean):
        assert digest(os.path.join(out, name)) == digest(os.path.join(clean, name))
    recorder.calls.clear()
    assert write_images(recorder, seeds, out, **kwargs) == {"written": 0, "skipped": 10} and not recorder.calls


def test_png_files(tmp_path):
    gray = tiny_net(channels=1)
    seeds = [999, 1000, 2500]
    write_images(gray, seeds, str(tmp_path), subdirs=True, batch_size=4, num_steps=2, solver="euler", device="cpu",
                 progress=False)
    expected = ["000000/000999.png", "001000/001000.png", "002000/002500.png"]
    assert [os.path.relpath(image_path(str(tmp_path), s, True), tmp_path) for s in seeds] == expected
    images = collect(gray, seeds, batch_size=4, num_steps=2, solver="euler")
    for seed, rel in zip(seeds, expected):
        png = PIL.Image.open(tmp_path / rel)
        assert png.mode == "L" and png.size == (8, 8)
        assert np.array_equal(np.asarray(png), images[seed][0].numpy())
    rows, columns = save_image_grid(str(tmp_path), seeds, str(tmp_path / "grid.png"), subdirs=True, scale=1, gap=0)
    grid = np.asarray(PIL.Image.open(tmp_path / "grid.png"))
    assert (rows, columns) == (2, 2) and grid.shape == (16, 16)
    assert np.array_equal(grid[8:, :8], images[2500][0].numpy()) and (grid[8:, 8:] == 255).all()  # empty: white
    # A complete PNG of another size left in the folder (counted as done): a one-line error naming it, not numpy's
    # "could not broadcast".
    PIL.Image.new("L", (16, 16)).save(tmp_path / expected[1])
    with pytest.raises(ValueError, match=r"001000\.png has shape \(16, 16\) \(H, W\[, C\]\), but .*000999\.png has "
                                         r"\(8, 8\): the folder mixes images of different sizes"):
        save_image_grid(str(tmp_path), seeds, str(tmp_path / "grid.png"), subdirs=True)


@pytest.mark.parametrize("channels, mode", [(2, "LA"), (4, "RGBA")])
def test_png_files_with_alpha(tmp_path, channels, mode):
    """train.py trains on grey + alpha and RGBA PNGs: their networks' images are written in those modes (they failed
    with PIL's "Invalid mode for data type" after the sampling, as in EDM's generate.py)."""
    net = tiny_net(channels=channels)
    write_images(net, [0, 1], str(tmp_path), batch_size=2, num_steps=2, solver="euler", device="cpu", progress=False)
    images = collect(net, [0, 1], batch_size=2, num_steps=2, solver="euler")
    png = PIL.Image.open(tmp_path / "000001.png")
    assert png.mode == mode and png.size == (8, 8)
    assert np.array_equal(np.asarray(png), images[1].permute(1, 2, 0).numpy())
    save_image_grid(str(tmp_path), [0, 1], str(tmp_path / "grid.png"), scale=1, gap=0)
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert grid.mode == mode and np.array_equal(np.asarray(grid)[:8, 8:], images[1].permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def network_pickle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("net") / "network-snapshot-000000.pkl")
    persistence.save_network_pickle(path, dict(ema=tiny_net()))
    return path



def test_cli_ctrl_c_says_the_images_are_kept(network_pickle, tmp_path, monkeypatch):
    """Ctrl-C during sampling: exit 130 (the shell's code for SIGINT) with how to continue, not click's "Aborted!"."""
    written = []

    def interrupted(net, seeds, outdir, **kwargs):
        written.append(outdir)
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "write_images", interrupted)
    outdir = str(tmp_path / "out")
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", outdir, "--seeds", "0-4",
                                                "--device", "cpu"])
    assert written == [outdir] and result.exit_code == 130, result.output
    assert f'Interrupted. The images in "{outdir}" are complete; run the same command again' in result.output
    assert "Aborted" not in result.output

def test_cli_writes_edm_images(network_pickle, tmp_path):
    outdir = str(tmp_path / "out")
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", outdir, "--seeds", "0-4",
                                                "--batch", "3", "--device", "cpu", "--grid", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    assert "solver=heun" in result.output and "end=zero" in result.output and "35 NFE per image" in result.output
    assert sorted(os.listdir(outdir)) == [f"{s:06d}.png" for s in range(5)] + ["generation.json"]
    net = persistence.load_network_pickle(network_pickle)["ema"]
    _, reference = edm_reference(net, [0, 1, 2, 3, 4])
    for seed in range(5):
        png = np.asarray(PIL.Image.open(os.path.join(outdir, f"{seed:06d}.png")))
        assert png.shape == (8, 8, 3) and np.array_equal(png, reference[seed].permute(1, 2, 0).numpy())
    # 5 tiles of 8x8, enlarged 8x to 64 px, in 3 columns and 2 rows with 2-pixel white gaps.
    grid = np.asarray(PIL.Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 64 + 3 * 2, 3 * 64 + 4 * 2, 3)
    assert np.array_equal(grid[2:66, 2:66], np.asarray(PIL.Image.open(os.path.join(outdir, "000000.png"))).repeat(
        8, axis=0).repeat(8, axis=1)) and (grid[:2] == 255).all() and (grid[68:132, 134:198] == 255).all()

    # The same settings again: a resume, only the new seed is sampled.
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", outdir, "--seeds", "0-5",
                                                "--batch", "3", "--device", "cpu"])
    assert result.exit_code == 0 and "Wrote 1 images, skipped 5" in result.output, result.output
    # Another sampler into the same folder: refused in one line (the folder records what made its images) ...
    unipc = ["--network", network_pickle, "--outdir", outdir, "--seeds", "0-5", "--device", "cpu", "--solver", "unipc",
             "--steps", "4", "--order", "2", "--variant", "bh2"]
    before = open(os.path.join(outdir, "000000.png"), "rb").read()
    result = CliRunner().invoke(generate.main, unipc)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "holds images made with other settings (these differ: settings." in errors[0]
    assert "settings.solver," in errors[0] and "use another --outdir, or --overwrite to replace them" in errors[0]
    assert open(os.path.join(outdir, "000000.png"), "rb").read() == before
    # ... or regenerated with --overwrite.
    result = CliRunner().invoke(generate.main, [*unipc, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "solver=unipc(order=2, variant=bh2)" in result.output and "end=sigma_min" in result.output
    assert "4 NFE per image" in result.output and "Wrote 6 images, skipped 0" in result.output
    assert open(os.path.join(outdir, "000000.png"), "rb").read() != before
    record = json.load(open(os.path.join(outdir, "generation.json")))
    assert record["settings"]["solver"] == "unipc" and len(record["network_sha256"]) == 64
    assert record["settings"]["solver_options"] == {"order": 2, "variant": "bh2", "lower_order_final": True,
                                                   "corrector": True}
    # Another network with the same sampler: refused too.
    other = str(tmp_path / "other.pkl")
    other_net = tiny_net()
    with torch.no_grad():
        next(other_net.parameters()).add_(1)
    persistence.save_network_pickle(other, dict(ema=other_net))
    result = CliRunner().invoke(generate.main, [*unipc[:1], other, *unipc[2:]])
    assert result.exit_code == 1
    assert "holds images made with other settings (these differ: network_sha256" in result.output
    assert "earlier version" not in result.output
    # A record without entries that later versions write (an earlier version's): refused, and said why.
    del record["precision"], record["compile"]
    with open(os.path.join(outdir, "generation.json"), "w") as f:
        json.dump(record, f)
    result = CliRunner().invoke(generate.main, unipc)
    assert result.exit_code == 1
    assert ("(these differ: compile, precision; see" in result.output
            and "; that record, written by an earlier version, has no compile, precision; use another --outdir"
            in " ".join(result.output.split())), result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--class", "1"], "unconditional"),
    (["--order", "2"], "--order does not apply to solver 'heun'"),
    (["--solver", "unipc", "--variant", "taylor"], "--variant for solver 'unipc' must be one of bh1, bh2"),
    (["--schedule", "logsnr", "--rho", "3"], "--rho applies to schedules edm and vp_time_uniform"),
    (["--schedule", "nonexistent"], "neither a schedule name"),
    (["--seeds", "1-x"], "cannot parse"),
    (["--solver", "euler", "--S_churn", "10"], "--S_churn does not apply to solver 'euler'"),
])
def test_cli_errors(network_pickle, tmp_path, args, message):
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", str(tmp_path), "--device",
                                                "cpu", *args])
    assert result.exit_code != 0 and message in result.output, result.output


def test_cli_empty_network_is_one_line(tmp_path):
    # --network= (an empty value): open_url's ValueError was a traceback.
    result = CliRunner().invoke(generate.main, ["--network=", "--outdir", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert "Error: open_url expects a path or URL string, got ''" in result.output, result.output


def test_cli_schedule_file(network_pickle, tmp_path):
    from samplers import save_schedule_file
    path = str(tmp_path / "ld3.json")
    save_schedule_file(path, make_grid("logsnr", 4, 0.002, 80, end="sigma_min").sigmas, solver="ipndm", nfe=4,
                       solver_kwargs={"max_order": 3})
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", str(tmp_path / "a"),
                                                "--seeds", "0-1", "--device", "cpu", "--schedule", path])
    assert result.exit_code == 0, result.output
    assert "solver=ipndm(max_order=3)" in result.output and "4 NFE per image" in result.output
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", str(tmp_path / "b"),
                                                "--device", "cpu", "--schedule", path, "--solver", "euler"])
    assert result.exit_code != 0 and "learned for solver 'ipndm'" in result.output
    # LD3's own .pt vector records no solver: --solver is required, and LD3's options are the defaults.
    sigmas = make_grid("logsnr", 4, 0.002, 80, end="sigma_min").sigmas
    torch.save({"best_t_steps": torch.cat([sigmas, sigmas])}, tmp_path / "best_v2.pt")
    args = ["--network", network_pickle, "--outdir", str(tmp_path / "c"), "--seeds", "0", "--device", "cpu",
            "--schedule", str(tmp_path / "best_v2.pt")]
    result = CliRunner().invoke(generate.main, args)
    assert result.exit_code != 0 and "pass --solver" in result.output
    result = CliRunner().invoke(generate.main, [*args, "--solver", "ipndm"])
    assert result.exit_code == 0 and "solver=ipndm(max_order=3)" in result.output, result.output
    assert "(decoupled evaluation grid)" in result.output and os.path.isfile(tmp_path / "c" / "000000.png")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_match_one(network_pickle, tmp_path):
    seeds = "0-6"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    command = torchrun(2, os.path.join(ROOT, "generate.py"), "--network", network_pickle, "--outdir", tmp_path / "two",
                       "--seeds", seeds, "--batch", "2", "--device", "cpu", "--solver", "dpmpp_2m", "--steps", "5")
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "on 2 rank(s)" in result.stdout and "Wrote 7 images" in result.stdout
    net = persistence.load_network_pickle(network_pickle)["ema"]
    write_images(net, seeds, str(tmp_path / "one"), batch_size=5, solver="dpmpp_2m", num_steps=5, device="cpu",
                 progress=False)
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(set(os.listdir(tmp_path / "two")) - {"generation.json"}) and len(names) == 7
    for name in names:
        assert digest(tmp_path / "one" / name) == digest(tmp_path / "two" / name)


def test_schedule_file_options_overridden_with_a_warning(tmp_path):
    from samplers import save_schedule_file
    from samplers.generation import SamplerConfig, build_grid

    path = str(tmp_path / "learned.json")
    save_schedule_file(path, make_grid("logsnr", 4, 0.002, 80, end="sigma_min").sigmas, solver="ipndm", nfe=4,
                       solver_kwargs={"max_order": 3})
    net = types.SimpleNamespace(sigma_min=0.0, sigma_max=float("inf"), round_sigma=lambda s: s)
    _, solver, kwargs = build_grid(net, SamplerConfig(schedule=path))
    assert solver == "ipndm" and kwargs == {"max_order": 3}
    with pytest.warns(UserWarning, match=r"learned with max_order=3; overriding with max_order=4"):
        _, _, kwargs = build_grid(net, SamplerConfig(schedule=path, solver_kwargs={"max_order": 4}))
    assert kwargs == {"max_order": 4}


def test_cli_solver_opt_and_the_old_flags_are_one_option(network_pickle, tmp_path):
    """--solver-opt NAME=VALUE sets any option of the solver, typed from its signature; the old flags are its aliases
    (--order is iPNDM's max_order) and write the same images."""
    common = ["--network", network_pickle, "--seeds", "0-1", "--device", "cpu", "--steps", "4"]
    cases = {
        "flags": ["--solver", "unipc", "--order", "2", "--variant", "bh2", "--lower-order-final", "below10"],
        "opts": ["--solver", "unipc", "--solver-opt", "order=2,variant=bh2", "--solver-opt", "lower_order_final=10"],
        "default": ["--solver", "unipc"],
        "ipndm-flag": ["--solver", "ipndm", "--order", "3"],
        "ipndm-alias": ["--solver", "ipndm", "--solver-opt", "order=3"],
        "ipndm-name": ["--solver", "ipndm", "--solver-opt", "max_order=3"],
    }
    digests = {}
    for name, args in cases.items():
        result = CliRunner().invoke(generate.main, [*common, "--outdir", str(tmp_path / name), *args])
        assert result.exit_code == 0, result.output
        digests[name] = [digest(tmp_path / name / f"{s:06d}.png") for s in (0, 1)]
        if name in ("flags", "opts"):
            assert "solver=unipc(lower_order_final=10, order=2, variant=bh2)" in result.output
        if name.startswith("ipndm"):
            assert "solver=ipndm(max_order=3)" in result.output
    assert digests["flags"] == digests["opts"] != digests["default"]
    assert digests["ipndm-flag"] == digests["ipndm-alias"] == digests["ipndm-name"]


@pytest.mark.parametrize(("args", "message"), [
    (["--solver", "unipc", "--solver-opt", "variant=bh3"], "--solver-opt variant=bh3: expected one of bh1, bh2"),
    (["--solver", "unipc", "--solver-opt", "order=two"], "--solver-opt order=two: expected an integer"),
    (["--solver", "unipc", "--solver-opt", "corrector=maybe"], "expected true or false"),
    (["--solver", "unipc", "--order", "2", "--solver-opt", "order=3"], "both set unipc's option 'order'"),
    (["--solver", "heun", "--solver-opt", "S_churn"], "--solver-opt expects NAME=VALUE"),
    (["--solver", "heun", "--solver-opt", "rho=3"], "'rho' is not an option of solver 'heun'"),
    (["--solver", "dpmpp_2m", "--variant", "bh2"], "--variant for solver 'dpmpp_2m' must be one of dpmsolver, taylor"),
    (["--solver", "rk45"], "unknown solver 'rk45'"),
])
def test_cli_solver_option_errors(network_pickle, tmp_path, args, message):
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", str(tmp_path), "--device",
                                                "cpu", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not os.path.exists(tmp_path / "000000.png")


def test_library_does_not_import_the_clis():
    """Layering: the command-line scripts at the top (generate.py, fid.py, ld3.py, train.py, ...) import the
    packages, never the other way round. A package's __main__.py is itself a command line (python -m)."""
    import ast

    clis = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    offenders = []
    for package in ("dnnlib", "torch_utils", "training", "losses", "processes", "samplers", "metrics"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py") or name == "__main__.py":
                    continue
                path = os.path.join(folder, name)
                for node in ast.walk(ast.parse(pathlib.Path(path).read_text(), path)):
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                    offenders += [f"{os.path.relpath(path, ROOT)} imports {m}" for m in modules
                                  if m.split(".")[0] in clis]
    assert clis >= {"generate", "fid", "ld3", "train"} and not offenders, offenders


# ---------------------------------------------------------------------------------------------------------------------
# EDM's generate.py options as aliases (issue 19): --disc, --schedule=linear, --scaling=none, --solver=euler|heun.


def edm_ablation_steps(disc, num_steps, sigma_min=None, sigma_max=None, rho=7.0, epsilon_s=1e-3, C_1=0.001,
                       C_2=0.008, M=1000):
    """The noise levels of EDM's ablation sampler (Karras et al. 2022, Table 1 and its code) for --disc, written out
    here in NumPy: VP sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) at t = 1 ... epsilon_s (beta's re-derived so
    that sigma(1) = sigma_max, sigma(epsilon_s) = sigma_min), VE sigma(t) = sqrt(t) at t geometric from sigma_max^2 to
    sigma_min^2, iDDPM's u_j table picked at rounded even indices, EDM's rho grid; then t_N = 0."""
    def vp_sigma(beta_d, beta_min, t):
        return np.sqrt(np.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)

    defaults = {"vp": (vp_sigma(19.9, 0.1, epsilon_s), vp_sigma(19.9, 0.1, 1.0)), "ve": (0.02, 100.0),
                "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[disc]
    sigma_min = defaults[0] if sigma_min is None else sigma_min
    sigma_max = defaults[1] if sigma_max is None else sigma_max
    i = np.arange(num_steps, dtype=np.float64)
    if disc == "vp":
        beta_d = 2 * (np.log(sigma_min**2 + 1) / epsilon_s - np.log(sigma_max**2 + 1)) / (epsilon_s - 1)
        beta_min = np.log(sigma_max**2 + 1) - 0.5 * beta_d
        levels = vp_sigma(beta_d, beta_min, 1 + i / (num_steps - 1) * (epsilon_s - 1))
    elif disc == "ve":
        levels = np.sqrt(sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (i / (num_steps - 1)))
    elif disc == "iddpm":  # alpha_bar in float32 (EDM's integer-tensor index makes torch compute it so)
        def alpha_bar(j):
            return (0.5 * np.pi * torch.tensor(j) / M / (C_2 + 1)).sin() ** 2

        u = np.zeros(M + 1)
        for j in range(M, 0, -1):
            ratio = float((alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1))
            u[j - 1] = np.sqrt((u[j] ** 2 + 1) / ratio - 1)
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        levels = u[np.round((len(u) - 1) / (num_steps - 1) * i).astype(int)]
    else:
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        levels = (a + i / (num_steps - 1) * (b - a)) ** rho
    return np.append(levels, 0.0)


def _edm_cli_config(**flags):
    from samplers.cli_options import sampler_config
    args = dict(solver=None, schedule=None, num_steps=None, sigma_min=None, sigma_max=None, rho=None, end=None)
    return sampler_config(**{**args, **flags})


def test_multistep_solvers_refuse_levels_that_round_sigma_repeats():
    """An iDDPM network snaps sigma onto its 1000-level table, sparse at high sigma: from 60 EDM steps two
    neighbouring levels coincide (64.16 twice). DPM-Solver++ and UniPC divide by the step in log sigma (NaN images
    before); Heun, Euler and iPNDM take it as a zero step, as EDM."""
    from samplers.generation import SamplerConfig, build_grid
    from training.preconditioning import iDDPMPrecond
    net = iDDPMPrecond(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1],
                       num_blocks=1, attn_resolutions=[])
    grid, _, _ = build_grid(net, SamplerConfig(solver="heun", num_steps=60, end="sigma_min"))
    levels = grid.sigmas[grid.sigmas > 0]
    assert int((levels[1:] == levels[:-1]).sum()) >= 1  # the repeat exists
    for solver in ("dpmpp_2m", "dpmpp_3m", "unipc"):
        with pytest.raises(ValueError, match=rf"solver '{solver}': the network's discrete noise levels .* make the "
                                             r"60-step edm grid repeat sigma = 64\.1"):
            build_grid(net, SamplerConfig(solver=solver, num_steps=60))
        build_grid(net, SamplerConfig(solver=solver, num_steps=40))  # distinct levels: fine
    for solver in ("euler", "ipndm"):
        build_grid(net, SamplerConfig(solver=solver, num_steps=60))


@pytest.mark.parametrize("disc", ["vp", "ve", "iddpm", "edm"])
@pytest.mark.parametrize("extra", [{}, {"schedule": "linear", "scaling": "none"}, {"sigma_min": 0.01, "sigma_max": 50}])
def test_edm_disc_grids_equal_edm_formulas(disc, extra):
    from samplers.generation import build_grid
    net = types.SimpleNamespace(sigma_min=0.0, sigma_max=float("inf"), round_sigma=lambda s: s)
    for solver, steps in [("euler", 6), ("heun", 13)]:
        config = _edm_cli_config(disc=disc, solver=solver, num_steps=steps, **extra)
        grid, used, kwargs = build_grid(net, config)
        expected = edm_ablation_steps(disc, steps, extra.get("sigma_min"), extra.get("sigma_max"))
        assert used == solver and kwargs == {} and grid.end == "zero"
        np.testing.assert_allclose(grid.sigmas.numpy(), expected, rtol=1e-12, atol=0)
    if not extra:  # edm.md's ranges: VP sigma(epsilon_s) = 0.0105 ... sigma(1) = 152.2; iDDPM's u_(M-1) = 0.00642
        first, last = {"vp": (152.2, 0.0105), "ve": (100, 0.02), "iddpm": (81, 0.00642), "edm": (80, 0.002)}[disc]
        assert grid.sigmas[0].item() == pytest.approx(first, rel=2e-2 if disc == "iddpm" else 1e-3)
        assert grid.sigmas[-2].item() == pytest.approx(last, rel=5e-3)  # the docs round to 3 digits


def edm_ablation_sample(net, latents, t_steps, solver, alpha=1.0):
    """EDM's ablation_sampler's loop with --schedule=linear --scaling=none (sigma(t) = t, s(t) = 1: sigma' = 1,
    s' = 0), deterministic: the general update dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma D(x / s; sigma), a
    second stage at t + alpha h with weights (1 - 1/(2 alpha), 1/(2 alpha)), and always Euler on the last step."""
    def sigma(t):
        return t

    def slope(x, t):
        denoised = net(x, sigma(t)).to(torch.float64)
        return (1.0 / sigma(t) + 0.0) * x - 1.0 * 1.0 / sigma(t) * denoised

    t_steps = torch.as_tensor(t_steps, dtype=torch.float64)
    x = latents.to(torch.float64) * sigma(t_steps[0])
    num_steps = len(t_steps) - 1
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        h = t_next - t_cur
        d_cur = slope(x, t_cur)
        if solver == "euler" or i == num_steps - 1:
            x = x + h * d_cur
        else:
            x_prime, t_prime = x + alpha * h * d_cur, t_cur + alpha * h
            x = x + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * slope(x_prime, t_prime))
    return x


@pytest.mark.parametrize(("solver", "disc"), [("euler", "vp"), ("heun", "iddpm"), ("euler", "edm"), ("heun", "ve")])
def test_edm_solvers_on_disc_grids_equal_edm_ablation_sampler(solver, disc):
    net = tiny_net()
    seeds = [3, 11]
    config = _edm_cli_config(disc=disc, solver=solver, num_steps=5)
    x = sample_seeds(net, seeds, config, device="cpu")
    latents = torch.stack([torch.randn([3, 8, 8], generator=torch.Generator().manual_seed(s)) for s in seeds])
    reference = edm_ablation_sample(net, latents, edm_ablation_steps(disc, 5), solver)
    # The solvers' float64 arithmetic differs in rounding (1e-16), and the network casts its input to float32: where
    # such a difference crosses a float32 rounding boundary the outputs move by ~1e-7 (torch 2.5.1: 1.8e-7 for
    # euler-edm; 2e-16 with 2.14.1). One grid point off by 1e-4 relative moves them by 2.5e-6 to 6.3e-5.
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-6)


def edm_time_ablation_sample(net, latents, sigma_steps, solver, schedule, scaling, sigma_min, sigma_max):
    """EDM's ablation sampler in VP / VE time and with VP scaling (its Figure 2 ODEs), written independently: sigma(t)
    from its definition, sigma' and s' by autograd, sigma^-1 by bisection, VP's beta_d and beta_min from EDM's Eq.
    (sigma(1) = sigma_max, sigma(1e-3) = sigma_min); the update dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma
    D(x / s; sigma), Heun's second stage at t_next, Euler on the last step."""
    eps_s = 1e-3
    beta_d = 2 * (np.log(sigma_min**2 + 1) / eps_s - np.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = np.log(sigma_max**2 + 1) - 0.5 * beta_d

    def sigma(t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if schedule == "vp":
            return (torch.exp(0.5 * beta_d * t**2 + beta_min * t) - 1) ** 0.5
        return t**0.5 if schedule == "ve" else t

    def s(t):
        return (1 + sigma(t) ** 2) ** -0.5 if scaling == "vp" else 1 + 0 * torch.as_tensor(t)

    def derivative(f, t):
        t = torch.as_tensor(t, dtype=torch.float64).clone().requires_grad_(True)
        return torch.autograd.grad(f(t), t)[0].detach()

    def sigma_inv(level):
        low, high = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1e6, dtype=torch.float64)
        for _ in range(200):
            mid = (low + high) / 2
            low, high = (mid, high) if sigma(mid) < level else (low, mid)
        return (low + high) / 2

    def slope(x, t):
        denoised = net(x / s(t), sigma(t)).to(torch.float64)
        return (derivative(sigma, t) / sigma(t) + derivative(s, t) / s(t)) * x - \
            derivative(sigma, t) * s(t) / sigma(t) * denoised

    t_steps = [sigma_inv(torch.tensor(level, dtype=torch.float64)) for level in sigma_steps[:-1]] + [0.0]
    x = latents.to(torch.float64) * sigma(t_steps[0]) * s(t_steps[0])
    for i in range(len(t_steps) - 1):
        h = t_steps[i + 1] - t_steps[i]
        d_cur = slope(x, t_steps[i])
        if solver == "euler" or i == len(t_steps) - 2:
            x = x + h * d_cur
        else:
            x_prime = x + h * d_cur
            x = x + h * (0.5 * d_cur + 0.5 * slope(x_prime, t_steps[i + 1]))
    return x


_TIME_ODE_CASES = [("euler", "vp", "vp", "vp"), ("heun", "edm", "vp", "vp"), ("euler", "ve", "ve", "none"),
                   ("heun", "vp", "vp", "none"), ("heun", "edm", "linear", "vp"), ("heun", "edm", "ve", "vp")]


@pytest.mark.parametrize(("solver", "disc", "schedule", "scaling"), _TIME_ODE_CASES)
def test_edm_ode_in_vp_and_ve_time_equals_an_independent_ablation_sampler(solver, disc, schedule, scaling):
    """EDM's README Figure 2a commands (--solver=euler --disc=vp --schedule=vp --scaling=vp, ...) through the CLI's
    options: the images of EDM's ablation sampler, here written independently (NVlabs/edm's own agrees with ours to
    1e-11 on a float64 stand-in network). A float64 denoiser gives the arithmetic's agreement; the float32 tiny network
    the end-to-end one, where 1-ulp differences in its input cross float32 roundings (5e-6 in VP time with VP
    scaling; VE time with VP scaling divides x by s ~ 1/80 and is left to the float64 check)."""
    from samplers import sample
    from samplers.generation import build_grid
    config = _edm_cli_config(disc=disc, solver=solver, num_steps=5, schedule=schedule, scaling=scaling)
    assert config.solver == f"{solver}_time"
    steps = edm_ablation_steps(disc, 5)
    positive = [level for level in steps if level > 0]
    latents = torch.stack([torch.randn([3, 8, 8], generator=torch.Generator().manual_seed(s)) for s in (3, 11)])

    def smooth(x, sigma, class_labels=None):  # a nonlinear float64 denoiser
        return x * 0.25 / (0.25 + sigma**2) + 0.1 * torch.tanh(x)
    stand_in = types.SimpleNamespace(sigma_min=0.0, sigma_max=float("inf"), round_sigma=lambda s: s)
    grid, solver_name, options = build_grid(stand_in, config)
    x = sample(smooth, latents, grid, solver=solver_name, **options)
    reference = edm_time_ablation_sample(smooth, latents, steps, solver, schedule, scaling, positive[-1], positive[0])
    torch.testing.assert_close(x, reference, rtol=1e-10, atol=1e-10)
    if (schedule, scaling) != ("ve", "vp"):
        net, seeds = tiny_net(), [3, 11]
        x = sample_seeds(net, seeds, config, device="cpu")
        reference = edm_time_ablation_sample(net, latents, steps, solver, schedule, scaling, positive[-1], positive[0])
        torch.testing.assert_close(x, reference, rtol=0, atol=1e-5)
        plain = sample_seeds(net, seeds, _edm_cli_config(disc=disc, solver=solver, num_steps=5), device="cpu")
        assert (plain - x).abs().max() > 1e-3  # another ODE: not the images of the same grid stepped in sigma


def test_the_time_ode_in_sigma_is_euler_and_heun_and_converges_to_the_exact_flow():
    """With sigma(t) = t and s = 1, euler_time / heun_time are euler / heun; in VP or VE time, with or without VP
    scaling, Heun converges to the exact probability-flow solution of Gaussian data (x scales by
    sqrt(c^2 + sigma^2) / sqrt(c^2 + sigma_max^2)): at second order, 4x the steps cut the error at least 8x."""
    from samplers import make_grid, sample
    c = 0.5

    def gaussian(x, sigma, class_labels=None):
        return x * c**2 / (c**2 + sigma**2)
    latents = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = make_grid("edm", 12, 0.002, 80.0)
    for solver in ("euler", "heun"):
        torch.testing.assert_close(sample(gaussian, latents, grid, solver=f"{solver}_time"),
                                   sample(gaussian, latents, grid, solver=solver), rtol=0, atol=1e-13)
    exact = latents * 80 * c / math.sqrt(c**2 + 80**2)
    for schedule, scaling in (("vp", "none"), ("vp", "vp"), ("ve", "none"), ("ve", "vp")):
        errors = [float((sample(gaussian, latents, make_grid("edm", steps, 0.002, 80.0), solver="heun_time",
                                ode_schedule=schedule, ode_scaling=scaling) - exact).abs().max())
                  for steps in (100, 400)]
        assert errors[1] < 2e-3 and errors[1] < errors[0] / 8, (schedule, scaling, errors)


@pytest.mark.parametrize(("flags", "message"), [
    ({"disc": "ve", "schedule": "logsnr"}, "--disc=ve and --schedule=logsnr both choose the time steps"),
    ({"disc": "vp", "schedule": "vp", "solver": "dpmpp_2m"},
     "--schedule=vp (EDM's ablation ODE in another time variable) is stepped by EDM's --solver=euler or heun on a "
     "named grid, not by dpmpp_2m"),
    ({"scaling": "vp", "solver_opt": ("ode_scaling=vp",)},
     "--solver-opt ode_scaling and EDM's --schedule/--scaling both set the time ODE: give one"),
])
def test_edm_combinations_we_cannot_express_are_refused(flags, message):
    import click
    with pytest.raises(click.UsageError, match=re.escape(message)):
        _edm_cli_config(**flags)


def test_edm_options_through_the_cli(network_pickle, tmp_path):
    common = ["--network", network_pickle, "--seeds", "0-1", "--device", "cpu", "--steps", "4"]
    result = CliRunner().invoke(generate.main, [*common, "--outdir", str(tmp_path / "disc"), "--solver", "euler",
                                                "--disc", "vp", "--schedule", "linear", "--scaling", "none"])
    assert result.exit_code == 0, result.output
    assert "solver=euler() schedule=vp steps=4 end=zero sigma=152.2..0.01049 then 0; 4 NFE" in result.output
    # --disc=vp is our --schedule=vp: the same images, and generate.py's folder record accepts one for the other.
    result = CliRunner().invoke(generate.main, [*common, "--outdir", str(tmp_path / "disc"), "--solver", "euler",
                                                "--schedule", "vp"])
    assert result.exit_code == 0 and "Wrote 0 images, skipped 2" in result.output, result.output
    assert "Note: --schedule=vp is the VP time discretisation here (EDM's --disc=vp)" in result.output
    # EDM's own VP sampler (its ODE in VP time with VP scaling, Figure 2a's "Our reimplementation"): Euler in VP time.
    result = CliRunner().invoke(generate.main, [*common, "--outdir", str(tmp_path / "vp"), "--solver", "euler",
                                                "--disc", "vp", "--schedule", "vp", "--scaling", "vp"])
    assert result.exit_code == 0, result.output
    assert ("solver=euler_time(ode_scaling=vp, ode_schedule=vp) schedule=vp steps=4 end=zero sigma=152.2..0.01049 "
            "then 0; 4 NFE") in result.output
    record = json.loads((tmp_path / "vp" / "generation.json").read_text())["settings"]
    assert record["solver"] == "euler_time" and record["solver_options"] == dict(ode_schedule="vp", ode_scaling="vp")


def _pngs(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder)
                  for name in names if name.endswith(".png"))


def test_overwrite_leaves_no_image_of_the_old_settings(network_pickle, tmp_path):
    import generate

    outdir = str(tmp_path / "out")
    base = ["--network", network_pickle, "--outdir", outdir, "--device", "cpu", "--batch", "4"]
    assert CliRunner().invoke(generate.main, [*base, "--seeds", "0-7", "--steps", "2"]).exit_code == 0
    old_seven = pathlib.Path(outdir, "000007.png").read_bytes()
    # Other settings over fewer seeds: the old images of seeds 4-7 go (before, they stayed under the new record,
    # and the next resume skipped them).
    result = CliRunner().invoke(generate.main, [*base, "--seeds", "0-3", "--steps", "4", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert _pngs(outdir) == [f"{s:06d}.png" for s in range(4)]
    result = CliRunner().invoke(generate.main, [*base, "--seeds", "0-7", "--steps", "4"])
    assert result.exit_code == 0 and "Wrote 4 images, skipped 4" in result.output, result.output
    assert pathlib.Path(outdir, "000007.png").read_bytes() != old_seven
    # --subdirs switched under --overwrite: no second copy of each image.
    result = CliRunner().invoke(generate.main, [*base, "--seeds", "0-7", "--steps", "4", "--subdirs", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert _pngs(outdir) == [f"000000/{s:06d}.png" for s in range(8)]
    # Files that are not seed images are left alone; a kill after the record went leaves PNGs without a record,
    # which the next run without --overwrite refuses.
    (tmp_path / "out" / "notes.txt").write_text("mine")
    os.remove(os.path.join(outdir, "generation.json"))
    result = CliRunner().invoke(generate.main, [*base, "--seeds", "0-7", "--steps", "4", "--subdirs"])
    assert result.exit_code == 1 and "PNGs without a record" in result.output
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_settings_that_resolve_alike_resume_and_a_rewritten_schedule_file_does_not(network_pickle, tmp_path):
    import generate
    from samplers import make_grid, save_schedule_file

    outdir = str(tmp_path / "out")
    base = ["--network", network_pickle, "--outdir", outdir, "--device", "cpu", "--seeds", "0-1"]
    assert CliRunner().invoke(generate.main, base).exit_code == 0
    for same in (["--solver", "heun"], ["--steps", "18"], ["--rho", "7"], ["--end", "zero"], ["--sigma_max", "80"],
                 ["--S_churn", "0"], ["--disc", "edm"]):
        result = CliRunner().invoke(generate.main, [*base, *same])
        assert result.exit_code == 0 and "Wrote 0 images, skipped 2" in result.output, (same, result.output)
    result = CliRunner().invoke(generate.main, [*base, "--rho", "5"])
    assert result.exit_code == 1 and "these differ: settings.sigmas;" in result.output, result.output
    for name in ("precision", "compile"):
        extra = ["--precision", "bf16"] if name == "precision" else ["--compile"]
        result = CliRunner().invoke(generate.main, [*base, *extra])
        assert result.exit_code == 1 and f"these differ: {name};" in result.output, result.output

    # A schedule file rewritten at the same path (ld3.py re-run with the same --out) is another grid.
    schedule, scheduled = str(tmp_path / "grid.json"), str(tmp_path / "scheduled")
    save_schedule_file(schedule, make_grid("logsnr", 6, 0.002, 80, end="sigma_min").sigmas, solver="ipndm", nfe=6)
    args = ["--network", network_pickle, "--outdir", scheduled, "--device", "cpu", "--seeds", "0-1",
            "--schedule", schedule]
    assert CliRunner().invoke(generate.main, args).exit_code == 0
    record = json.loads(pathlib.Path(scheduled, "generation.json").read_text())
    assert record["files_sha256"] == [hashlib.sha256(pathlib.Path(schedule).read_bytes()).hexdigest()]
    save_schedule_file(schedule, make_grid("time_quadratic", 6, 0.002, 80, end="sigma_min").sigmas, solver="ipndm",
                       nfe=6)
    result = CliRunner().invoke(generate.main, args)
    assert result.exit_code == 1 and "files_sha256" in result.output and "settings.sigmas" in result.output


def test_a_bad_grid_path_is_refused_before_sampling(network_pickle, tmp_path):
    import generate

    outdir = str(tmp_path / "out")
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", outdir, "--device", "cpu",
                                                "--seeds", "0-1", "--grid", str(tmp_path)])
    assert result.exit_code == 1 and "--grid: " in result.output and "is a folder" in result.output, result.output
    assert not os.path.exists(outdir) or _pngs(outdir) == []
    # Inside a folder dataset the grid would be one of its training images, as samples in an --outdir there.
    dataset = tmp_path / "data"
    (dataset / "00000").mkdir(parents=True)
    (dataset / "dataset.json").write_text('{"labels": null}')
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", outdir, "--device", "cpu",
                                                "--seeds", "0-1", "--grid", str(dataset / "00000" / "grid.png")])
    assert result.exit_code == 1 and (f"--grid: {dataset / '00000' / 'grid.png'} is inside the dataset {dataset} "
                                      f"(its dataset.json), which the grid would join; write it elsewhere"
                                      in result.output), result.output
    assert not os.path.exists(outdir) or _pngs(outdir) == []


def test_png_writers_report_a_failed_write_and_write_the_rest(tmp_path, monkeypatch):
    """PNGs are encoded and written on writer threads while the next batch samples: a write that fails (a full disk)
    stops the run with its one-line error, and no image is left half-written."""
    from dnnlib import util
    from samplers import generation
    save = generation.save_png_atomic

    def failing_save(image, path):
        if path.endswith("000005.png"):
            raise util.OutputPathError(f"cannot write {path} (No space left on device)")
        save(image, path)

    monkeypatch.setattr(generation, "save_png_atomic", failing_save)
    out = str(tmp_path / "out")
    with pytest.raises(util.OutputPathError, match=r"000005\.png \(No space left on device\)"):
        write_images(tiny_net(), list(range(12)), out, batch_size=3, num_steps=2, solver="euler", device="cpu",
                     progress=False)
    names = sorted(os.listdir(out))
    assert "000005.png" not in names and names == [f"{s:06d}.png" for s in range(12) if s != 5][:len(names)]
    for name in names:
        with PIL.Image.open(os.path.join(out, name)) as image:
            assert image.size == (8, 8)


# ---------------------------------------------------------------------------------------------------------------------
# What a run refuses before it claims its output folder, and what it refuses while sampling.


@pytest.mark.parametrize(("args", "message"), [
    # rho = 0.2 loses sigma_min^(1/rho) beside sigma_max^(1/rho): the grid ended 80, 73.8, 64.2, 0, 0 and Heun's
    # NaNs were saved as black PNGs (exit 0).
    (["--steps", "4", "--rho", "0.2"], "the 'edm' schedule for sigma 0.002 ... 80, rho=0.2 gives noise levels that "
                                       "are not finite, positive and decreasing in float64: [80.0, 73.7686, 64.2193, "
                                       "0.0]; choose other --rho / --sigma_min / --sigma_max"),
    (["--rho", "1e-9"], "the 'edm' schedule cannot be computed in float64 for sigma 0.002 ... 80, rho=1e-09"),
    # Options a solver checks when it runs: they failed in the first batch, after generation.json was written, so
    # that the corrected command was refused ("holds images made with other settings").
    (["--solver", "ipndm", "--order", "9"], "iPNDM max_order must be 1, 2, 3 or 4, got 9"),
    (["--solver", "unipc", "--solver-opt", "order=0"], "UniPC order must be >= 1, got 0"),
    (["--cuda-graph"], "Invalid value for --cuda-graph: CUDA graphs need a CUDA device, not cpu (--device)"),
    (["--seeds", "0-4294967296"], "'0-4294967296' in '0-4294967296': values must be below 4294967296"),
])
def test_refused_before_the_output_folder_is_claimed(network_pickle, tmp_path, args, message):
    outdir = tmp_path / "out"
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir", str(outdir), "--device",
                                                "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not outdir.exists()


class NaNAfter(torch.nn.Module):
    """A denoiser whose first call gives NaN for the images whose latents have a negative mean."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        for name in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "round_sigma"):
            setattr(self, name, getattr(net, name))

    def forward(self, x, sigma, class_labels=None):
        out = self.net(x, sigma, class_labels)
        first_call = torch.as_tensor(sigma).max() > 50  # x = 80 * latents
        negative = x.mean(dim=(1, 2, 3), keepdim=True) < 0
        return torch.where(negative & first_call, torch.full_like(out, float("nan")), out)


def test_non_finite_samples_are_refused_by_seed(tmp_path):
    """NaN images became black PNGs, saved and measured without a word. Now the batch is refused naming its seeds:
    before its PNGs are written ('batch', the CLI's path) or one batch late ('late', fid.py --network)."""
    from samplers.generation import NonFiniteSamples, rank_batches

    net, seeds = NaNAfter(tiny_net()), list(range(9))
    from samplers.generation import seed_inputs

    means = seed_inputs(net, seeds, device="cpu").latents.mean(dim=(1, 2, 3)).tolist()
    bad = [s for s, value in zip(seeds, means) if value < 0]
    first_bad_batch = next(b for b in rank_batches(seeds, 3, 0, 1) if set(b) & set(bad))
    expected = ", ".join(str(s) for s in first_bad_batch if s in bad)
    assert 0 < len(bad) < len(seeds) and first_bad_batch != [0, 1, 2]
    out = tmp_path / "out"
    with pytest.raises(NonFiniteSamples, match=rf"NaN or inf for seed\(s\) {expected}: these settings"):
        write_images(net, seeds, str(out), batch_size=3, num_steps=2, solver="euler", device="cpu", progress=False)
    written = sorted(int(name[:6]) for name in os.listdir(out) if name.endswith(".png"))
    assert not set(written) & set(first_bad_batch) and not set(written) & set(bad)
    yielded = []
    with pytest.raises(NonFiniteSamples, match=rf"seed\(s\) {expected}:"):
        for batch_seeds, _ in generate_images(net, seeds, batch_size=3, num_steps=2, solver="euler", device="cpu"):
            yielded.append(batch_seeds)
    assert yielded[-1] == first_bad_batch  # 'late': raised when the next batch was queued (or at the end)
    with pytest.raises(ValueError, match="check_finite must be 'batch' or 'late'"):
        next(generate_images(net, seeds, device="cpu", check_finite="never"))


def test_cli_reports_non_finite_samples_and_write_errors_in_one_line(tmp_path, monkeypatch):
    from samplers import generation

    path = str(tmp_path / "nan.pkl")
    persistence.save_network_pickle(path, dict(ema=tiny_net()))
    monkeypatch.setattr(generate, "load_snapshot", lambda *a, **k: types.SimpleNamespace(
        net=NaNAfter(tiny_net()), process=types.SimpleNamespace(name="edm", sampling=generation.GRID_SAMPLING),
        data={"process": None}))
    result = CliRunner().invoke(generate.main, ["--network", path, "--outdir", str(tmp_path / "out"), "--device",
                                                "cpu", "--seeds", "0-8", "--steps", "2"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "NaN or inf for seed(s)" in errors[0], result.output
    assert "Traceback" not in result.output

    monkeypatch.undo()
    (tmp_path / "full" / "000003.png").mkdir(parents=True)  # stands in for a full disk
    result = CliRunner().invoke(generate.main, ["--network", path, "--outdir", str(tmp_path / "full"), "--device",
                                                "cpu", "--seeds", "0-5", "--steps", "2", "--overwrite"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "000003.png" in errors[0], result.output
    assert "Traceback" not in result.output


def test_tilde_paths_are_expanded(network_pickle, tmp_path, monkeypatch):
    """--outdir=~/x and --grid=~/g.png (no shell expansion after '=') made a literal ./~ folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    from samplers import save_schedule_file

    os.makedirs(tmp_path / "home")
    save_schedule_file(str(tmp_path / "home" / "grid.json"), make_grid("logsnr", 3, 0.002, 80, end="sigma_min").sigmas,
                       solver="euler", nfe=3)
    result = CliRunner().invoke(generate.main, ["--network", network_pickle, "--outdir=~/samples", "--grid=~/g.png",
                                                "--schedule=~/grid.json", "--device", "cpu", "--seeds", "0-1"])
    assert result.exit_code == 0, result.output
    assert _pngs(tmp_path / "home" / "samples") == ["000000.png", "000001.png"]
    assert (tmp_path / "home" / "g.png").is_file() and not (tmp_path / "~").exists()


def test_overwrite_and_record_check_see_seven_digit_subfolders(network_pickle, tmp_path):
    """Seeds from 1,000,000 live in 7-digit subfolders: --overwrite left them under the new record."""
    outdir = str(tmp_path / "out")
    base = ["--network", network_pickle, "--outdir", outdir, "--device", "cpu", "--seeds", "999999-1000001",
            "--subdirs", "--steps", "2"]
    assert CliRunner().invoke(generate.main, base).exit_code == 0
    assert _pngs(outdir) == ["1000000/1000000.png", "1000000/1000001.png", "999000/999999.png"]
    result = CliRunner().invoke(generate.main, [*base[:-2], "--steps", "3", "--overwrite", "--seeds", "999999"])
    assert result.exit_code == 0, result.output
    assert _pngs(outdir) == ["999000/999999.png"]
    os.remove(os.path.join(outdir, "generation.json"))
    os.remove(os.path.join(outdir, "999000", "999999.png"))
    os.rmdir(os.path.join(outdir, "999000"))
    os.makedirs(os.path.join(outdir, "1000000"))
    PIL.Image.new("RGB", (8, 8)).save(os.path.join(outdir, "1000000", "1000000.png"))
    result = CliRunner().invoke(generate.main, base)
    assert result.exit_code == 1 and "PNGs without a record" in result.output, result.output


def test_denoise_to_zero_on_a_grid_ending_at_zero_records_as_without(network_pickle, tmp_path):
    """Heun's grid ends at 0 (its last step denoises): --denoise-to-zero changes no pixel there, and a resume with
    or without it is the same run (it was refused as other settings)."""
    outdir = str(tmp_path / "out")
    base = ["--network", network_pickle, "--outdir", outdir, "--device", "cpu", "--seeds", "0-1", "--steps", "3"]
    result = CliRunner().invoke(generate.main, [*base, "--denoise-to-zero"])
    assert result.exit_code == 0 and "then 0 (denoise_to_zero changes nothing: the last step already lands on 0); " \
        "5 NFE per image" in result.output, result.output
    result = CliRunner().invoke(generate.main, base)
    assert result.exit_code == 0 and "skipped 2" in result.output, result.output
    with_dtz = str(tmp_path / "dtz")
    base_dpm = ["--network", network_pickle, "--device", "cpu", "--seeds", "0-1", "--steps", "3", "--solver",
                "dpmpp_2m"]
    assert CliRunner().invoke(generate.main, [*base_dpm, "--outdir", with_dtz, "--denoise-to-zero"]).exit_code == 0
    result = CliRunner().invoke(generate.main, [*base_dpm, "--outdir", with_dtz])
    assert result.exit_code == 1 and "settings.denoise_to_zero" in result.output, result.output


def test_generation_record_is_strict_json_and_an_older_bare_infinity_record_resumes(network_pickle, tmp_path):
    """Heun's S_max defaults to infinity: generation.json writes it as "inf" (bare Infinity is not JSON: jq and
    JavaScript refuse the file), and a folder whose record an older version wrote with the bare token still resumes."""
    import generate

    outdir = tmp_path / "out"
    base = ["--network", network_pickle, "--outdir", str(outdir), "--device", "cpu", "--seeds", "0-1", "--steps", "3"]
    assert CliRunner().invoke(generate.main, base).exit_code == 0
    text = (outdir / "generation.json").read_text()
    record = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in generation.json"))
    assert record["settings"]["solver_options"]["S_max"] == "inf"
    (outdir / "generation.json").write_text(text.replace('"inf"', "Infinity"))
    os.remove(outdir / "000001.png")
    result = CliRunner().invoke(generate.main, base)
    assert result.exit_code == 0 and "Wrote 1 images, skipped 1" in result.output, result.output
    assert '"S_max": "inf"' in (outdir / "generation.json").read_text()


def test_a_folder_of_unipc_images_with_the_earlier_step_orders_is_refused(network_pickle, tmp_path):
    """UniPC of order >= 4 took other warm-up orders before 2026-12-02 (order 4 over 4 steps: 1,2,2,1, now 1,2,3,1;
    up to 4/255 per pixel on a 2-kimg digits run) under the same generation.json: more seeds into such a folder
    skipped the earlier images and wrote new ones beside them. The record now holds the orders where they changed, so
    such a folder, whose record lacks them, is refused; where they did not change (order 3), a record without them
    still resumes."""
    for order, orders in ((4, [1, 2, 3, 1]), (3, None)):
        outdir = tmp_path / f"order{order}"
        base = ["--network", network_pickle, "--outdir", str(outdir), "--device", "cpu", "--seeds", "0-1", "--steps",
                "4", "--solver", "unipc", "--order", str(order)]
        result = CliRunner().invoke(generate.main, base)
        assert result.exit_code == 0, result.output
        assert (" step orders 1,2,3,1; 4 NFE" in result.output) == (orders is not None), result.output
        record = json.loads((outdir / "generation.json").read_text())
        assert record["settings"]["step_orders"] == orders
        del record["settings"]["step_orders"]  # as the earlier versions wrote it
        (outdir / "generation.json").write_text(json.dumps(record))
        os.remove(outdir / "000001.png")
        result = CliRunner().invoke(generate.main, base)
        if orders is None:
            assert result.exit_code == 0 and "Wrote 1 images, skipped 1" in result.output, result.output
        else:
            assert result.exit_code == 1 and "these differ: settings.step_orders" in result.output, result.output


def test_a_run_folder_names_its_newest_snapshot_by_kimg(tmp_path):
    """From 1,000,000 kimg on (EDM's ImageNet-64 trains 2,500,000) a snapshot's name has 7 digits: sorted by name,
    network-snapshot-1000000.pkl came before network-snapshot-999000.pkl, and the older one was named the newest. The
    folder is a path, not a glob pattern (a sweep's runs[lr=2e-4] was said to hold no snapshot)."""
    from training import snapshots
    run = tmp_path / "sweep [lr=2e-4]"
    run.mkdir()
    for kimg in (999000, 1000000, 1001000):
        (run / f"network-snapshot-{kimg:06d}.pkl").touch()
    with pytest.raises(persistence.NetworkPickleError,
                       match=re.escape(f"its newest snapshot is {run / 'network-snapshot-1001000.pkl'}")):
        snapshots.read_snapshot(str(run))


def test_cli_path_mistakes_are_named_before_sampling(network_pickle, tmp_path, monkeypatch):
    """A run folder or a training state given as --network, and a --grid that is not a .png name, are refused in one
    line that says what to give instead, before any image is sampled."""
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling must not start")

    monkeypatch.setattr(generate, "write_images", no_sampling)
    run = tmp_path / "00000-run"
    run.mkdir()
    for kimg in (0, 12):
        shutil.copy(network_pickle, run / f"network-snapshot-{kimg:06d}.pkl")
    args = ["--outdir", str(tmp_path / "out"), "--seeds", "0-1", "--device", "cpu"]
    result = CliRunner().invoke(generate.main, ["--network", str(run), *args])
    assert result.exit_code == 1 and (f"Error: {run} is a folder, not a network pickle; its newest snapshot is "
                                      f"{run / 'network-snapshot-000012.pkl'}") in result.output, result.output
    torch.save({"net": 1}, tmp_path / "training-state-000012.pt")
    result = CliRunner().invoke(generate.main, ["--network", str(tmp_path / "training-state-000012.pt"), *args])
    assert result.exit_code == 1 and "not a network pickle: sample a run's network-snapshot-NNNNNN.pkl" in result.output
    for grid, message in ((tmp_path / "g.txt", f"--grid: {tmp_path / 'g.txt'}: expected a file name ending in .png"),
                          (run, f"--grid: {run} is a folder; expected a file name")):
        result = CliRunner().invoke(generate.main, ["--network", network_pickle, *args, "--grid", str(grid)])
        assert result.exit_code == 1 and f"Error: {message}" in result.output, result.output
    assert not os.path.exists(tmp_path / "out")


def test_a_record_lacking_a_nested_entry_is_said_to_be_an_earlier_versions(tmp_path):
    # 43dc956 records settings.step_orders for UniPC of order >= 4 (null elsewhere); a folder of an earlier version,
    # whose settings have no step_orders, was refused as if other settings had been asked for: 57e7060's note named
    # top-level entries only.
    from samplers.generation import OUTPUT_RECORD, OutputFolderMismatch, claim_output_folder
    old = {"network_sha256": "ab", "settings": {"solver": "unipc", "solver_options": {"order": 4}}}
    with open(tmp_path / OUTPUT_RECORD, "w") as f:
        json.dump(old, f)
    new = {"network_sha256": "ab", "settings": {**old["settings"], "step_orders": [1, 2, 3, 2, 1]}}
    with pytest.raises(OutputFolderMismatch, match=r"these differ: settings\.step_orders; see .*; that record, "
                                                   r"written by an earlier version, has no settings\.step_orders"):
        claim_output_folder(str(tmp_path), new)
    changed = {"network_sha256": "ab", "settings": {**old["settings"], "solver_options": {"order": 3}}}
    with pytest.raises(OutputFolderMismatch) as err:  # a value asked otherwise: no such note
        claim_output_folder(str(tmp_path), changed)
    assert "earlier version" not in str(err.value)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_dataset_folder_is_not_an_output_folder(tmp_path, overwrite):
    """--outdir naming a dataset_tool.py folder (images in 00000/, which the test for PNGs did not see) wrote the
    samples into it: the dataset grew by them, and --overwrite would not undo it. Refused, the folder untouched."""
    from samplers.generation import OutputFolderMismatch, claim_output_folder
    from training.dataset_tool_lib import convert_dataset
    source = tmp_path / "src"
    source.mkdir()
    PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(source / "a.png")
    dataset = tmp_path / "dataset"
    convert_dataset(str(source), str(dataset), progress=False)
    with pytest.raises(OutputFolderMismatch, match=r"dataset holds a dataset \(dataset\.json\), which the images "
                                                   r"would join; use another --outdir$"):
        claim_output_folder(str(dataset), {"network": "n"}, overwrite=overwrite)
    assert sorted(os.listdir(dataset)) == ["00000", "dataset.json"] and os.listdir(dataset / "00000") == \
        ["img00000000.png"]


def test_an_output_folder_inside_a_dataset_folder_is_refused(tmp_path):
    """--outdir below a dataset_tool.py folder (not at it): the folder dataset is read with its subfolders, so the
    samples would be trained on and counted as real images. Refused before any folder is made; a sibling of the
    dataset is fine."""
    from samplers.generation import OutputFolderMismatch, claim_output_folder
    from training.dataset import ImageFolderDataset
    from training.dataset_tool_lib import convert_dataset
    source = tmp_path / "src"
    source.mkdir()
    PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(source / "a.png")
    dataset = tmp_path / "dataset"
    convert_dataset(str(source), str(dataset), progress=False)
    inside = dataset / "samples" / "run1"
    with pytest.raises(OutputFolderMismatch, match=rf"run1 is inside the dataset {re.escape(str(dataset))} \(its "
                                                   r"dataset\.json\), which the images would join; use an --outdir "
                                                   r"outside it$"):
        claim_output_folder(str(inside), {"network": "n"})
    assert sorted(os.listdir(dataset)) == ["00000", "dataset.json"]
    claim_output_folder(str(tmp_path / "samples"), {"network": "n"})  # beside it
    # Why: a PNG below the dataset's folder is one of its images.
    (dataset / "samples").mkdir()
    PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(dataset / "samples" / "000000.png")
    assert len(ImageFolderDataset(str(dataset), use_labels=False)) == 2
