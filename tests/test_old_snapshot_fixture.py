"""Files written by the code at commit 86eed3c (before the process/registry rework) keep working.

tests/fixtures/main-86eed3c/ holds a snapshot and a training state of a tiny conditional DDPM++ trained with
STF + AOT (so the snapshot pickles STFLoss/AOTLoss objects, as snapshots of that time did), the images that
commit's generate.py made from the snapshot, and the EMA after that commit resumed the state to 2 kimg. The commands
are in expected.json. Pixels may differ by one level and sums by float noise across torch builds; on the build the
fixture was made with they are equal. The resumed run draws dropout masks and other random numbers whose streams
changed between torch 2.5.1 and 2.14.1 (and, in torch 2.5.1, between CPUs), so expected.json holds its sums for each
stream the suite is run with.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "main-86eed3c")
EXPECTED = json.load(open(os.path.join(FIXTURE, "expected.json")))


def _run(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("key, extra", [("heun_steps4", []),
                                        ("dpmpp_2m_steps4_class3", ["--solver=dpmpp_2m", "--class=3"])])
def test_old_snapshot_samples_the_same_images(tmp_path, key, extra):
    _run("generate.py", f"--network={FIXTURE}/network-snapshot-000001.pkl", f"--outdir={tmp_path}", "--seeds=0-3",
         "--steps=4", "--device=cpu", *extra)
    for name, pixels in EXPECTED[key].items():
        ours = np.asarray(PIL.Image.open(tmp_path / name)).astype(np.int64)
        assert np.abs(ours - np.asarray(pixels)).max() <= 1, name


def _torch_rng_fingerprint():
    """Tells apart torch builds whose CPU dropout, bernoulli_, multinomial and exponential_ streams differ (torch 2.5.1
    and 2.14.1 do; their randn, rand, randint and randperm streams agree)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        draws = [torch.nn.functional.dropout(torch.ones(1024), 0.5, training=True), torch.empty(1024).bernoulli_(0.5),
                 torch.multinomial(torch.ones(64), 32), torch.empty(64).exponential_()]
    return hashlib.sha256(b"".join(d.double().numpy().tobytes() for d in draws)).hexdigest()[:16]


def test_old_training_state_resumes_to_the_same_weights(tmp_path):
    expected, fingerprint = EXPECTED["resumed_to_2kimg"], _torch_rng_fingerprint()
    if fingerprint != expected["torch_rng"]:
        expected = EXPECTED["resumed_to_2kimg_other_torch_rng"].get(fingerprint)
        assert expected is not None, (
            f"torch {torch.__version__} draws other random numbers ({fingerprint}) than the builds expected.json "
            "records: run its resume command at commit 86eed3c with this torch and OMP_NUM_THREADS=1, and record the "
            "EMA sums")
    _run("dataset_tool.py", "--source=digits", f"--dest={tmp_path}/digits8.zip", "--resolution=8x8",
         "--max-images=256")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(os.path.join(FIXTURE, "training-state-000001.pt"), run_dir)
    _run("train.py", f"--outdir={run_dir}", "--nosubdir", f"--data={tmp_path}/digits8.zip", "--cond=1", "--batch=16",
         "--cbase=8", "--cres=1,1", "--blocks=1", "--attn=4", "--duration=0.002", "--lr=0.002", "--lr-rampup=0",
         "--ema=0.001", "--augment=0.12", "--dropout=0.1", "--tick=1", "--snap=1", "--dump=1", "--workers=0",
         "--device=cpu", "--stf=1", "--stf-refs=32", "--aot=32", f"--resume={run_dir}/training-state-000001.pt")
    state = torch.load(run_dir / "training-state-000002.pt", weights_only=True)
    assert int(state["cur_nimg"]) == expected["cur_nimg"]
    # The key third of each attention bias has no gradient in exact arithmetic (test below): Adam turns rounding noise
    # into steps of about the learning rate, so those entries differ between CPUs (AVX2, AVX-512) and thread counts,
    # and old and new code differ there as two runs of the old code do. Compared: the query and value entries.
    qkv_bias = {name for name in expected["ema_sums"] if name.endswith("qkv.bias")}
    qv_sums, qv_abs_sums = expected.get("qkv_bias_qv_sums", {}), expected.get("qkv_bias_qv_abs_sums", {})
    assert not qv_sums or set(qv_sums) == qkv_bias
    for name, total in expected["ema_sums"].items():
        tensor, abs_total = state["ema"][name].double(), expected["ema_abs_sums"][name]
        if name in qkv_bias:
            if name not in qv_sums:  # recorded only for torch 2.14.1's random streams
                continue
            tensor, total, abs_total = tensor[_not_key(len(tensor))], qv_sums[name], qv_abs_sums[name]
        assert tensor.sum().item() == pytest.approx(total, rel=1e-5, abs=1e-6), name
        assert tensor.abs().sum().item() == pytest.approx(abs_total, rel=1e-5, abs=1e-6), name


def _not_key(num_channels):
    """The query and value channels of a qkv projection: UNetBlock reshapes them to (..., 3, -1) per head and channel,
    so channel c is the query, key or value as c % 3 is 0, 1 or 2."""
    return torch.arange(num_channels) % 3 != 1


def test_attention_key_bias_has_no_gradient():
    # softmax over keys is unchanged when every key moves by the same bias: q . (k + b) = q . k + q . b per query.
    from training.networks import UNetBlock

    torch.manual_seed(0)
    block = UNetBlock(8, 8, emb_channels=16, attention=True, channels_per_head=4).double()
    x, emb = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        block.qkv.bias.normal_()
        block.proj.weight.normal_()  # zero-initialized: no gradient would reach qkv at all
    (block(x, emb) * torch.randn(2, 8, 4, 4, dtype=torch.float64)).sum().backward()
    grad, query_value = block.qkv.bias.grad, _not_key(24)
    # Not exactly zero even in float64: the attention weights are computed in float32, as in EDM (2.9e-6 here, against
    # a median of the query and value gradients near 5).
    assert grad[~query_value].abs().max() < 1e-5 * grad[query_value].abs().median()
    assert grad[query_value].abs().min() > 1e-3


def test_old_snapshot_imports_its_pickled_loss_safely():
    # Snapshots of that time pickled the loss object; it imports as our classes of the same names, inert.
    from torch_utils import persistence
    from training import snapshots

    data = persistence.load_network_pickle(os.path.join(FIXTURE, "network-snapshot-000001.pkl"))
    loss = data["loss_fn"]
    assert type(loss).__name__ == "AOTLoss" and loss.pool_size == 32
    assert type(loss.base).__name__ == "STFLoss" and loss.base.num_refs == 32 and loss.base.mask_classes
    assert type(loss.base.base).__name__ == "EDMLoss" and loss.base.base.P_mean == -1.2
    snapshot = snapshots.read_snapshot(os.path.join(FIXTURE, "network-snapshot-000001.pkl"))
    assert snapshot.process.name == "edm" and snapshot.net.label_dim == 10  # no record: EDM's process
