"""fid.py end to end with tiny stand-in detectors: ref + calc on folders and ZIPs, 1 vs 2 ranks, errors."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from launch import torchrun

import fid
from metrics import detectors as detectors_lib
from metrics import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(rng, num, size=12):
    levels = rng.integers(20, 236, (num, 3, 1, 1))
    return np.clip(levels + rng.integers(-20, 21, (num, 3, size, size)), 0, 255).astype(np.uint8)


def _write_folder(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image.transpose(1, 2, 0)).save(os.path.join(folder, f"{i:06d}.png"))


def _zip_folder(folder, zip_path):
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(os.listdir(folder)):
            zf.write(os.path.join(folder, name), arcname=name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Real (40) and generated (36) images as folders and ZIPs, plus stand-in detectors saved as --detector files."""
    root = tmp_path_factory.mktemp("fid_cli")
    rng = np.random.default_rng(0)
    real, gen = _images(rng, 40), _images(rng, 36)
    gen[:, 0] = np.clip(gen[:, 0].astype(int) + 40, 0, 255)  # a shifted distribution: FID clearly above zero
    _write_folder(root / "real", real)
    _write_folder(root / "gen", gen)
    _zip_folder(root / "gen", root / "gen.zip")
    detectors_lib.save_standin(detectors_lib.StandinInception(), str(root / "inception.pt"))
    detectors_lib.save_standin(detectors_lib.StandinVGG16(), str(root / "vgg16.pt"))
    return dict(root=root, real=real, gen=gen)


@pytest.fixture(scope="module")
def network_pkl(workdir):
    """A tiny random EDM network (8x8 SongUNet) saved in EDM's pickle format."""
    from torch_utils import persistence
    from training.preconditioning import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=8,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    path = workdir["root"] / "tiny-network.pkl"
    persistence.save_network_pickle(str(path), dict(ema=net))
    return path


def _detector_args(root):
    return ["--detector", f"inception={root / 'inception.pt'}", "--detector", f"vgg16={root / 'vgg16.pt'}"]


def _invoke(args):
    result = CliRunner().invoke(fid.main, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def single_rank(workdir):
    """fid.py ref (fid,pr) + calc (fid,is,pr) in this process, on a folder and on the same images zipped."""
    root = workdir["root"]
    result = _invoke(["ref", "--data", root / "real", "--dest", root / "ref1.npz", "--metrics", "fid,pr",
                      "--batch", 8, "--workers", 0, *_detector_args(root)])
    assert result.exit_code == 0, result.output
    outputs = {}
    for name, path in [("folder", root / "gen"), ("zip", root / "gen.zip")]:
        out = root / f"calc1-{name}.json"
        result = _invoke(["calc", "--images", path, "--ref", root / "ref1.npz", "--num", 30, "--seed", 3,
                          "--metrics", "fid,is,pr", "--batch", 8, "--workers", 0, "--out", out,
                          *_detector_args(root)])
        assert result.exit_code == 0, result.output
        outputs[name] = dict(record=json.loads(out.read_text()), stdout=result.output)
    return outputs


def _subset(num_total, num, seed):
    chosen = np.arange(num_total)
    np.random.RandomState(seed).shuffle(chosen)
    return np.sort(chosen[:num])


def _fid_eigh(mu1, s1, mu2, s2):
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))


def test_ref_and_calc_match_an_independent_computation(workdir, single_rank):
    root = workdir["root"]
    inception, vgg = detectors_lib.StandinInception(), detectors_lib.StandinVGG16()
    real = torch.as_tensor(workdir["real"])
    gen = torch.as_tensor(workdir["gen"][_subset(36, 30, 3)])  # --num 30 --seed 3: EDM's random subset
    with torch.no_grad():
        f_real = inception(real, return_features=True).double().numpy()
        f_gen = inception(gen, return_features=True).double().numpy()
        probs = inception(gen, no_output_bias=True).double().numpy()
        v_real = vgg(real, return_features=True).to(torch.float16)
        v_gen = vgg(gen, return_features=True).to(torch.float16)

    with np.load(root / "ref1.npz") as ref:
        np.testing.assert_allclose(ref["mu"], f_real.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(ref["sigma"], np.cov(f_real, rowvar=False), rtol=0,
                                   atol=1e-5 * np.abs(np.cov(f_real, rowvar=False)).max())
        torch.testing.assert_close(torch.as_tensor(ref["vgg16_features"]), v_real, rtol=1e-3, atol=1e-3)
        assert int(ref["num_images"]) == 40
        assert ref["image_shape"].tolist() == [3, 12, 12]  # (C, H, W), checked against the evaluated images

    record = single_rank["folder"]["record"]
    expected_fid = _fid_eigh(f_gen.mean(0), np.cov(f_gen, rowvar=False), f_real.mean(0), np.cov(f_real, rowvar=False))
    assert record["results"]["fid"] == pytest.approx(expected_fid, rel=1e-4)
    assert record["results"]["fid"] > 1e-3
    scores = []
    for i in range(10):
        part = probs[i * 30 // 10:(i + 1) * 30 // 10]
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), axis=1))))
    assert record["results"]["is_mean"] == pytest.approx(np.mean(scores), rel=1e-5)
    assert record["is_scores"] == pytest.approx(scores, rel=1e-5)
    # Precision/recall by brute force (full distance matrices, k = 3); float16 rounding may flip a borderline point.
    def covered(probes, manifold):
        dist_mm = torch.cdist(manifold.double(), manifold.double())
        radii = dist_mm.kthvalue(4, dim=1).values
        return (torch.cdist(probes.double(), manifold.double()) <= radii).any(1).double().mean().item()

    assert record["results"]["precision"] == pytest.approx(covered(v_gen, v_real), abs=1.01 / 30)
    assert record["results"]["recall"] == pytest.approx(covered(v_real, v_gen), abs=1.01 / 40)
    assert 0.0 < record["results"]["precision"] < 1.0 and 0.0 < record["results"]["recall"] < 1.0
    assert record["labels"] == {"fid": "fid30_full", "is": "is30", "pr": "pr30_3_full"}
    assert record["num_images"] == 30 and record["source"]["seed"] == 3
    assert record["source"]["image_shape"] == record["reference"]["image_shape"] == [3, 12, 12]
    assert record["detectors"]["inception"]["source"].endswith("inception.pt")
    assert f"fid30_full {record['results']['fid']:g}" in single_rank["folder"]["stdout"]


def test_folder_and_zip_give_identical_results(single_rank):
    folder, zipped = single_rank["folder"]["record"], single_rank["zip"]["record"]
    assert folder["results"] == zipped["results"]
    assert folder["is_scores"] == zipped["is_scores"]


