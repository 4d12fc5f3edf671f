"""dnnlib.util (open_url, EasyDict, construct_class_by_name) and single-process training_stats."""

import hashlib
import json
import os
import sys

import pytest
import torch

from dnnlib import util
from torch_utils import distributed, misc, training_stats


def test_easydict_attribute_access():
    d = util.EasyDict(a=1)
    d.b = 2
    assert d == {"a": 1, "b": 2}
    assert d.a == 1 and d["b"] == 2
    del d.a
    assert "a" not in d
    with pytest.raises(AttributeError):
        _ = d.missing


def test_construct_class_by_name():
    obj = util.construct_class_by_name(class_name="collections.OrderedDict", a=1)
    assert type(obj).__name__ == "OrderedDict" and obj["a"] == 1
    sampler = util.construct_class_by_name(class_name="torch.nn.Linear", in_features=3, out_features=2)
    assert tuple(sampler.weight.shape) == (2, 3)
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        util.construct_class_by_name(class_name="no_such_module_xyz.Thing")


def test_open_url_reads_local_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc123")
    with util.open_url(str(path)) as f:
        assert f.read() == b"abc123"
    assert util.open_url(str(path), return_filename=True) == str(path)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        util.open_url(str(tmp_path / "nope.bin"))


def test_open_url_caches_file_url(tmp_path):
    src = tmp_path / "detector.pkl"
    src.write_bytes(b"detector-bytes")
    cache_dir = tmp_path / "cache"
    url = src.as_uri()
    assert url.startswith("file://")
    cached = util.open_url(url, cache_dir=str(cache_dir), return_filename=True)
    assert os.path.dirname(cached) == str(cache_dir)
    assert open(cached, "rb").read() == b"detector-bytes"
    # The cached copy stays usable after the original moves away.
    src.unlink()
    assert util._cache_file_name(url) in os.listdir(cache_dir)
    with open(cached, "rb") as f:
        assert f.read() == b"detector-bytes"


def test_open_url_checksum(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"payload")
    good = "sha256:" + hashlib.sha256(b"payload").hexdigest()
    assert util.open_url(str(path), checksum=good, return_filename=True) == str(path)
    assert util.open_url(str(path), checksum=hashlib.md5(b"payload").hexdigest(), return_filename=True)
    with pytest.raises(IOError, match="checksum mismatch"):
        util.open_url(str(path), checksum="sha256:" + "0" * 64)


def test_open_url_offline_error_names_url(tmp_path, monkeypatch):
    import requests

    def refuse(*args, **kwargs):
        raise requests.ConnectionError("network is unreachable")

    monkeypatch.setattr(requests.Session, "get", refuse)
    url = "https://example.invalid/metrics/inception-2015-12-05.pkl"
    with pytest.raises(IOError) as info:
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=1, verbose=False)
    message = str(info.value)
    assert url in message
    assert "local path" in message
    assert not os.listdir(tmp_path)  # Nothing half-written in the cache.


def test_open_url_serves_from_cache_without_network(tmp_path, monkeypatch):
    import requests

    url = "https://example.invalid/file.npz"
    cache_path = tmp_path / util._cache_file_name(url)
    cache_path.write_bytes(b"cached")
    monkeypatch.setattr(requests.Session, "get", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no network")))
    with util.open_url(url, cache_dir=str(tmp_path)) as f:
        assert f.read() == b"cached"


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "c"))
    assert util.make_cache_dir_path("downloads") == str(tmp_path / "c" / "downloads")


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with util.atomic_output(str(target)) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with util.atomic_output(str(target)) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole"


def test_parse_bool_and_format_time():
    assert util.parse_bool("yes") is True and util.parse_bool("0") is False
    with pytest.raises(ValueError, match="maybe"):
        util.parse_bool("maybe")
    assert util.format_time(59) == "59s"
    assert util.format_time(3 * 3600 + 4 * 60 + 5) == "3h 04m 05s"


def test_json_safe_writes_non_finite_numbers_as_strings_and_evaluate_writes_strict_json(tmp_path):
    from metrics import evaluate

    value = dict(kid=float("nan"), s=[float("inf"), -float("inf"), 1.5, 2], name="x", nested=dict(t=(float("nan"),)))
    assert util.json_safe(value) == dict(kid="nan", s=["inf", "-inf", 1.5, 2], name="x", nested=dict(t=["nan"]))
    assert float(util.json_safe(float("-inf"))) == -float("inf")
    path = tmp_path / "fid.json"
    evaluate.write_json(dict(results=dict(fid=2.5, kid=float("nan"))), str(path))
    strict = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name}"))
    assert strict == dict(results=dict(fid=2.5, kid="nan"))


