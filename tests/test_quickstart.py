"""The quick start's pipeline on a budget of seconds: every output file and the metrics JSON keys; reruns with other
settings; and its scripts (setup_env.sh sourced, its install stamp) and .dockerignore."""

import fnmatch
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_pipeline_small_budget(tmp_path):
    from metrics.detectors import StandinInception, save_standin

    save_standin(StandinInception(), str(tmp_path / "standin-inception.pt"))
    outdir = tmp_path / "qs"
    # Relative paths, run from the user's folder: they must not be read from the repository (where the steps run).
    base = [sys.executable, os.path.join(ROOT, "quickstart.py"), "--outdir", "qs", "--resolution", "8", "--kimg", "1",
            "--batch", "16", "--cbase", "8", "--cres", "1,2", "--classifier-epochs", "2", "--device", "cpu",
            "--inception", "standin-inception.pt"]
    args = base + ["--samples", "24", "--steps", "3"]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Results in" in result.stdout

    assert (outdir / "digits-8x8.zip").is_file()
    run = outdir / "training-run"
    for name in ["network-snapshot-000000.pkl", "stats.jsonl", "log.txt", "training_options.json", "DONE",
                 "quickstart.json"]:
        assert (run / name).is_file(), name
    pngs = sorted(p.name for p in (outdir / "samples").rglob("*.png"))
    assert pngs == [f"{seed:06d}.png" for seed in range(24)]
    report_png = Image.open(outdir / "training-report.png")
    assert report_png.size[0] >= 560 and report_png.size[1] >= 300
    grid = Image.open(outdir / "samples-grid.png")
    assert grid.size[0] >= 8 * 4 and grid.size[1] >= 8 * 4
    metrics = json.loads((outdir / "metrics.json").read_text())
    for key in ["classifier_frechet_distance", "classifier_frechet_distance_floor", "classifier_frechet_note",
                "num_images", "classifier", "sample_class_histogram", "fid", "fid_note", "snapshot", "sampler",
                "training_kimg", "total_seconds"]:
        assert key in metrics, key
    assert metrics["num_images"] == 24 and sum(metrics["sample_class_histogram"]) == 24
    assert metrics["classifier_frechet_distance"] > metrics["classifier_frechet_distance_floor"] >= 0
    assert isinstance(metrics["fid"], float) and metrics["fid"] >= 0
    assert metrics["sampler"]["nfe"] == 5
    assert metrics["training_kimg"] == 1 and metrics["snapshot"] == "training-run/network-snapshot-000001.pkl"
    assert "NOT FID" in metrics["classifier_frechet_note"]
    assert (outdir / "fid-ref.npz").is_file() and (outdir / "fid.json").is_file()

    # A second run skips every finished step and rewrites nothing but the metrics.
    snapshot_mtime = os.path.getmtime(run / "network-snapshot-000000.pkl")
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "exists, skipping" in again.stdout and "is complete, skipping" in again.stdout
    assert ("FID reference: fid-ref.npz is of this dataset and detector, skipping" in again.stdout
            and "FID: fid.json is of these samples, reference and detector, skipping" in again.stdout), again.stdout
    assert os.path.getmtime(run / "network-snapshot-000000.pkl") == snapshot_mtime

    # Fewer samples: the PNGs of seeds 16..23 stay in samples/ but are not evaluated.
    fewer = subprocess.run(base + ["--samples", "16", "--steps", "3"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert fewer.returncode == 0, fewer.stdout[-3000:] + fewer.stderr[-3000:]
    metrics = json.loads((outdir / "metrics.json").read_text())
    assert metrics["num_images"] == 16 and sum(metrics["sample_class_histogram"]) == 16
    assert json.loads((outdir / "fid.json").read_text())["num_images"] == 16  # recomputed: other samples
    assert "fid-ref.npz is of this dataset and detector, skipping" in fewer.stdout

    # Other sampler steps: the samples are regenerated (generate.py alone would refuse the folder).
    steps = subprocess.run(base + ["--samples", "16", "--steps", "4"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert steps.returncode == 0, steps.stdout[-3000:] + steps.stderr[-3000:]
    assert "regenerating" in steps.stdout
    assert json.loads((outdir / "metrics.json").read_text())["sampler"]["nfe"] == 7

    # Another training length: refused, the finished run left as it was.
    longer_args = base + ["--samples", "16"]
    longer_args[longer_args.index("--kimg") + 1] = "2"
    longer = subprocess.run(longer_args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert longer.returncode != 0 and "--kimg 1 (now 2)" in longer.stderr, longer.stderr[-3000:]
    assert os.path.getmtime(run / "network-snapshot-000000.pkl") == snapshot_mtime


def _finished_run(run_dir, settings):
    os.makedirs(run_dir)
    (run_dir / "quickstart.json").write_text(json.dumps(dict(settings=settings)))
    (run_dir / "network-snapshot-000001.pkl").write_bytes(b"")
    (run_dir / "DONE").write_text("")


QUICK_SETTINGS = ["--resolution", "8", "--kimg", "1", "--batch", "16", "--cbase", "8", "--cres", "1,2"]


@pytest.mark.parametrize("changed, message", [
    (["--kimg", "3"], "--kimg 1 (now 3)"),
    (["--resolution", "16"], "--resolution 8 (now 16)"),
    (["--cres", "1,2,2"], "--cres 1,2 (now 1,2,2)"),
])
def test_rerun_with_other_training_settings_is_refused(tmp_path, changed, message):
    outdir = tmp_path / "qs"
    _finished_run(outdir / "training-run", dict(resolution=8, kimg=1, batch=16, cbase=8, cres="1,2", blocks=1,
                                                lr=2e-3, seed=0))
    result = CliRunner().invoke(quickstart.main, ["--outdir", str(outdir), *QUICK_SETTINGS, *changed])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "another --outdir" in result.output and "delete" in result.output
    # Refused before any step: not even the dataset was built.
    assert sorted(os.listdir(outdir)) == ["training-run"]
    assert sorted(os.listdir(outdir / "training-run")) == ["DONE", "network-snapshot-000001.pkl", "quickstart.json"]


def test_unrecorded_finished_run_is_refused(tmp_path):
    run_dir = tmp_path / "qs" / "training-run"
    _finished_run(run_dir, {})
    (run_dir / "quickstart.json").unlink()
    result = CliRunner().invoke(quickstart.main, ["--outdir", str(tmp_path / "qs"), *QUICK_SETTINGS])
    assert result.exit_code == 1 and "did not record its settings" in result.output, result.output


def test_unsaved_run_with_other_settings_starts_over(tmp_path, capsys):
    run_dir = tmp_path / "training-run"
    os.makedirs(run_dir)
    (run_dir / "quickstart.json").write_text(json.dumps(dict(settings=dict(kimg=1))))
    (run_dir / "log.txt").write_text("")
    quickstart._check_training_run(str(run_dir), dict(kimg=2))
    assert not run_dir.exists() and "starting it over" in capsys.readouterr().out
    os.makedirs(run_dir)
    (run_dir / "quickstart.json").write_text(json.dumps(dict(settings=dict(kimg=2))))
    quickstart._check_training_run(str(run_dir), dict(kimg=2))  # same settings: kept
    assert (run_dir / "quickstart.json").is_file()


def test_the_latest_state_is_found_by_number_in_a_folder_named_with_glob_characters(tmp_path):
    # A resumed quick start whose folder reads as a pattern found no state and deleted the run to start it over.
    run_dir = tmp_path / "runs [lr=2e-4]"
    os.makedirs(run_dir)
    for name in ["training-state-000995.pt", "training-state-1000000.pt", "training-state-best.pt"]:
        (run_dir / name).write_bytes(b"")
    assert quickstart._latest(str(run_dir), "training-state-*.pt") == str(run_dir / "training-state-1000000.pt")
    assert quickstart._latest(str(run_dir), "network-snapshot-*.pkl") is None


def test_options_kimg_whole_and_seed_help():
    result = CliRunner().invoke(quickstart.main, ["--kimg", "0.5"])
    assert result.exit_code == 2 and "0.5" in result.output
    result = CliRunner().invoke(quickstart.main, ["--cres", "1,x"])
    assert result.exit_code == 2 and "--cres" in result.output
    assert quickstart._int_list(" 1, 2,2") == "1,2,2"
    help_text = " ".join(CliRunner().invoke(quickstart.main, ["--help"]).output.split())
    assert "sampling always uses seeds 0..samples-1" in help_text


def test_only_this_runs_seeds_are_evaluated(tmp_path):
    samples = tmp_path / "samples"
    os.makedirs(samples)
    for seed in range(32):  # 32 left by an earlier run with --samples 32
        Image.fromarray(np.full((8, 8), seed, np.uint8), "L").save(samples / f"{seed:06d}.png")
    (samples / "generation.json").write_text("{}")
    (samples / "quickstart.json").write_text("{}")
    staged = tmp_path / "staged"
    quickstart._stage_samples(str(samples), 16, str(staged))
    assert sorted(os.listdir(staged)) == [f"{seed:06d}.png" for seed in range(16)] + ["generation.json"]
    images = quickstart._load_images(str(staged))
    assert images.shape == (16, 1, 8, 8) and images[:, 0, 0, 0].tolist() == list(range(16))
    (samples / "000003.png").unlink()
    with pytest.raises(quickstart.click.ClickException, match="000003.png is missing"):
        quickstart._stage_samples(str(samples), 16, str(tmp_path / "staged2"))


def test_ctrl_c_says_how_to_resume(tmp_path):
    # The terminal sends SIGINT to the whole foreground group: quickstart and the step it runs. Both take SIGINT as
    # a terminal would deliver it: a test runner started in the background (CI) has SIGINT ignored, and an ignored
    # signal stays ignored in every process started from it.
    child = "import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\ntry:\n" \
            "    print('ready', flush=True); time.sleep(60)\nexcept KeyboardInterrupt:\n    sys.exit(1)"
    script = textwrap.dedent(f"""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import click, quickstart
        click.command()(lambda: quickstart._run("training", ["-c", {child!r}]))()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        lines = []
        while not lines or lines[-1] not in ("ready\n", ""):  # until the step runs (or the end of the output)
            lines.append(proc.stdout.readline())
        assert lines[-1] == "ready\n" and any(line.startswith("[quickstart] training: -c") for line in lines), lines
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "interrupted during 'training'; rerun the same command to resume" in err
    assert "Traceback" not in err and "Aborted!" not in err + out


def test_a_step_stopped_by_a_signal_is_an_interruption_not_a_failure(tmp_path):
    # train.py exits 130 after Ctrl-C (143 after SIGTERM) with its state written; when quickstart itself did not
    # see the signal (SIGINT ignored in a background job; a SIGTERM to the step alone) it said "step failed".
    for code, ours in ((130, 130), (143, 143), (-int(signal.SIGINT), 130)):
        # A negative code: killed by the signal itself (the child restores its default action first).
        child = (f"import os, signal\nsignal.signal({-code}, signal.SIG_DFL)\nos.kill(os.getpid(), {-code})"
                 if code < 0 else f"raise SystemExit({code})")
        script = f"import click, quickstart\nclick.command()(lambda: quickstart._run('training', ['-c', {child!r}]))()"
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                start_new_session=True)
        assert result.returncode == ours, result.stderr
        assert "interrupted during 'training'; rerun the same command to resume" in result.stderr
        assert "failed" not in result.stderr + result.stdout


# A stand-in for train.py's stop: on SIGINT or SIGTERM it says so and exits with the signal's code (it would write a
# training state first). It prints 'ready' once its handlers are in place.
STOPPABLE_STEP = ("import signal, sys, time\n"
                  "def stop(signum, frame):\n"
                  "    print(f'step: got {signal.Signals(signum).name}', flush=True); sys.exit(128 + signum)\n"
                  "signal.signal(signal.SIGINT, stop); signal.signal(signal.SIGTERM, stop)\n"
                  "print('ready', flush=True); time.sleep(60)\n")


def _quickstart_with_stoppable_step(grace_s):
    # quickstart takes SIGINT as a terminal would deliver it, as in test_ctrl_c_says_how_to_resume: under a test runner
    # started in the background SIGINT is ignored, and stayed ignored in quickstart (the SIGINT case waited out the
    # step's sleep); only a train.py run earlier in the same pytest worker, replacing that setting, hid it.
    script = ("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
              f"import click, quickstart\nquickstart.STOP_GRACE_S = {grace_s}\n"
              f"click.command()(lambda: quickstart._run('training', ['-c', {STOPPABLE_STEP!r}]))()")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    line = None
    while line not in ("ready\n", ""):  # until the step's handlers are in place (or the end of the output)
        line = proc.stdout.readline()
    assert line == "ready\n", proc.communicate()
    return proc


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_quickstart_alone_stops_its_step(signum, code):
    # `kill PID` (SIGTERM) reaches quickstart alone: it died and left train.py running by itself. A SIGINT to
    # quickstart alone (not the terminal's group) left the step running until the grace period's SIGKILL, its work
    # since the last state lost. Now SIGTERM is passed on at once, and after Ctrl-C a step still running when the
    # grace period ends gets SIGTERM (train.py's stop with a state) before any SIGKILL.
    proc = _quickstart_with_stoppable_step(grace_s=1)
    try:
        os.kill(proc.pid, signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert "step: got SIGTERM" in out  # the step stopped by its own handler, not killed
    assert "interrupted during 'training'; rerun the same command to resume" in err and "Traceback" not in err


def _fake_venv(venv):
    """A venv whose python only logs its arguments: setup_env.sh runs through without installing anything."""
    os.makedirs(venv / "bin")
    python = venv / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {venv}/calls.log\n')
    python.chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')


def _source_setup(venv, script, **env):
    # The settings of this machine's own environment stay out: each call says all of its own.
    env = {**{k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "UV", "CONSTRAINTS", "PYTHON")},
           "VENV": str(venv), **env}
    return subprocess.run(["bash", "-c", f". scripts/setup_env.sh; {script}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _installs(venv):
    log = venv / "calls.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [call for call in calls if "pip install" in call]


def test_sourced_setup_env_leaves_the_callers_shell_alone(tmp_path):
    venv = tmp_path / "venv"
    _fake_venv(venv)
    result = _source_setup(venv, 'echo "rc=$? opts=$-"; false; echo survived; command -v python')
    assert result.returncode == 0, result.stderr
    assert "rc=0 opts=hBc" in result.stdout and "survived" in result.stdout, result.stdout
    assert f"{venv}/bin/python" in result.stdout  # activated in the caller
    # A failure returns an error to the caller instead of ending its shell.
    (venv / "bin" / "python").unlink()
    failed = _source_setup(venv, 'echo "rc=$?"; false; echo survived', PYTHON=str(tmp_path / "missing-python"))
    assert "rc=1" in failed.stdout and "survived" in failed.stdout, failed.stdout + failed.stderr


def test_setup_env_stamp_follows_torch_spec_and_uv(tmp_path):
    venv = tmp_path / "venv"
    _fake_venv(venv)
    _source_setup(venv, "true")
    assert len(_installs(venv)) == 2  # first run: torch, then the requirements
    _source_setup(venv, "true")
    assert _installs(venv) == []  # up to date
    _source_setup(venv, "true", TORCH_SPEC="torch==9.9")
    assert any(call.endswith("torch==9.9") for call in _installs(venv))
    _source_setup(venv, "true", TORCH_SPEC="torch==9.9")
    assert _installs(venv) == []
    _source_setup(venv, "true")  # back to the default build: installed again
    assert any("torch==2" in call for call in _installs(venv))
    uv = venv / "bin" / "fake-uv"
    uv.write_text(f'#!/usr/bin/env bash\necho "uv $*" >> {venv}/calls.log\n')
    uv.chmod(0o755)
    _source_setup(venv, "true", UV=str(uv))
    assert any(call.startswith("uv pip install") for call in _installs(venv))
    assert len(list(venv.glob(".installed-*"))) == 1


def _dockerignored(path, patterns):
    """Docker's rule for these simple patterns: a root-relative glob that matches the path or a folder above it;
    **/ matches at any depth."""
    parts = path.split("/")
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            return True
    return False


def test_dockerignore_keeps_the_sources_and_drops_local_state():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    for path in [".venv/bin/python", ".git/HEAD", "scratch/x.py", "quickstart-out/metrics.json", "runs/00000-x/a.pkl",
                 "metrics/__pycache__/x.pyc", ".venv-newest/bin/python", ".pytest_cache/v"]:
        assert _dockerignored(path, patterns), path
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (e.g. inside the image)")
    kept_out = [p for p in tracked.splitlines() if _dockerignored(p, patterns)]
    assert kept_out == [], kept_out
