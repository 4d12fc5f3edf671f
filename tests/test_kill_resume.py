"""kill -9 at random moments (also while snapshots and states are written), then `--resume=auto`: the run ends
bit-identical to an uninterrupted one, and no temporary file is left (issue 16)."""

import glob
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_worker import ROOT, assert_tree_equal, random_images, write_zip_dataset

ARGS = ['--cbase', '8', '--cres', '1', '--blocks', '1', '--attn', '4', '--workers', '0', '--device', 'cpu',
        '--batch', '8', '--tick', '1', '--snap', '1', '--dump', '1', '--seed', '0', '--lr-rampup', '0',
        '--duration', '0.003']


def _train(outdir, data, *extra):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), '--outdir', str(outdir), '--data', data,
                             *ARGS, *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final_state(outdir):
    paths = glob.glob(os.path.join(outdir, '*', 'training-state-000003.pt'))
    assert paths, f'no final state under {outdir}'
    return torch.load(sorted(paths)[-1], weights_only=True)


@pytest.mark.slow
def test_kill_9_loop_then_resume_auto_is_bit_identical(tmp_path):
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(32))
    straight = _train(tmp_path / 'straight', data)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    rng = random.Random(0)
    kills = 0
    while True:
        process = _train(tmp_path / 'killed', data, '--resume', 'auto')
        if kills < 5:
            time.sleep(rng.uniform(4.0, 9.0))  # past start-up (imports, dataset), into training or a write
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                continue
        assert process.wait(timeout=300) == 0, process.stderr.read()
        break
    assert kills >= 3

    a, b = _final_state(tmp_path / 'straight'), _final_state(tmp_path / 'killed')
    for key in ('networks', 'ema', 'optimizers'):
        assert_tree_equal(b[key], a[key], key)
    assert a['cur_nimg'] == b['cur_nimg'] and a['data_position'] == b['data_position']
    leftovers = [p for p in glob.glob(str(tmp_path / 'killed' / '**' / '*'), recursive=True) + glob.glob(
        str(tmp_path / 'killed' / '**' / '.*'), recursive=True) if '.tmp-' in os.path.basename(p)]
    assert leftovers == []


def test_train_py_removes_stale_temp_files_of_killed_runs(tmp_path):
    from click.testing import CliRunner

    import dnnlib
    import train

    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(8))
    run_dir = tmp_path / 'runs' / '00000-old-run'
    run_dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    host = os.path.basename(dnnlib.util.temp_path('x')).split('-')[1]
    stale = run_dir / f'network-snapshot-000004.pkl.tmp-{host}-{int(dead.stdout)}-0123abcd'
    live = run_dir / f'training-state-000004.pt.tmp-{host}-{os.getpid()}-0123abcd'  # this process: alive
    stale.write_bytes(b'half a snapshot')
    live.write_bytes(b'being written')
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, '--device', 'cpu',
                                             '--dry-run'])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists()
    assert f'Removed {stale}' in result.output
