"""Two CPU ranks under torchrun (gloo) through torch_utils.distributed.init(): sampler shards and stats reduction."""

import itertools
import json
import os
import subprocess

import numpy as np
import PIL.Image
import pytest
from launch import torchrun

from training.dataset import InfiniteSampler
from training.dataset_tool_lib import convert_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.distributed
def test_two_ranks_sampler_and_training_stats(tmp_path):
    # An 11-image labelled dataset (odd, so the ranks get 6 and 5 of the first pass).
    src = tmp_path / "src"
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    for i, label in enumerate(labels):
        (src / f"c{label}").mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.full((4, 4), i, np.uint8)).save(src / f"c{label}" / f"{i:02d}.png")
    convert_dataset(str(src), str(tmp_path / "d.zip"), progress=False)
    # Class index = sorted sub-folder name; dataset order = sorted path.
    order = sorted(range(11), key=lambda i: (f"c{labels[i]}", f"{i:02d}.png"))
    class_of = {f"c{c}": k for k, c in enumerate(sorted(set(labels)))}
    dataset_labels = [class_of[f"c{labels[i]}"] for i in order]

    num_draws = 30
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = torchrun(2, os.path.join(ROOT, "tests", "dist_worker.py"), "--data", tmp_path / "d.zip", "--out", out,
                   "--num-draws", num_draws)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"], r["backend"], r["device"]) for r in ranks] == [(0, 2, "gloo", "cpu"),
                                                                                  (1, 2, "gloo", "cpu")]

    # Without the window, the first len(dataset) draws are disjoint shards covering the dataset.
    first0, first1 = ranks[0]["draws_no_window"][:6], ranks[1]["draws_no_window"][:5]
    assert not set(first0) & set(first1) and sorted(first0 + first1) == list(range(11))
    perm = np.arange(11)
    np.random.RandomState(11).shuffle(perm)
    assert first0 == perm[0::2].tolist() and first1 == perm[1::2].tolist()

    # With EDM's window, the ranks split one global stream: rank r has global draws r, r + 2, ...
    single = list(itertools.islice(iter(InfiniteSampler(range(11), seed=11)), 2 * num_draws))
    assert ranks[0]["draws"] == single[0::2] and ranks[1]["draws"] == single[1::2]
    for r in ranks:
        assert r["labels_of_draws"] == [dataset_labels[i] for i in r["draws"]]

    # training_stats: identical on both ranks, equal to numpy over all ranks' values.
    values = np.array([1.0, 2.0, 4.0, 6.0])
    for r in ranks:
        s1 = r["stats_round1"]
        assert s1["Loss/value"]["num"] == 4
        assert s1["Loss/value"]["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert s1["Loss/value"]["std"] == pytest.approx(values.std(), abs=1e-12)
        assert s1["Progress/tick"] == {"num": 1, "mean": 5.0, "std": 0.0}  # report0: rank 0's value only
        assert s1["Only/rank1"] == {"num": 1, "mean": 3.0, "std": 0.0}
        s2 = r["stats_round2"]
        assert s2["Loss/value"]["num"] == 2 and s2["Loss/value"]["mean"] == pytest.approx(15.0)
        assert s2["Loss/value"]["std"] == pytest.approx(5.0)
        assert s2["Progress/tick"] == s1["Progress/tick"]  # nothing new: the previous value is kept
        everything = np.concatenate([values, [10.0, 20.0]])
        assert r["cumulative_loss"]["num"] == 6
        assert r["cumulative_loss"]["mean"] == pytest.approx(everything.mean())
        assert r["cumulative_loss"]["std"] == pytest.approx(everything.std())
        assert r["broadcast"] == {"from": 0} and r["all_reduce"] == [3.0]
    assert ranks[0]["stats_round1"] == ranks[1]["stats_round1"]
    assert ranks[0]["warn0"] == [["same on every rank", "dist_worker.py"]] and ranks[1]["warn0"] == []
    assert ranks[0]["stats_round2"] == ranks[1]["stats_round2"]


def test_the_abort_hook_prints_to_the_real_stderr_and_names_peer_failures_in_one_line(monkeypatch):
    import io
    import sys

    from torch_utils import distributed
    exits = []
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    real_stderr, torch_buffer = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", real_stderr)
    monkeypatch.setattr(sys, "stderr", torch_buffer)  # what init_process_group's wrapper does while hooks run
    distributed.excepthook_abort_all_ranks()
    try:
        raise ValueError("the real cause")
    except ValueError as err:
        sys.excepthook(type(err), err, err.__traceback__)
    assert "ValueError: the real cause" in real_stderr.getvalue() and torch_buffer.getvalue() == ""
    assert exits == [1]  # the others must not hang in a collective
    peer = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:29500")
    assert distributed.is_peer_failure(peer) and not distributed.is_peer_failure(ValueError("Broken pipe"))
    real_stderr.truncate(0)
    sys.excepthook(RuntimeError, peer, None)
    assert real_stderr.getvalue().count("\n") == 1 and "[rank1]: stopping: another rank ended (" in \
        real_stderr.getvalue() and exits == [1, 1]


def test_the_abort_hook_is_installed_once_per_process(monkeypatch):
    # generate.py, fid.py and train.py install it at every call: in a sweep script calling them in one process it
    # wrapped itself once more each time, and after a few thousand calls the hook failed with a RecursionError.
    import sys

    from torch_utils import distributed
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    distributed.excepthook_abort_all_ranks()
    hook = sys.excepthook
    for _ in range(3):
        distributed.excepthook_abort_all_ranks()
    assert sys.excepthook is hook is not sys.__excepthook__


def test_the_exit_handler_releases_the_gil_before_destroying_the_process_group(monkeypatch):
    """Before torch 2.8, ~ProcessGroupGloo joined gloo's worker threads holding the GIL while a worker released the
    last collective's tensor under the GIL: a hang at exit (2 in 10 two-rank fid.py runs under torch 2.5.1 on a loaded
    CPU; 0 in 30 with the sleep). The handler must sleep (which releases the GIL) before it destroys the group."""
    from torch_utils import distributed
    calls = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: calls.append(("sleep", seconds)))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    distributed._destroy_at_exit()
    assert len(calls) == 2 and calls[0][0] == "sleep" and calls[0][1] >= 0.05 and calls[1] == ("destroy",)
    calls.clear()
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    distributed._destroy_at_exit()
    assert calls == []  # a single process sleeps for nothing


HOOK_BEFORE_INIT = """
import sys, torch
sys.path.insert(0, {root!r})
from torch_utils import distributed as dist
dist.excepthook_abort_all_ranks()  # before init, as generate.py had it: torch's wrapper buffered its output
dist.init(device="cpu")
if dist.get_rank() == 1:
    raise ValueError("the cause, on rank 1")
dist.barrier()
"""


@pytest.mark.distributed
def test_a_rank_failing_under_torchrun_prints_its_traceback(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(HOOK_BEFORE_INIT.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(torchrun(2, script), env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "ValueError: the cause, on rank 1" in proc.stdout + proc.stderr, proc.stderr[-3000:]
