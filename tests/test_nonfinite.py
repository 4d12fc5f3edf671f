"""Non-finite training is caught (issue 16): counted in stats.jsonl, a diverged run stops in one line without a
non-finite snapshot, the last good state resumes, and the sampling CLIs refuse a non-finite network."""

import glob
import json
import os

import pytest
import torch
from click.testing import CliRunner
from train_worker import random_images, write_zip_dataset

import losses.denoising
import train
from torch_utils import misc, persistence

TINY = ['--cbase', '8', '--cres', '1', '--blocks', '1', '--attn', '4', '--workers', '0', '--device', 'cpu',
        '--batch', '8', '--tick', '1', '--snap', '1', '--dump', '1', '--seed', '0', '--dropout', '0', '--augment', '0',
        '--lr-rampup', '0']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_zip_dataset(str(tmp_path_factory.mktemp('data') / 'tiny.zip'), random_images(32))


def _train(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def _error_lines(output):
    return [line for line in output.splitlines() if line.startswith('Error:')]


@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_non_finite_losses_are_counted_and_stop_the_run(data, tmp_path, precision, monkeypatch):
    # P_mean = 60: sigma^2 overflows float32, so every loss weight is inf; EDM's scrub keeps the weights finite, so only
    # the count stops it. EDMLoss refuses such options up front: that check is bypassed here, as a plug-in loss's own
    # options could make every step non-finite without one.
    # Under fp16 a non-finite loss is a non-finite step, not a GradScaler overflow.
    monkeypatch.setattr(losses.denoising, 'check_weight_range', lambda *args: None)
    result = _train('--outdir', tmp_path, '--data', data, '--duration', 0.001, '--loss-opt', 'P_mean=60',
                    '--max-nonfinite', 3, '--precision', precision, *TINY)
    assert result.exit_code == 1, result.output
    (line,) = _error_lines(result.output)
    assert ('training diverged: 3 consecutive steps with non-finite losses or gradients'
            + (' or fp16 overflows the GradScaler skipped' if precision == 'fp16' else '') + ' (before kimg') in line
    (run_dir,) = glob.glob(str(tmp_path / '0*'))
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert stats[0]['Loss/nonfinite'] == {'num': 1, 'mean': 1.0, 'std': 0.0}  # tick 0 = the first step
    assert 'nonfinite 1' in open(os.path.join(run_dir, 'log.txt')).read()  # the status line shows it
    assert 'training diverged' in open(os.path.join(run_dir, 'log.txt')).read()  # and the fatal error
    for path in glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')):
        assert misc.count_nonfinite(persistence.load_network_pickle(path)['ema']) == 0


def test_diverging_weights_stop_the_run_and_the_last_good_state_resumes(data, tmp_path):
    first = _train('--outdir', tmp_path / 'a', '--data', data, '--duration', 0.001, *TINY)
    assert first.exit_code == 0, first.output
    (state_path,) = glob.glob(str(tmp_path / 'a' / '*' / 'training-state-*.pt'))
    good = torch.load(state_path, weights_only=True)

    # The same run resumed with an absurd learning rate: the weights blow up, nothing non-finite is written.
    result = _train('--outdir', tmp_path / 'b', '--resume', state_path, '--lr', 1e30, '--duration', 0.004,
                    '--max-nonfinite', 2)
    assert result.exit_code == 1, result.output
    (line,) = _error_lines(result.output)
    assert 'training diverged' in line and 'last good one' in line
    written = glob.glob(str(tmp_path / 'b' / '*' / '*.p*'))
    for path in written:
        if path.endswith('.pkl'):
            assert misc.count_nonfinite(persistence.load_network_pickle(path)['ema']) == 0, path
        else:
            state = torch.load(path, weights_only=True)
            assert all(torch.isfinite(v).all() for v in state['ema'].values() if v.is_floating_point()), path
    assert not any(p.endswith('.tmp') or '.tmp-' in p for p in os.listdir(os.path.dirname(state_path)))

    # The last good state is untouched and resumes (its own options, from the state alone).
    assert torch.equal(torch.load(state_path, weights_only=True)['ema']['model.dec.8x8_aux_conv.weight'],
                       good['ema']['model.dec.8x8_aux_conv.weight'])
    resumed = _train('--resume', state_path, '--outdir', tmp_path / 'c', '--duration', 0.002)
    assert resumed.exit_code == 0, resumed.output


def test_sampling_clis_refuse_a_non_finite_network(tmp_path):
    from training import snapshots
    from training.preconditioning import EDMPrecond
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])
    with torch.no_grad():
        next(net.parameters())[0].fill_(float('nan'))
    path = str(tmp_path / 'network-snapshot-000000.pkl')
    snapshots.save_snapshot(path, ema=net, loss_kwargs={'class_name': 'losses.denoising.EDMLoss'},
                            process=snapshots.processes.EDMProcess())
    with pytest.raises(persistence.NetworkPickleError, match=r'non-finite values \(NaN or inf\) among its'):
        snapshots.read_snapshot(path)
    import generate
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'out'), '--seeds', '0',
                                                '--device', 'cpu'])
    assert result.exit_code != 0 and len(_error_lines(result.output)) == 1, result.output
    assert 'non-finite values' in _error_lines(result.output)[0]
    assert not os.path.exists(tmp_path / 'out') or os.listdir(tmp_path / 'out') == []


def test_fp16_overflows_are_counted_apart_without_a_warning(data, tmp_path):
    """--precision fp16: a step whose scaled gradients overflow (the GradScaler skips it and halves its scale) is
    counted as an fp16 overflow, not a non-finite step, and warns nothing; --ls 1e6 makes the first steps overflow."""
    result = _train('--outdir', tmp_path, '--data', data, '--duration', 0.0004, '--precision', 'fp16', '--ls', 1e6,
                    '--max-nonfinite', 1000, *TINY)
    assert result.exit_code == 0, result.output
    (run_dir,) = glob.glob(str(tmp_path / '0*'))
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    overflows = [round(s['Loss/fp16_overflow']['mean'] * s['Loss/fp16_overflow']['num']) for s in stats]
    assert overflows[0] == 1 and sum(overflows) >= 3, overflows
    assert all(s['Loss/nonfinite']['mean'] == 0 for s in stats)
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'fp16-overflow 1' in log and 'nonfinite' not in log.replace('--max-nonfinite', '').split('tick 0')[1]
    assert 'non-finite losses or gradients' not in result.output
    state = torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=True)
    assert state['grad_scalers']['main']['scale'] == 2.0 ** (16 - sum(overflows))  # halved once per overflow