def test_calc_fid_route_eigvals_is_the_eigenvalue_route_and_is_recorded(workdir, single_rank, monkeypatch):
    """--fid-route eigvals computes FID by frechet_distance_eigvals (a spy sees its call), records the route, and
    lands within 1e-7 relative of the default (EDM's sqrtm, single_rank's run on the same images; the stand-in's 16
    features span fewer directions, so Σ is singular, where a matrix square root is accurate to ~sqrt(machine
    epsilon))."""
    from metrics import frechet
    root = workdir["root"]
    calls = []

    def spy(*statistics):
        calls.append(len(statistics))
        return frechet.frechet_distance_eigvals(*statistics)

    monkeypatch.setitem(frechet.FRECHET_ROUTES, "eigvals", spy)
    out = root / "calc-eigvals.json"
    result = _invoke(["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--num", 30, "--seed", 3,
                      "--metrics", "fid", "--fid-route", "eigvals", "--batch", 8, "--workers", 0, "--out", out,
                      *_detector_args(root)])
    assert result.exit_code == 0, result.output
    record, default = json.loads(out.read_text()), single_rank["folder"]["record"]
    assert calls == [4]
    assert record["options"]["fid_route"] == "eigvals" and default["options"]["fid_route"] == "sqrtm"
    assert record["results"]["fid"] == pytest.approx(default["results"]["fid"], rel=1e-7, abs=0)
    refused = _invoke(["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--fid-route", "eigh"])
    assert refused.exit_code == 2 and "'eigh' is not one of 'sqrtm', 'eigvals'" in refused.output, refused.output


NETWORK_ARGS = ["--seeds", "5-28", "--steps", "2", "--batch", "8", "--metrics", "fid,is,pr", "--workers", "0"]


@pytest.fixture(scope="module")
def network_single_rank(workdir, network_pkl, single_rank):
    """fid.py calc --network in this process (needs ref1.npz from single_rank)."""
    root = workdir["root"]
    result = _invoke(["calc", "--network", network_pkl, "--ref", root / "ref1.npz", *NETWORK_ARGS,
                      "--out", root / "net-memory.json", *_detector_args(root)])
    assert result.exit_code == 0, result.output
    return json.loads((root / "net-memory.json").read_text())