def test_distributed_single_process_defaults():
    distributed.init()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_sum_(t), torch.tensor([1.0, 2.0]))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_distributed_init_with_cuda_without_an_index_takes_the_local_rank(monkeypatch):
    """train.py --device=cuda passes 'cuda': torch.cuda.set_device refuses a device without an index."""
    calls = []

    def set_device(device):
        if torch.device(device).index is None:  # torch's own rule (_get_device_index(optional=False))
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        calls.append(torch.device(device))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setenv("LOCAL_RANK", "1")
    try:
        distributed.init(device="cuda")
        assert calls == [torch.device("cuda", 1)] and distributed.device() == torch.device("cuda", 1)
        distributed.init(device="cuda:0")
        assert calls[-1] == torch.device("cuda", 0)
    finally:
        monkeypatch.delenv("LOCAL_RANK")
        distributed.init(device="cpu")


def test_training_stats_moments_single_process(tmp_path):
    training_stats.reset()
    collector = training_stats.Collector(regex="Loss/.*")
    values = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    training_stats.report("Loss/loss", values)
    training_stats.report("Loss/loss", 4.0)
    training_stats.report("Other/x", 1.0)
    collector.update()
    expected = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0], dtype=torch.float64)
    assert collector.num("Loss/loss") == 5
    assert collector.mean("Loss/loss") == pytest.approx(expected.mean().item())
    assert collector.std("Loss/loss") == pytest.approx(expected.std(unbiased=False).item())
    assert collector.names() == ["Loss/loss"]
    path = tmp_path / "stats.jsonl"
    with open(path, "w") as f:
        training_stats.write_jsonl_line(f, collector)
    line = json.loads(path.read_text())
    assert line["Loss/loss"]["num"] == 5 and "timestamp" in line
    # The next interval starts from zero; keep_previous reports the old value when nothing new arrived.
    training_stats.report("Loss/loss", 10.0)
    collector.update()
    assert collector.num("Loss/loss") == 1 and collector.mean("Loss/loss") == 10.0
    assert training_stats.cumulative("Loss/loss")["num"] == 6
    collector.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_training_stats_report_leaves_the_callers_tensor_alone(dtype):
    # report() squares its own float64 copy in place (one temporary, not three): never the caller's tensor, which
    # for float64 is the same storage .to(float64) returns.
    training_stats.reset()
    collector = training_stats.Collector(regex="Loss/.*")
    values = torch.tensor([[-1.5, 2.0], [3.0, 0.25]], dtype=dtype)
    before = values.clone()
    assert training_stats.report("Loss/x", values) is values
    assert torch.equal(values, before)
    collector.update()
    expected = before.to(torch.float64)
    assert collector.num("Loss/x") == 4
    assert collector.mean("Loss/x") == pytest.approx(expected.mean().item(), rel=1e-15)
    assert collector.std("Loss/x") == pytest.approx(expected.std(unbiased=False).item(), rel=1e-14)
    collector.close()


def test_training_stats_binned_equals_per_bin_moments():
    training_stats.reset()
    collector = training_stats.Collector(regex="Loss/sigma.*")
    gen = torch.Generator().manual_seed(0)
    values, keys = torch.randn(200, generator=gen), torch.exp(torch.randn(200, generator=gen) * 2)
    edges = (0.2, 1, 5)
    training_stats.report_binned("Loss/sigma", values[:120], keys[:120], edges)
    training_stats.report_binned("Loss/sigma", values[120:], keys[120:], edges)
    collector.update()
    names = training_stats.bin_names("Loss/sigma", edges)
    assert names == ["Loss/sigma<0.2", "Loss/sigma0.2-1", "Loss/sigma1-5", "Loss/sigma>5"]
    bounds = [0, 0.2, 1, 5, float("inf")]
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        chosen = values[(keys >= lo) & (keys < hi)].double()  # an edge belongs to the bin above it
        assert collector.num(name) == len(chosen) > 0
        assert collector.mean(name) == pytest.approx(chosen.mean().item(), rel=1e-12)
        assert collector.std(name) == pytest.approx(chosen.std(unbiased=False).item(), rel=1e-9)
    before = {name: training_stats.cumulative(name)["num"] for name in names}
    training_stats.report_binned("Loss/sigma", torch.tensor([1.0]), torch.tensor([1.0]), edges)  # on an edge
    collector.update()
    after = {name: training_stats.cumulative(name)["num"] for name in names}
    assert [after[n] - before[n] for n in names] == [0, 0, 1, 0]
    collector.close()


def test_binned_report_builds_its_edges_tensor_once(monkeypatch):
    """Every training step reports the loss by sigma bin: the edges tensor is made on the first call only (built from
    Python numbers on a GPU it is a blocking host-to-device copy, a host sync per step)."""
    values, keys, edges = torch.randn(8), torch.rand(8) * 10, (0.5, 2.0, 7.0)
    training_stats.report_binned("Loss/sigma", values, keys, edges)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor built from Python numbers in the step")

    monkeypatch.setattr(torch, "tensor", refuse)
    monkeypatch.setattr(torch, "as_tensor", refuse)
    training_stats.report_binned("Loss/sigma", values, keys, edges)


def test_loss_reports_its_loss_by_noise_level():
    from losses.denoising import SIGMA_BIN_EDGES, EDMLoss

    class Identity(torch.nn.Module):
        def forward(self, x, sigma, labels, augment_labels=None):
            return torch.zeros_like(x)

    training_stats.reset()
    collector = training_stats.Collector(regex="Loss/.*")
    from losses import Batch
    torch.manual_seed(0)
    images = torch.rand(64, 1, 4, 4) * 2 - 1
    loss_fn = EDMLoss()
    torch.manual_seed(1)
    loss = loss_fn(Identity(), Batch(images=images, labels=torch.zeros(64, 0)))
    torch.manual_seed(1)
    sigma = loss_fn.sample_sigma(None, 64, "cpu").flatten()
    collector.update()
    per_image = loss.reshape(64, -1).mean(1).double()
    names = training_stats.bin_names("Loss/sigma", SIGMA_BIN_EDGES)
    bins = torch.bucketize(sigma.double(), torch.tensor(SIGMA_BIN_EDGES, dtype=torch.float64), right=True)
    assert sum(collector.num(name) for name in names) == 64
    for index, name in enumerate(names):
        if (bins == index).any():
            assert collector.mean(name) == pytest.approx(per_image[bins == index].mean().item(), rel=1e-9)
    collector.close()


def test_stacked_random_generator_is_per_seed():
    a = misc.StackedRandomGenerator("cpu", [5, 7]).randn([2, 3, 4, 4])
    b = misc.StackedRandomGenerator("cpu", [7]).randn([1, 3, 4, 4])
    assert torch.equal(a[1], b[0])
    ref = torch.randn([3, 4, 4], generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], ref)
    with pytest.raises(ValueError, match="number of seeds"):
        misc.StackedRandomGenerator("cpu", [1]).randn([2, 3])


def test_nan_to_num_grads():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([float("nan"), float("inf"), -float("inf")])
    misc.nan_to_num_grads_([p])
    assert torch.equal(p.grad, torch.tensor([0.0, 1e5, -1e5]))


def test_file_url_cache_copy_follows_a_source_replaced_with_an_older_time(tmp_path):
    """cp -p / rsync -t give a replaced file an older mtime: the cache copy must still be refreshed."""
    src = tmp_path / "weights.bin"
    src.write_bytes(b"new-version-1")
    os.utime(src, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    cache_dir = str(tmp_path / "cache")
    cached = util.open_url(src.as_uri(), cache_dir=cache_dir, return_filename=True)
    assert open(cached, "rb").read() == b"new-version-1"
    src.write_bytes(b"old-version")
    os.utime(src, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))  # older than the cache copy
    with util.open_url(src.as_uri(), cache_dir=cache_dir) as f:
        assert f.read() == b"old-version"


def test_file_url_checksum_is_checked_on_the_returned_copy(tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"payload")
    good = "sha256:" + hashlib.sha256(b"payload").hexdigest()
    cache_dir = str(tmp_path / "cache")
    cached = util.open_url(src.as_uri(), cache_dir=cache_dir, return_filename=True, checksum=good)
    stat = os.stat(src)
    with open(cached, "wb") as f:  # same size and time as the source, other bytes
        f.write(b"PAYLOAD")
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert util.open_url(src.as_uri(), cache_dir=cache_dir, return_filename=True, checksum=good) == cached
    assert open(cached, "rb").read() == b"payload"
    # A source that does not fit never lands in the cache.
    src.write_bytes(b"tampered")
    with pytest.raises(OSError) as info:
        util.open_url(src.as_uri(), cache_dir=cache_dir, checksum=good)
    assert str(info.value) == (f"checksum mismatch for {src.as_uri()}: expected {good[7:]} (sha256), got "
                               f"{hashlib.sha256(b'tampered').hexdigest()}")
    assert open(cached, "rb").read() == b"payload" and os.listdir(cache_dir) == [os.path.basename(cached)]


def test_open_url_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ref.npz").write_bytes(b"home-file")
    assert util.open_url("~/ref.npz", return_filename=True) == str(tmp_path / "ref.npz")
    with util.open_url("file://~/ref.npz", cache=False) as f:
        assert f.read() == b"home-file"
    with pytest.raises(FileNotFoundError, match=f"no such file: {tmp_path / 'nope.pt'} \\(from ~/nope.pt\\)"):
        util.open_url("~/nope.pt")