def test_network_mode_equals_writing_pngs_and_reading_them_back(workdir, network_pkl, network_single_rank):
    import generate

    root = workdir["root"]
    result = CliRunner().invoke(generate.main, ["--network", str(network_pkl), "--outdir", str(root / "net-pngs"),
                                                "--seeds", "5-28", "--steps", "2", "--batch", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len([name for name in os.listdir(root / "net-pngs") if name.endswith(".png")]) == 24
    result = _invoke(["calc", "--images", root / "net-pngs", "--ref", root / "ref1.npz", "--num", 24, "--batch", 8,
                      "--metrics", "fid,is,pr", "--workers", 0, "--out", root / "net-pngs.json", *_detector_args(root)])
    assert result.exit_code == 0, result.output
    from_pngs, in_memory = json.loads((root / "net-pngs.json").read_text()), network_single_rank
    assert in_memory["results"] == from_pngs["results"]  # same uint8 pixels, same batches: identical numbers
    assert in_memory["is_scores"] == from_pngs["is_scores"]
    assert in_memory["results"]["fid"] > 0 and in_memory["source"]["seeds"] == "5-28"
    assert "heun" in in_memory["source"]["sampler"] and in_memory["num_images"] == 24


def test_network_mode_records_the_snapshots_process(workdir, single_rank, tmp_path):
    # The result's source names the snapshot's process, as generation.json does: its sampler options alone read as
    # EDM's ("schedule": "edm") for an SPD or flow snapshot. A result written before the process was recorded, or
    # with another record, still counts as the same request (the process is the network file's, like its name).
    from losses.spd import SPDLoss
    from training import snapshots
    from training.preconditioning import EpsPrecond

    torch.manual_seed(0)
    net = EpsPrecond(img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])
    path = tmp_path / "network-snapshot-000001.pkl"
    snapshots.save_snapshot(str(path), ema=net.eval().requires_grad_(False), process=SPDLoss(T=20).process,
                            loss_kwargs=dict(class_name="losses.spd.SPDLoss", T=20))
    args = ["calc", "--network", tmp_path, "--ref", workdir["root"] / "ref1.npz", "--seeds", "0-9", "--batch", 5,
            "--metrics", "fid", "--workers", 0, "--device", "cpu", *_detector_args(workdir["root"])]
    result = _invoke(args)  # a folder of snapshots: each result beside its network, kept on a rerun
    assert result.exit_code == 0, result.output
    out, = tmp_path.glob("network-snapshot-000001*.json")
    record = json.loads(out.read_text())
    assert record["source"]["process"] == {"name": "spd", "options": {"T": 20, "c1": 1.59, "c2": 0.0086, "m": 2.0}}
    del record["source"]["process"]
    out.write_text(json.dumps(record))
    again = _invoke(args)
    assert again.exit_code == 0 and "Kept the results in" in again.output, again.output
    assert "process" not in json.loads(out.read_text())["source"]  # kept as it was


def test_network_of_rgba_images_is_refused_before_sampling(workdir, tmp_path, monkeypatch):
    """train.py trains on RGBA (or grey + alpha) PNGs; its snapshot then failed in the detector's first convolution,
    after the sampling: refused first, as such a folder of images is."""
    from samplers import generation
    from torch_utils import persistence
    from training.preconditioning import EDMPrecond

    net = EDMPrecond(img_resolution=8, img_channels=4, label_dim=0, model_type="SongUNet", model_channels=8,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    path = tmp_path / "rgba-network.pkl"
    persistence.save_network_pickle(str(path), dict(ema=net))
    monkeypatch.setattr(generation, "generate_images", lambda *args, **kwargs: pytest.fail("sampled"))
    result = _invoke(["calc", "--network", path, "--ref", workdir["root"] / "ref1.npz", "--seeds", "0-3",
                      "--workers", 0, "--device", "cpu", *_detector_args(workdir["root"])])
    assert result.exit_code == 1
    assert "rgba-network.pkl: its images have 4 channels; the detectors read RGB (or greyscale) images" in \
        result.output


def test_sampling_options_need_network_mode(workdir):
    root = workdir["root"]
    result = _invoke(["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--steps", 4])
    assert result.exit_code != 0 and "--steps: sampling options apply to --network only" in result.output


def test_network_mode_takes_generate_presets_and_edm_options(workdir, network_pkl, single_rank):
    """calc --network --preset: the preset's options under the explicit ones, as generate.py; the sampler that ran is in
    the JSON record. EDM's --disc/--solver are generate.py's too. --preset is a sampling option (--network only)."""
    root = workdir["root"]
    common = ["calc", "--network", network_pkl, "--ref", root / "ref1.npz", "--seeds", "0-3", "--batch", "8",
              "--metrics", "fid", "--workers", "0", *_detector_args(root)]
    result = _invoke([*common, "--preset", "aot-uncond", "--steps", "3", "--out", root / "net-preset.json"])
    assert result.exit_code == 0, result.output
    assert "Preset aot-uncond (AOT (Kim et al. 2024), README: Heun, rho 90, 14 steps): --rho=90" in result.output
    assert "explicit options win: --steps=3 (preset: 14)" in result.output
    options = json.loads((root / "net-preset.json").read_text())["source"]["sampler_options"]
    assert options["num_steps"] == 3 and options["schedule_kwargs"] == {"rho": 90.0} and options["schedule"] == "edm"
    assert "; 5 NFE per image" in result.output  # Heun: 2 * 3 - 1
    result = _invoke([*common, "--disc", "ve", "--solver", "euler", "--steps", "3", "--out", root / "net-disc.json"])
    assert result.exit_code == 0, result.output
    record = json.loads((root / "net-disc.json").read_text())["source"]
    assert record["sampler_options"]["schedule"] == "ve" and record["sampler_options"]["solver"] == "euler"
    assert "sigma=100..0.02 then 0; 3 NFE per image" in record["sampler"]
    result = _invoke(["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--preset", "edm-cifar10"])
    assert result.exit_code != 0 and "--preset: sampling options apply to --network only" in result.output
    result = _invoke([*common, "--preset", "nope"])
    assert result.exit_code == 2 and "unknown preset 'nope': expected one of edm-cifar10, " in result.output
    result = _invoke(["calc", "--preset", "list"])
    assert result.exit_code == 0 and "aot-cond  (AOT (Kim et al. 2024)" in result.output


@pytest.mark.distributed
def test_two_gloo_ranks_match_one_rank(workdir, single_rank, network_pkl, network_single_rank):
    root = workdir["root"]
    commands = [
        ["ref", "--data", str(root / "real"), "--dest", str(root / "ref2.npz"), "--metrics", "fid,pr", "--batch", "8",
         "--workers", "0", *_detector_args(root)],
        ["calc", "--images", str(root / "gen"), "--ref", str(root / "ref2.npz"), "--num", "30", "--seed", "3",
         "--metrics", "fid,is,pr", "--batch", "8", "--workers", "0", "--out", str(root / "calc2.json"),
         *_detector_args(root)],
        ["calc", "--network", str(network_pkl), "--ref", str(root / "ref1.npz"), *NETWORK_ARGS,
         "--out", str(root / "net-memory2.json"), *_detector_args(root)],
        # A run folder (one snapshot): the ranks evaluate the same list, rank 0 writes beside the pickle.
        ["calc", "--network", str(root / "run2"), "--ref", str(root / "ref1.npz"), *NETWORK_ARGS,
         *_detector_args(root)],
    ]
    (root / "run2").mkdir()
    shutil.copyfile(network_pkl, root / "run2" / "network-snapshot-000004.pkl")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        torchrun(2, os.path.join(ROOT, "tests", "metrics_torchrun_worker.py"), json.dumps(commands)),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with np.load(root / "ref1.npz") as one, np.load(root / "ref2.npz") as two:
        np.testing.assert_allclose(two["mu"], one["mu"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(two["sigma"], one["sigma"], rtol=0, atol=1e-6 * np.abs(one["sigma"]).max())
        np.testing.assert_allclose(two["vgg16_features"], one["vgg16_features"], rtol=1e-3)  # same order as 1 rank
    one, two = single_rank["folder"]["record"], json.loads((root / "calc2.json").read_text())
    assert two["world_size"] == 2
    assert two["results"]["fid"] == pytest.approx(one["results"]["fid"], rel=1e-5)
    assert two["results"]["is_mean"] == pytest.approx(one["results"]["is_mean"], rel=1e-6)
    assert two["is_scores"] == pytest.approx(one["is_scores"], rel=1e-6)
    assert two["results"]["precision"] == one["results"]["precision"]
    assert two["results"]["recall"] == one["results"]["recall"]
    # --network on 2 ranks: each rank samples its share of the seeds; the numbers match 1 rank.
    net_one, net_two = network_single_rank, json.loads((root / "net-memory2.json").read_text())
    assert net_two["world_size"] == 2 and net_two["num_images"] == 24
    assert net_two["results"]["fid"] == pytest.approx(net_one["results"]["fid"], rel=1e-5)
    assert net_two["is_scores"] == pytest.approx(net_one["is_scores"], rel=1e-6)
    assert net_two["results"]["precision"] == net_one["results"]["precision"]
    assert net_two["results"]["recall"] == net_one["results"]["recall"]
    beside = json.loads((root / "run2" / "network-snapshot-000004-fid24_full-is24-pr24_3_full.json").read_text())
    assert beside["results"] == net_two["results"] and beside["world_size"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# Errors: one clear line each.


def test_fewer_images_than_num_is_a_clear_error(workdir, single_rank):
    root = workdir["root"]
    result = _invoke(["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--num", 50, "--workers", 0,
                      *_detector_args(root)])
    assert result.exit_code != 0
    assert f"found 36 images in {root / 'gen'}, but expected at least 50 (--num-images)" in result.output


def test_reference_of_other_image_shape_is_warned_about(workdir, single_rank, tmp_path):
    """A 24x24 folder evaluated against the 12x12 reference: computed (it can be meant) but warned about, naming both
    shapes; the same images at 12x12 give no warning, nor does a reference without the record (EDM's)."""
    root = workdir["root"]
    _write_folder(tmp_path / "big", workdir["gen"][:8].repeat(2, axis=2).repeat(2, axis=3))
    _write_folder(tmp_path / "same", workdir["gen"][:8])
    common = ["--num", 8, "--workers", 0, "--metrics", "fid", *_detector_args(root)]
    with pytest.warns(UserWarning, match=r"ref1\.npz' were computed from 12x12 RGB images, but the images evaluated "
                                         r"are 24x24 RGB: is --ref the right dataset\?"):
        result = _invoke(["calc", "--images", tmp_path / "big", "--ref", root / "ref1.npz", *common])
    assert result.exit_code == 0, result.output
    with np.load(root / "ref1.npz") as ref:
        np.savez(tmp_path / "edm.npz", mu=ref["mu"], sigma=ref["sigma"])
    import warnings

    for images, ref in [(tmp_path / "same", root / "ref1.npz"), (tmp_path / "big", tmp_path / "edm.npz")]:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*were computed from")
            result = _invoke(["calc", "--images", images, "--ref", ref, *common])
        assert result.exit_code == 0, result.output


def test_image_damaged_past_its_header_is_one_line_with_workers(workdir, single_rank, tmp_path):
    """A PNG whose pixel data is damaged passes the listing and fails when a DataLoader worker decodes it: the error
    is the worker's one line naming the file, not 'Caught DatasetError in DataLoader worker' and its traceback."""
    root = workdir["root"]
    _write_folder(tmp_path / "gen", workdir["gen"][:8])
    damaged = tmp_path / "gen" / "000005.png"
    data = bytearray(damaged.read_bytes())
    for k in range(40, len(data) - 20):  # signature, IHDR and IEND kept
        data[k] ^= 0x55
    damaged.write_bytes(bytes(data))
    outputs = []
    for workers in [1, 0]:
        result = _invoke(["calc", "--images", tmp_path / "gen", "--ref", root / "ref1.npz", "--num", 8, "--workers",
                          workers, "--metrics", "fid", *_detector_args(root)])
        assert result.exit_code == 1
        error = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(error) == 1 and error[0].startswith(f"Error: {damaged}: cannot decode image"), result.output
        assert "Traceback" not in result.output and "Caught" not in result.output
        outputs.append(error[0].split(" (")[0])
    assert outputs[0] == outputs[1]


def test_missing_ref_is_a_clear_error(workdir):
    root = workdir["root"]
    result = _invoke(["calc", "--images", root / "gen", "--ref", root / "nope.npz", "--num", 30, "--workers", 0,
                      *_detector_args(root)])
    assert result.exit_code != 0
    assert "cannot open reference statistics" in result.output and "nope.npz" in result.output


def test_ref_without_pr_features_is_a_clear_error(workdir, tmp_path):
    root = workdir["root"]
    np.savez(tmp_path / "edm.npz", mu=np.zeros(16), sigma=np.eye(16))
    result = _invoke(["calc", "--images", root / "gen", "--ref", tmp_path / "edm.npz", "--num", 30, "--workers", 0,
                      "--metrics", "fid,pr", *_detector_args(root)])
    assert result.exit_code != 0
    assert "hold no VGG16 features" in result.output and "--metrics fid,pr" in result.output


def test_unfetchable_detector_is_a_clear_error(workdir, single_rank, monkeypatch):
    root = workdir["root"]
    result = _invoke(["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--num", 30, "--workers", 0,
                      "--detector", f"inception={root / 'missing-inception.pkl'}"])
    assert result.exit_code != 0
    assert "inception detector" in result.output and "missing-inception.pkl" in result.output

    from dnnlib import util

    monkeypatch.setattr(util.time, "sleep", lambda s: None)
    result = _invoke(["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--num", 30, "--workers", 0,
                      "--detector", "inception=http://127.0.0.1:9/inception-2015-12-05.pkl"])
    assert result.exit_code != 0
    assert "could not fetch the inception detector" in result.output
    assert "--detector inception=PATH" in result.output


def test_bad_options_are_clear_errors(workdir):
    root = workdir["root"]
    result = _invoke(["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--metrics", "fid,lpips"])
    assert result.exit_code != 0 and "unknown metric(s) lpips" in result.output
    result = _invoke(["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--detector", "inception.pt"])
    assert result.exit_code != 0 and "NAME=PATH" in result.output
    result = _invoke(["calc", "--ref", root / "ref1.npz"])
    assert result.exit_code != 0 and "exactly one of --images and --network" in result.output
    result = _invoke(["calc", "--images", root / "nowhere", "--ref", root / "ref1.npz", *_detector_args(root)])
    assert result.exit_code != 0 and "nowhere: dataset path does not exist" in result.output


def test_device_seed_and_class_mistakes_are_usage_errors(workdir, network_pkl, tmp_path):
    root = workdir["root"]
    calc = ["calc", "--images", root / "gen", "--ref", root / "ref1.npz", *_detector_args(root)]
    result = _invoke([*calc, "--device", "foo"])
    assert result.exit_code == 2 and "Invalid value for --device" in result.output, result.output
    if not torch.cuda.is_available():
        result = _invoke([*calc, "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available on this machine" in result.output, result.output
    network = ["calc", "--network", network_pkl, "--ref", root / "ref1.npz", "--num-images", "4",
               *_detector_args(root)]
    # --seed selects a subset of --images; next to --network it is a slip for --seeds, not ignored.
    result = _invoke([*network, "--seed", "5"])
    assert result.exit_code == 2 and "--seed picks the subset of --images" in result.output, result.output
    # --class is checked against the network before any detector or image work, as generate.py does.
    result = _invoke([*network, "--class", "3"])
    assert result.exit_code == 2 and "Invalid value for --class" in result.output
    assert "the network is unconditional (label_dim = 0); --class 3 cannot apply" in result.output
    # A reference file given as the network: named as a zip archive, not as a torch.save file only.
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    result = _invoke(["calc", "--network", tmp_path / "ref.npz", "--metrics", "is", "--num-images", "4"])
    assert result.exit_code == 1 and "a numpy .npz), not a network pickle" in result.output, result.output


@pytest.mark.distributed
def test_num_images_reaches_fid_py_under_torchrun(workdir, single_rank):
    # torchrun's own parser takes --num for an abbreviation of its --numa-binding; --num-images passes through.
    root = workdir["root"]
    out = root / "calc-torchrun.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        torchrun(2, os.path.join(ROOT, "fid.py"), "calc", "--images", root / "gen", "--ref", root / "ref1.npz",
                 "--num-images=30", "--seed", "3", "--metrics", "fid", "--batch", "8", "--workers", "0", "--out", out,
                 *_detector_args(root)),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record, one = json.loads(out.read_text()), single_rank["folder"]["record"]
    assert record["world_size"] == 2 and record["num_images"] == 30
    assert record["results"]["fid"] == pytest.approx(one["results"]["fid"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# What every rank sees; requests refused before the pass; image order of --network.


@pytest.mark.distributed
def test_ranks_that_list_different_images_all_refuse(workdir, single_rank):
    """Rank 1 does not see gen/000035.png (a lagging copy of the folder): both ranks refuse, naming the path and what
    each rank found, instead of counting an image twice or dropping one. The same launch then passes on a folder
    both see whole, with the one-rank FID."""
    root = workdir["root"]
    gen = str(root / "gen")
    common = ["--batch", "8", "--workers", "0", *map(str, _detector_args(root))]
    commands = [
        ["calc", "--images", gen, "--ref", str(root / "ref1.npz"), "--num", "30", "--seed", "3", "--metrics", "fid",
         *common],
        ["ref", "--data", gen, "--dest", str(root / "ref-divergent.npz"), *common],
        ["calc", "--images", str(root / "gen.zip"), "--ref", str(root / "ref1.npz"), "--num", "30", "--seed", "3",
         "--metrics", "fid", "--out", str(root / "calc-same-listing.json"), *common],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, METRICS_WORKER_REPORT_ERRORS="1",
               METRICS_WORKER_HIDE=json.dumps(dict(rank=1, dir=gen, name="000035.png")))
    proc = subprocess.run(
        torchrun(2, os.path.join(ROOT, "tests", "metrics_torchrun_worker.py"), json.dumps(commands)),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):  # every rank, not only the first to notice
        assert (f"rank {rank} error: {gen}: the ranks see different images (rank 0: 36 found, 30 selected; "
                f"rank 1: 35 found, 30 selected;") in proc.stdout, proc.stdout[-3000:]
        assert (f"rank {rank} error: {gen}: the ranks see different images (rank 0: 36 found, 36 selected; "
                f"rank 1: 35 found, 35 selected;") in proc.stdout, proc.stdout[-3000:]
    assert not (root / "ref-divergent.npz").exists()
    record = json.loads((root / "calc-same-listing.json").read_text())
    assert record["world_size"] == 2
    assert record["results"]["fid"] == pytest.approx(single_rank["zip"]["record"]["results"]["fid"], rel=1e-5)


def test_ref_refuses_a_dest_without_npz_before_listing_the_data(workdir, tmp_path):
    # EDM's np.savez would write NAME.npz for --dest=NAME, and `calc --ref=NAME.npz` would then find nothing.
    result = _invoke(["ref", "--data", tmp_path / "no-such-data", "--dest", tmp_path / "refs" / "cifar10",
                      *_detector_args(workdir["root"])])
    assert result.exit_code == 1, result.output
    assert (f"--dest '{tmp_path / 'refs' / 'cifar10'}' must end in .npz (EDM's fid.py would write "
            f"'{tmp_path / 'refs' / 'cifar10.npz'}' for it)") in result.output
    assert not (tmp_path / "refs").exists()


@pytest.mark.parametrize("command", ["calc", "ref"])
def test_ctrl_c_says_nothing_was_written(workdir, single_rank, tmp_path, monkeypatch, command):
    """Ctrl-C during the image pass: exit 130 with what is on disk, not click's bare "Aborted!" (exit 1)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run_pass", interrupted)
    root = workdir["root"]
    out, option = (tmp_path / "out.json", "--out") if command == "calc" else (tmp_path / "ref.npz", "--dest")
    args = (["calc", "--images", root / "gen", "--ref", root / "ref1.npz", "--num", 30, "--out", out]
            if command == "calc" else ["ref", "--data", root / "real", "--dest", out])
    result = _invoke([*args, "--workers", 0, *_detector_args(root)])
    assert result.exit_code == 130, result.output
    assert (f"Interrupted: nothing was written ({option} is written whole once the pass over the images is "
            f"complete); run the same command again.") in result.output
    assert "Aborted" not in result.output and not out.exists()


def test_ref_refuses_metrics_is_before_listing_the_data(workdir, tmp_path):
    result = _invoke(["ref", "--data", tmp_path / "no-such-data", "--dest", tmp_path / "ref.npz", "--metrics",
                      "fid,is", *_detector_args(workdir["root"])])
    assert result.exit_code == 1, result.output
    assert "--metrics for ref: 'is' needs no reference statistics; use fid, pr and/or kid" in result.output


def test_calc_refuses_too_few_images_for_pr_or_kid_before_the_pass(workdir, single_rank, tmp_path, monkeypatch):
    root = workdir["root"]

    def no_pass(*args, **kwargs):
        raise AssertionError("the image pass must not start")

    monkeypatch.setattr(evaluate, "run_pass", no_pass)
    _write_folder(tmp_path / "three", workdir["gen"][:3])
    calc = ["calc", "--workers", "0", *_detector_args(root)]
    result = _invoke([*calc, "--images", tmp_path / "three", "--num", 3, "--ref", root / "ref1.npz",
                      "--metrics", "fid,pr"])
    assert result.exit_code == 1, result.output
    assert "--metrics pr: precision/recall with k = 3 neighbours needs at least 4 generated images, got 3" \
        in result.output
    # Reference rows: P/R needs k + 1 = 4, KID 2.
    with np.load(root / "ref1.npz") as ref:
        mu, sigma, vgg = ref["mu"], ref["sigma"], ref["vgg16_features"]
    np.savez(tmp_path / "small.npz", mu=mu, sigma=sigma, vgg16_features=vgg[:3],
             inception_features=np.zeros([1, mu.shape[0]], np.float32))
    common = [*calc, "--images", root / "gen", "--num", 30, "--ref", tmp_path / "small.npz"]
    result = _invoke([*common, "--metrics", "pr"])
    assert result.exit_code == 1, result.output
    assert (f"--metrics pr: reference statistics '{tmp_path / 'small.npz'}' hold VGG16 features of 3 images, but "
            f"precision/recall with k = 3 neighbours needs at least 4") in result.output
    result = _invoke([*common, "--metrics", "kid"])
    assert result.exit_code == 1, result.output
    assert (f"--metrics kid: reference statistics '{tmp_path / 'small.npz'}' hold Inception features of 1 image(s), "
            f"but KID needs at least 2") in result.output


def test_ref_refuses_to_keep_too_few_features_for_pr_or_kid_before_the_pass(workdir, tmp_path, monkeypatch):
    # A reference calc then refuses ("hold VGG16 features of 3 images ..."): it was written after the whole pass.
    root = workdir["root"]

    def no_pass(*args, **kwargs):
        raise AssertionError("the image pass must not start")

    monkeypatch.setattr(evaluate, "run_pass", no_pass)
    ref = ["ref", "--workers", "0", "--dest", tmp_path / "ref.npz", *_detector_args(root)]
    result = _invoke([*ref, "--data", root / "real", "--metrics", "fid,pr", "--max-real", 3])
    assert result.exit_code == 1, result.output
    assert ("--metrics pr: precision/recall with k = 3 neighbours needs the features of at least 4 real images, but "
            "the reference would keep 3 (40 images, --max-real 3)") in result.output
    _write_folder(tmp_path / "three", workdir["real"][:3])
    result = _invoke([*ref, "--data", tmp_path / "three", "--metrics", "fid,kid,pr"])
    assert result.exit_code == 1 and "the reference would keep 3 (3 images" in result.output, result.output
    result = _invoke([*ref, "--data", root / "real", "--metrics", "fid,kid", "--max-real", 1])
    assert result.exit_code == 1, result.output
    assert "--metrics kid: KID needs the features of at least 2 real images, but the reference would keep 1" \
        in result.output
    assert not (tmp_path / "ref.npz").exists()


def test_network_mode_with_unsorted_seeds_equals_the_pngs_of_those_seeds(workdir, network_pkl, tmp_path):
    """IS's ordered splits and KID's subsets pick images by index: --seeds=14-25,3-13 in memory must index the images
    as the PNGs generate.py writes for them are read (file-name order), or IS and KID differ from `calc --images`."""
    import generate

    root = workdir["root"]
    result = _invoke(["ref", "--data", root / "real", "--dest", tmp_path / "ref-kid.npz", "--metrics", "fid,kid",
                      "--batch", 8, "--workers", 0, *_detector_args(root)])
    assert result.exit_code == 0, result.output
    seeds = "14-25,3-13"
    result = CliRunner().invoke(generate.main, ["--network", str(network_pkl), "--outdir", str(tmp_path / "pngs"),
                                                "--seeds", seeds, "--steps", "2", "--batch", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    common = ["--ref", tmp_path / "ref-kid.npz", "--metrics", "fid,is,kid", "--batch", 8, "--workers", 0,
              *_detector_args(root)]
    result = _invoke(["calc", "--images", tmp_path / "pngs", "--num", 23, "--out", tmp_path / "pngs.json", *common])
    assert result.exit_code == 0, result.output
    result = _invoke(["calc", "--network", network_pkl, "--seeds", seeds, "--steps", 2, "--out",
                      tmp_path / "memory.json", *common])
    assert result.exit_code == 0, result.output
    from_pngs, in_memory = (json.loads((tmp_path / name).read_text()) for name in ("pngs.json", "memory.json"))
    # Same batches as generate.py (so the same pixels), indexed as the PNGs: identical numbers, not merely close.
    assert in_memory["results"] == from_pngs["results"]
    assert in_memory["is_scores"] == from_pngs["is_scores"]
    assert in_memory["results"]["kid"] != 0 and in_memory["source"]["seeds"] == "14-25,3-13"


def test_a_run_folder_as_network_evaluates_each_network_beside_it_and_a_rerun_keeps_it(workdir, single_rank, tmp_path):
    """`calc --network=RUN_DIR`: each network-*.pkl of the run in kimg order, each result written beside it under
    its name and the metric labels, equal to `calc --network=PKL` of that pickle alone; a rerun keeps them; other
    sampler options are refused per file; report.py plots the results over kimg."""
    from torch_utils import persistence
    from training import report
    from training.preconditioning import EDMPrecond

    root, run = workdir["root"], tmp_path / "00000-run"
    run.mkdir()
    for kimg, seed in [(12, 1), (2, 0)]:  # written out of order: listed by kimg
        torch.manual_seed(seed)
        net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=8,
                         channel_mult=[1], num_blocks=1, attn_resolutions=[])
        persistence.save_network_pickle(str(run / f"network-snapshot-{kimg:06d}.pkl"), dict(ema=net))
    (run / "training-state-000002.pt").write_bytes(b"not a network")
    common = ["--ref", root / "ref1.npz", "--seeds", "0-9", "--steps", 2, "--batch", 8, "--metrics", "fid,is",
              "--device", "cpu", *_detector_args(root)]
    result = _invoke(["calc", "--network", run, *common])
    assert result.exit_code == 0, result.output
    names = ["network-snapshot-000002-fid10_full-is10.json", "network-snapshot-000012-fid10_full-is10.json"]
    assert sorted(p.name for p in run.glob("*.json")) == names
    assert result.output.index("network-snapshot-000002.pkl") < result.output.index("network-snapshot-000012.pkl")
    fids = []
    for kimg, name in [(2, names[0]), (12, names[1])]:
        alone = _invoke(["calc", "--network", run / f"network-snapshot-{kimg:06d}.pkl", "--out",
                         tmp_path / f"alone-{kimg}.json", *common])
        assert alone.exit_code == 0, alone.output
        record = json.loads((run / name).read_text())
        expected = json.loads((tmp_path / f"alone-{kimg}.json").read_text())
        assert record["results"] == expected["results"] and record["source"] == expected["source"]
        fids.append(record["results"]["fid"])
    assert fids[0] != fids[1]
    lowest = [2, 12][int(fids[1] < fids[0])]
    for kimg, value in zip([2, 12], fids):  # the closing table
        assert (f"network-snapshot-{kimg:06d}.pkl  fid10_full {value:g}; is10 1 +- 0"
                f"{'  <- lowest FID' if kimg == lowest else ''}\n") in result.output
    # A rerun keeps both (nothing sampled again); other sampler options are refused, naming the file.
    before = {name: (run / name).stat().st_mtime_ns for name in names}
    again = _invoke(["calc", "--network", run, *common])
    assert again.exit_code == 0, again.output
    assert again.output.count("Kept the results in") == 2 and "Computing" not in again.output
    assert {name: (run / name).stat().st_mtime_ns for name in names} == before
    other = _invoke(["calc", "--network", run, *[a if a != 2 else 3 for a in common]])
    assert other.exit_code == 1, other.output
    assert f"Error: {run / names[0]} measured other images (sampler:" in other.output
    assert f"move it away to measure {run / 'network-snapshot-000002.pkl'} again with these options" in other.output
    # Ctrl-C while measuring the second network: exit 130, the first result kept and said so; the rerun completes.
    (run / names[1]).unlink()
    calls = []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "run_pass", interrupted_second)
        stopped = _invoke(["calc", "--network", run, *common])
    assert stopped.exit_code == 130 and len(calls) == 1, stopped.output
    assert (f"Interrupted while measuring {run / 'network-snapshot-000012.pkl'}; the 1 result(s) before it are "
            f"written. Run the same command again to measure the rest.") in stopped.output
    assert "Aborted" not in stopped.output and "nothing was written" not in stopped.output
    assert not (run / names[1]).exists()
    again = _invoke(["calc", "--network", run, *common])
    assert again.exit_code == 0 and again.output.count("Kept the results in") == 1, again.output
    assert json.loads((run / names[1]).read_text())["results"]["fid"] == fids[1]
    assert evaluate.result_path_beside("/r/network-snapshot-000002.pkl", "is,fid", 10) == f"/r/{names[0]}"
    # report.py's FID panel over kimg.
    assert report.metric_series(str(run))["fid10_full"] == ([2, 12], fids)
    # The same reference under another path is the same request; a reference rebuilt with other content is not.
    shutil.copyfile(root / "ref1.npz", tmp_path / "ref-copy.npz")
    copied = [tmp_path / "ref-copy.npz" if a == root / "ref1.npz" else a for a in common]
    again = _invoke(["calc", "--network", run, *copied])
    assert again.exit_code == 0 and again.output.count("Kept the results in") == 2, again.output
    with np.load(root / "ref1.npz") as ref:
        np.savez(tmp_path / "ref-copy.npz", **{key: ref[key] + (key == "mu") for key in ref.files})
    rebuilt = _invoke(["calc", "--network", run, *copied])
    assert rebuilt.exit_code == 1, rebuilt.output
    assert f"Error: {run / names[0]} measured against another reference ('{root / 'ref1.npz'}' there, " \
        in rebuilt.output
    # Refused before anything is measured, also when the first network has no result yet (it was measured, maybe
    # for hours, before the kimg-12 result was reached).
    (run / names[0]).rename(tmp_path / "moved-result.json")
    rebuilt = _invoke(["calc", "--network", run, *copied])
    assert rebuilt.exit_code == 1 and "Computing" not in rebuilt.output and "Loading network" not in rebuilt.output
    assert f"Error: {run / names[1]} measured against another reference" in rebuilt.output, rebuilt.output
    (tmp_path / "moved-result.json").rename(run / names[0])
    # A kept result with a non-finite value (written as "nan", strict JSON) is a number again: no crash, not lowest.
    diverged = json.loads((run / names[0]).read_text())
    diverged["results"]["fid"] = "nan"
    (run / names[0]).write_text(json.dumps(diverged))
    again = _invoke(["calc", "--network", run, *common])
    assert again.exit_code == 0 and again.output.count("Kept the results in") == 2, again.output
    assert "network-snapshot-000002.pkl  fid10_full nan; is10 1 +- 0\n" in again.output
    assert f"network-snapshot-000012.pkl  fid10_full {fids[1]:g}; is10 1 +- 0  <- lowest FID\n" in again.output
    # --out has no meaning here; a folder with no network pickles says so.
    result = _invoke(["calc", "--network", run, "--out", tmp_path / "x.json", *common])
    assert result.exit_code == 2 and "--out: with a run folder as --network" in result.output, result.output
    (tmp_path / "empty").mkdir()
    result = _invoke(["calc", "--network", tmp_path / "empty", *common])
    assert result.exit_code == 1 and "holds no network-snapshot-*.pkl or network-phema-*.pkl" in result.output


def test_a_run_folder_result_is_kept_only_for_the_same_detector(workdir, single_rank, network_pkl, tmp_path):
    """A kept result must have been measured with the detector this request would use: the same file under another
    path is kept (by sha256), another file is refused naming both; a detector the metrics do not use is not compared."""
    root, run = workdir["root"], tmp_path / "00000-run"
    run.mkdir()
    shutil.copyfile(network_pkl, run / "network-snapshot-000004.pkl")
    common = ["--ref", root / "ref1.npz", "--seeds", "0-9", "--steps", 2, "--batch", 8, "--device", "cpu"]
    first = _invoke(["calc", "--network", run, *common, *_detector_args(root)])
    assert first.exit_code == 0 and "Computing fid" in first.output, first.output
    result = run / "network-snapshot-000004-fid10_full.json"
    written = result.read_bytes()
    shutil.copyfile(root / "inception.pt", tmp_path / "inception-copy.pt")
    shutil.copyfile(root / "vgg16.pt", tmp_path / "inception-other.pt")  # a file that is not the same detector
    copy = _invoke(["calc", "--network", run, *common, "--detector", f"inception={tmp_path / 'inception-copy.pt'}",
                    "--detector", f"vgg16={tmp_path / 'inception-other.pt'}"])  # fid reads no vgg16
    assert copy.exit_code == 0 and "Kept the results in" in copy.output and "Computing" not in copy.output, \
        copy.output
    other = _invoke(["calc", "--network", run, *common, "--detector", f"inception={tmp_path / 'inception-other.pt'}"])
    assert other.exit_code == 1, other.output
    assert (f"Error: {result} was measured with another inception detector ('{root / 'inception.pt'}' there, "
            f"'{tmp_path / 'inception-other.pt'}' here): move it away to measure "
            f"{run / 'network-snapshot-000004.pkl'} again with these options") in other.output.replace("\n", " ")
    # Without sha256 on either side (a record of a URL not in this cache), the source is compared.
    record = json.loads(written)
    record["detectors"]["inception"]["sha256"] = None
    result.write_text(json.dumps(record))
    same_path = _invoke(["calc", "--network", run, *common, *_detector_args(root)])
    assert same_path.exit_code == 0 and "Kept the results in" in same_path.output, same_path.output
    spec = detectors_lib.DETECTORS["inception"]
    assert evaluate.planned_detectors(["fid", "is"], None)["inception"]["sources"] == [spec.url, *spec.alternate_urls]
    planned = evaluate.planned_detectors(["pr", "fid"], {"inception": str(root / "inception.pt"), "vgg16": "no.pt"})
    assert planned == dict(vgg16=dict(sources=["no.pt"], sha256=None), inception=dict(
        sources=[str(root / "inception.pt")], sha256=hashlib.sha256((root / "inception.pt").read_bytes()).hexdigest()))


def test_a_run_folder_takes_the_fid_route_and_keeps_a_result_only_for_the_same_route(workdir, single_rank,
                                                                                     network_pkl, tmp_path):
    """--fid-route reaches each network of a run folder (recorded beside it), and a rerun with another route refuses
    the kept result before anything is measured instead of keeping it as 'the same request'."""
    root, run = workdir["root"], tmp_path / "00000-run"
    run.mkdir()
    shutil.copyfile(network_pkl, run / "network-snapshot-000004.pkl")
    common = ["--ref", root / "ref1.npz", "--seeds", "0-9", "--steps", 2, "--batch", 8, "--device", "cpu",
              *_detector_args(root)]
    first = _invoke(["calc", "--network", run, *common, "--fid-route", "eigvals"])
    assert first.exit_code == 0 and "Computing fid" in first.output, first.output
    result = run / "network-snapshot-000004-fid10_full.json"
    assert json.loads(result.read_text())["options"]["fid_route"] == "eigvals"
    kept = _invoke(["calc", "--network", run, *common, "--fid-route", "eigvals"])
    assert kept.exit_code == 0 and "Kept the results in" in kept.output, kept.output
    other = _invoke(["calc", "--network", run, *common])  # the default route: sqrtm
    assert other.exit_code == 1 and "Loading network" not in other.output, other.output
    assert (f"Error: {result} took FID by another route (--fid-route eigvals there, sqrtm here): move it away"
            in other.output.replace("\n", " ")), other.output
    record = json.loads(result.read_text())
    del record["options"]["fid_route"]  # as written before the route was recorded: EDM's sqrtm
    result.write_text(json.dumps(record))
    assert "Kept the results in" in _invoke(["calc", "--network", run, *common]).output


def test_a_run_folder_result_is_kept_only_for_the_same_network_file(workdir, single_rank, network_pkl, tmp_path):
    """A pickle written again under its name (phema.py run again, a file replaced) is another network: the result
    beside it is refused, naming both sha256, before anything is measured; a result written before the network's
    sha256 was recorded is kept as before."""
    from torch_utils import persistence
    from training.preconditioning import EDMPrecond

    root, run = workdir["root"], tmp_path / "00000-run"
    run.mkdir()
    pkl = run / "network-snapshot-000004.pkl"
    shutil.copyfile(network_pkl, pkl)
    common = ["--ref", root / "ref1.npz", "--seeds", "0-9", "--steps", 2, "--batch", 8, "--device", "cpu",
              *_detector_args(root)]
    first = _invoke(["calc", "--network", run, *common])
    assert first.exit_code == 0 and "Computing fid" in first.output, first.output
    result = run / "network-snapshot-000004-fid10_full.json"
    written = json.loads(result.read_text())
    ours = hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert written["source"]["network_sha256"] == ours
    torch.manual_seed(1)  # another network of the same shape, saved under the same name
    other = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=8,
                       channel_mult=[1], num_blocks=1, attn_resolutions=[])
    persistence.save_network_pickle(str(pkl), dict(ema=other))
    theirs = hashlib.sha256(pkl.read_bytes()).hexdigest()
    refused = _invoke(["calc", "--network", run, *common])
    assert refused.exit_code == 1 and "Loading network" not in refused.output, refused.output
    assert (f"Error: {result} measured another file of that name (network sha256 {ours[:12]}... there, "
            f"{theirs[:12]}... here): move it away to measure {pkl} again") in refused.output.replace("\n", " ")
    assert json.loads(result.read_text()) == written
    del written["source"]["network_sha256"]  # as written before the sha256 was recorded
    result.write_text(json.dumps(written))
    kept = _invoke(["calc", "--network", run, *common])
    assert kept.exit_code == 0 and "Kept the results in" in kept.output and "Computing" not in kept.output, \
        kept.output


def test_a_resumed_run_folder_evaluates_the_snapshots_of_the_runs_it_continued(workdir, single_rank, network_pkl,
                                                                               tmp_path, monkeypatch):
    """B resumed from A's kimg-4 state (train.py writes a resume into a new folder): `calc --network=B` measures A's
    snapshots up to kimg 4, then B's, each result beside its pickle; report.py of B plots them all."""
    from training import report

    root, runs = workdir["root"], {name: tmp_path / f"0000{index}-run" for index, name in enumerate("AB")}
    for name, kimgs in (("A", [2, 12]), ("B", [8])):
        runs[name].mkdir()
        for kimg in kimgs:
            shutil.copyfile(network_pkl, runs[name] / f"network-snapshot-{kimg:06d}.pkl")
    (runs["B"] / "training_options.json").write_text(json.dumps(
        {"resume_state_dump": str(runs["A"] / "training-state-000004.pt")}))
    monkeypatch.setenv("HOME", str(tmp_path))  # --network=~/...: the shell expands no ~ after "="
    result = _invoke(["calc", f"--network=~/{runs['B'].name}", "--ref", root / "ref1.npz", "--seeds", "0-9",
                      "--steps", 2, "--batch", 8, "--device", "cpu", *_detector_args(root)])
    assert result.exit_code == 0, result.output
    assert (f"Evaluating 2 networks of {runs['B']} (and the runs it continued: {runs['A']} up to kimg 4): fid for 10 "
            f"images each") in result.output
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.glob("*/*-fid10_full.json"))
    assert written == ["00000-run/network-snapshot-000002-fid10_full.json",
                       "00001-run/network-snapshot-000008-fid10_full.json"]
    # The closing table names a continued run's pickle with its folder (it is not in B, the folder named above it).
    assert re.search(r"^  00000-run/network-snapshot-000002\.pkl ", result.output, re.M), result.output
    assert re.search(r"^  network-snapshot-000008\.pkl ", result.output, re.M), result.output
    fid = json.loads((runs["A"] / "network-snapshot-000002-fid10_full.json").read_text())["results"]["fid"]
    assert report.metric_series(str(runs["B"]))["fid10_full"] == ([2, 8], [fid, fid])  # the same network twice
    assert evaluate.run_networks(str(runs["A"])) == [str(runs["A"] / f"network-snapshot-{k:06d}.pkl") for k in (2, 12)]


def test_planned_detectors_never_download_and_take_the_alternate_url_as_the_canonical_detector(tmp_path, monkeypatch):
    """Comparing a kept result's detectors reads only what is on this machine (it fetched the 100 MB canonical file,
    or stalled offline, before any result was compared); a result of the canonical detector read from its alternate
    URL (StyleGAN2-ADA's file of the same network, which load_detector falls back to) is the same detector."""
    from dnnlib import util

    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(util, "_download", lambda *args, **kwargs: pytest.fail(f"downloaded {args[0]}"))
    spec = detectors_lib.DETECTORS["inception"]
    assert evaluate.planned_detectors(["fid"], None) == dict(inception=dict(
        sources=[spec.url, *spec.alternate_urls], sha256=None))
    cached = util.url_cache_path(spec.url)
    os.makedirs(os.path.dirname(cached))
    with open(cached, "wb") as f:
        f.write(b"canonical detector bytes")
    planned = evaluate.planned_detectors(["fid"], None)["inception"]
    assert planned["sha256"] == hashlib.sha256(b"canonical detector bytes").hexdigest()

    def place(p):
        return p if p is None or "://" in p else os.path.abspath(p)
    alternate = dict(source=spec.alternate_urls[0], sha256="0" * 64)  # another file's hash: ADA's .pt
    assert evaluate._same_detector(alternate, planned, place)
    assert not evaluate._same_detector(dict(source=str(tmp_path / "other.pt"), sha256="0" * 64), planned, place)
    # An override is still compared by content: the same path rewritten with another network is not the same.
    override = dict(sources=[str(tmp_path / "inc.pt")], sha256="1" * 64)
    assert not evaluate._same_detector(dict(source=str(tmp_path / "inc.pt"), sha256="0" * 64), override, place)
    assert evaluate._same_detector(dict(source=str(tmp_path / "copy.pt"), sha256="1" * 64), override, place)


def test_home_folder_in_dataset_and_output_paths(workdir, tmp_path, monkeypatch):
    """--data=~/..., --dest=~/..., --images=~/..., --out=~/...: the shell expands no ~ after "=", and fid.py did not
    either (--dest wrote into a folder named '~' in the current one; --images did not exist)."""
    root = workdir["root"]
    shutil.copytree(root / "gen", tmp_path / "home" / "gen")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = _invoke(["ref", "--data=~/gen", "--dest=~/ref.npz", "--workers", 0, *_detector_args(root)])
    assert result.exit_code == 0, result.output
    result = _invoke(["calc", "--images=~/gen", "--ref=~/ref.npz", "--num-images", 36, "--out=~/fid.json",
                      "--workers", 0, *_detector_args(root)])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "home")) == ["fid.json", "gen", "ref.npz"]
    assert sorted(os.listdir(tmp_path)) == ["home"]