def test_checksum_prefix_and_its_format(tmp_path):
    path = tmp_path / "vgg16_bn-6c64b313.pth"
    path.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert util.open_url(str(path), checksum=f"sha256:{digest[:8]}", return_filename=True) == str(path)
    with pytest.raises(OSError, match=f"expected 0123abcd \\(sha256 prefix\\), got {digest}"):
        util.open_url(str(path), checksum="sha256:0123abcd")
    with pytest.raises(ValueError, match="expected 64 hex digits, or a prefix of at least 8"):
        util.open_url(str(path), checksum="sha256:0123")


def test_concise_warnings_are_one_line(monkeypatch):
    """The CLIs show a warning without its source line (`return func(*args, **kwargs)` read like a traceback)."""
    import warnings
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    assert "return func" in warnings.formatwarning("8x8 images", UserWarning, "/x/fid.py", 51,
                                                   line="    return func(*args, **kwargs)")
    util.concise_warnings()
    assert warnings.formatwarning("8x8 images", UserWarning, "/x/fid.py", 51,
                                  line="    return func(*args, **kwargs)") == "/x/fid.py:51: UserWarning: 8x8 images\n"


def _run_cli_result(monkeypatch, capsys, command, args, local_rank):
    import warnings
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # run_cli sets it
    monkeypatch.setattr("sys.argv", ["tool.py", *args])
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(SystemExit) as exit_info:
        util.run_cli(command)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_run_cli_prints_usage_errors_once_per_node(monkeypatch, capsys):
    """Under torchrun every rank parses the same command line: a usage error is printed by local rank 0 only (8 GPUs
    printed it 8 times), with exit code 2 on every rank. Errors that can differ between ranks stay on every rank."""
    import click

    @click.command()
    @click.option("--batch", type=int, default=1)
    @click.option("--fail", is_flag=True)
    def tool(batch, fail):
        if fail:
            raise click.ClickException(f"rank-specific failure at batch {batch}")
        click.echo(f"batch={batch}")

    for rank in (None, "0"):
        code, out, err = _run_cli_result(monkeypatch, capsys, tool, ["--batch=abc"], rank)
        assert code == 2 and out == "" and "Error: Invalid value for '--batch': 'abc' is not a valid integer" in err
    assert _run_cli_result(monkeypatch, capsys, tool, ["--batch=abc"], "3") == (2, "", "")
    assert _run_cli_result(monkeypatch, capsys, tool, ["--bogus"], "1") == (2, "", "")
    assert _run_cli_result(monkeypatch, capsys, tool, ["--batch=4", "--fail"], "3") == (
        1, "", "Error: rank-specific failure at batch 4\n")
    assert _run_cli_result(monkeypatch, capsys, tool, ["--batch=4"], "3") == (0, "batch=4\n", "")
    code, out, err = _run_cli_result(monkeypatch, capsys, tool, ["--help"], "3")
    assert code == 0 and "--batch INTEGER" in out and err == ""


def test_train_cli_usage_error_silent_off_local_rank_zero(tmp_path):
    """The real CLI: a bad option under torchrun's LOCAL_RANK=1 exits 2 without a word; LOCAL_RANK=0 explains."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for rank in ("0", "1"):
        env = dict(os.environ, LOCAL_RANK=rank)
        results[rank] = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"--outdir={tmp_path}",
                                        f"--data={tmp_path / 'missing.zip'}"], env=env, cwd=tmp_path,
                                       capture_output=True, text=True, timeout=120)
    assert results["0"].returncode == 2 and "missing.zip: dataset path does not exist" in results["0"].stderr
    assert results["1"].returncode == 2 and results["1"].stderr == "" and results["1"].stdout == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), a file whose writes fail ENOSPC")
def test_logger_on_a_full_disk_names_its_file_once_and_closes_quietly(capsys):
    """train.py's log.txt on a full disk: a print raises one OutputPathError naming the file, which is then let go
    (what is printed next reaches the terminal); close() with a line still in the file's buffer (train.py writes its
    'Error: ...' line there on the way out of the full disk's error) does not raise over that error."""
    logger = util.Logger(file_name="/dev/full", file_mode="a")
    try:
        with pytest.raises(util.OutputPathError, match=r"^cannot write /dev/full \(No space left on device\)$"):
            print("tick 1")
        assert logger.file is None
        print("after")
    finally:
        logger.close()
    assert capsys.readouterr().out == "tick 1after\n"

    logger = util.Logger(file_name="/dev/full", file_mode="a")
    logger.file.write("Error: cannot write training-state-000001.pt (No space left on device)\n")  # buffered
    logger.close()
    assert logger.file is None and sys.stdout is not logger and sys.stderr is not logger
