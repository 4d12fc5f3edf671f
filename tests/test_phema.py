"""Post-hoc EMA (EDM2): the profile formulas against numerical integration, the per-step update against the profile's
mass per step, and the reconstruction of an EMA that was also tracked directly (issue 17)."""

import glob
import json
import os
import re
import shutil
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.integrate import trapezoid  # np.trapezoid needs NumPy 2; the oldest supported is 1.26
from train_worker import loop_kwargs, random_images, write_zip_dataset

import losses
import phema as phema_cli
from processes.edm import EDMProcess
from torch_utils import persistence
from training import snapshots
from training import training_loop as tl
from training.phema import (
    MISFIT_WARNING,
    PowerEMA,
    gamma_to_std,
    phema_file_name,
    profile_inner_product,
    reconstruction_misfit,
    reconstruction_weights,
    saved_emas,
    std_to_gamma,
)
from training.preconditioning import EDMPrecond


def _grid(t, n=400001):
    return np.linspace(0.0, t, n)


def _profile(tau, t, gamma):
    return np.where(tau <= t, (gamma + 1) * np.power(tau, gamma) / t ** (gamma + 1), 0.0)


@pytest.mark.parametrize('sigma_rel', [0.01, 0.05, 0.07, 0.10, 0.25])
def test_width_and_exponent(sigma_rel):
    gamma = std_to_gamma(sigma_rel)
    assert gamma_to_std(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # The relative width of the profile on [0, t], by numerical integration (t = 1).
    tau = _grid(1.0)
    density = _profile(tau, 1.0, gamma)
    mean = trapezoid(tau * density, tau)
    variance = trapezoid((tau - mean) ** 2 * density, tau)
    assert np.sqrt(variance) == pytest.approx(sigma_rel, rel=2e-4)
    with pytest.raises(ValueError, match='relative EMA width'):
        std_to_gamma(0.3)


def test_inner_product_against_integration():
    for (t_a, g_a), (t_b, g_b) in [((100, 6.94), (60, 16.97)), ((100, 6.94), (100, 6.94)), ((30, 2.5), (90, 0.0))]:
        tau = _grid(max(t_a, t_b))
        numeric = trapezoid(_profile(tau, t_a, g_a) * _profile(tau, t_b, g_b), tau)
        assert profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-4)
    # Large times and exponents do not overflow (computed in logs).
    assert np.isfinite(profile_inner_product(2e5, 20.0, 1e5, 7.0))


def test_reconstruction_of_a_saved_profile_is_that_profile():
    t, g = [50, 50, 100, 100], [std_to_gamma(0.05), std_to_gamma(0.1)] * 2
    x = reconstruction_weights(t, g, 100, std_to_gamma(0.1))
    np.testing.assert_allclose(x, [0, 0, 0, 1], atol=1e-8)


@pytest.mark.parametrize('sigma_rel', [0.02, 0.15, 0.25])
def test_weights_sum_to_one_and_the_misfit_is_the_profiles_l2_distance(sigma_rel):
    # Saved: widths 0.05 and 0.10 at five times; target: sigma_rel at the last. Independently: A and b by
    # numerical integration of the profiles, least squares, scaled to sum 1 (EDM2's solve_posthoc_coefficients).
    t = np.repeat([100.0, 200.0, 300.0, 400.0, 500.0], 2)
    g = np.array([std_to_gamma(0.05), std_to_gamma(0.10)] * 5)
    g_r = std_to_gamma(sigma_rel)
    tau = _grid(500.0)
    profiles = np.stack([_profile(tau, ti, gi) for ti, gi in zip(t, g)])
    target = _profile(tau, 500.0, g_r)
    A = trapezoid(profiles[:, None] * profiles[None, :], tau)
    b = trapezoid(profiles * target, tau)
    raw = np.linalg.lstsq(A, b, rcond=None)[0]
    x = reconstruction_weights(t, g, 500.0, g_r)
    assert x.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(x, raw / raw.sum(), rtol=2e-3, atol=2e-3 * np.abs(x).max())
    combined = x @ profiles
    numeric = np.sqrt(trapezoid((combined - target) ** 2, tau) / trapezoid(target ** 2, tau))
    assert reconstruction_misfit(t, g, x, 500.0, g_r) == pytest.approx(numeric, rel=2e-3)
    # A saved profile is reached exactly.
    assert reconstruction_misfit(t, g, reconstruction_weights(t, g, 500.0, g[-1]), 500.0, g[-1]) < 1e-6


def _write_phema(directory, kimg, std, value, step):
    """A phema-NNNNNN-S.pkl whose EMA network holds `value` in every floating-point tensor."""
    net = EDMPrecond(img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=16, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(value)
    os.makedirs(directory, exist_ok=True)
    snapshots.save_snapshot(os.path.join(directory, phema_file_name(kimg, std)), ema=net,
                            loss_kwargs=losses.loss_kwargs("edm"), process=EDMProcess(),
                            extra=dict(phema=dict(std=std, gamma=std_to_gamma(std), step=step, kimg=kimg)))


def test_weights_that_never_moved_come_back_unchanged(tmp_path, recwarn):
    # Every saved EMA holds 1.0: any average of them is 1.0 (before the weights were scaled to sum 1: 0.87 at 0.25).
    run = str(tmp_path / 'run')
    for kimg in range(1, 6):
        for std in (0.05, 0.10):
            _write_phema(run, kimg, std, 1.0, step=100 * kimg)
    for std in (0.07, 0.25):
        out = str(tmp_path / f'{std}.pkl')
        result = CliRunner().invoke(phema_cli.main, ['--run', run, '--std', str(std), '--out', out])
        assert result.exit_code == 0, result.output
        net = persistence.load_network_pickle(out)['ema']
        values = torch.cat([p.flatten() for p in net.parameters()])
        torch.testing.assert_close(values, torch.ones_like(values), rtol=0, atol=1e-6)
    assert 'profile misfit' in result.output
    # Far outside what 0.05 and 0.10 at five times span: said, and the result still written.
    message = r'differs from the EMA profile of std 0.01 by \d+\.\d% \(relative L2\)'
    with pytest.warns(UserWarning, match=message) as caught:
        result = CliRunner().invoke(phema_cli.main, ['--run', run, '--std', '0.01', '--out', str(tmp_path / 'x.pkl')])
    assert result.exit_code == 0 and MISFIT_WARNING == 0.10
    # Attributed to the caller of reconstruct (the CLI), not to torch.no_grad's wrapper.
    assert [os.path.basename(w.filename) for w in caught if 'relative L2' in str(w.message)] == ['phema.py']
    assert os.path.dirname(caught[0].filename) != os.path.dirname(torch.__file__)


def test_saved_emas_past_a_million_kimg_are_found(tmp_path):
    # phema_file_name writes kimg with at least 6 digits: 7 from 1,000,000 kimg (ImageNet-64's 2.5 Gimg runs).
    run = str(tmp_path / 'run')
    for kimg in (999_999, 1_000_000):
        _write_phema(run, kimg, 0.05, 0.0, step=kimg)
    assert phema_file_name(1_000_000, 0.05) == 'phema-1000000-0.050.pkl'
    assert [e['kimg'] for e in saved_emas(run)] == [999_999, 1_000_000]


def test_saved_emas_are_found_in_a_folder_named_with_glob_characters(tmp_path):
    # A run under a sweep's --outdir=runs[lr=2e-4]: the folder is a path, not a glob pattern.
    run = str(tmp_path / 'sweep [lr=2e-4]' / 'run')
    _write_phema(run, 4, 0.05, 0.0, step=4)
    assert [e['kimg'] for e in saved_emas(run)] == [4]


def test_a_resumed_run_uses_the_saved_emas_of_the_run_it_resumed_from(tmp_path):
    # Run A saved kimg 1-4, was resumed from its kimg-2 state into B (kimg 3-5): A's kimg 3-4 are another
    # trajectory and are left out; B's files win where both have a kimg.
    first, second = str(tmp_path / 'A'), str(tmp_path / 'B')
    for kimg in range(1, 5):
        _write_phema(first, kimg, 0.05, 0.0, step=kimg)
    for kimg in range(2, 6):
        _write_phema(second, kimg, 0.05, 0.0, step=kimg)
    with open(os.path.join(second, 'training_options.json'), 'w') as f:
        json.dump(dict(resume_state_dump=os.path.join(first, 'training-state-000002.pt')), f)
    found = [(os.path.basename(os.path.dirname(e['path'])), e['kimg']) for e in saved_emas(second)]
    assert found == [('A', 1), ('B', 2), ('B', 3), ('B', 4), ('B', 5)]
    assert [e['kimg'] for e in saved_emas(second, at_kimg=3)] == [1, 2, 3]
    assert [e['kimg'] for e in saved_emas(first)] == [1, 2, 3, 4]
    # Recorded relative to the folder train.py ran in (older runs): found beside the run, from any folder.
    with open(os.path.join(second, 'training_options.json'), 'w') as f:
        json.dump(dict(resume_state_dump=os.path.join('elsewhere', 'A', 'training-state-000002.pt')), f)
    assert [e['kimg'] for e in saved_emas(second)] == [1, 2, 3, 4, 5]
    # A predecessor that has moved: the run's own files, and a warning that says what is left out and where it looked.
    shutil.rmtree(first)
    with pytest.warns(UserWarning, match=r'run directory is not found \(a relative path: looked for it from .* and '
                                         r'beside'):
        assert [e['kimg'] for e in saved_emas(second)] == [2, 3, 4, 5]


def test_the_ema_saved_at_the_resumed_state_is_used_when_the_resumed_run_has_none(tmp_path):
    """A resumed from its kimg-2 state into B, which saved from kimg 3 on: A's kimg 1 and 2 (the state's own time is
    part of the shared trajectory) and B's 3 and 4."""
    first, second = str(tmp_path / 'A'), str(tmp_path / 'B')
    for kimg in range(1, 5):
        _write_phema(first, kimg, 0.05, 0.0, step=kimg)
    for kimg in (3, 4):
        _write_phema(second, kimg, 0.05, 0.0, step=kimg)
    with open(os.path.join(second, 'training_options.json'), 'w') as f:
        json.dump(dict(resume_state_dump=os.path.join(first, 'training-state-000002.pt')), f)
    found = [(os.path.basename(os.path.dirname(e['path'])), e['kimg']) for e in saved_emas(second)]
    assert found == [('A', 1), ('A', 2), ('B', 3), ('B', 4)]


def test_power_ema_buffers_follow_the_network():
    """Buffers are not averaged: each EMA copy holds the network's current buffers (e.g. running statistics)."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    tracker = PowerEMA(net, [0.05, 0.10])
    for step in range(1, 4):
        net.train()(torch.randn(8, 3))  # moves the running mean and variance
        tracker.update(net, step)
    for ema in tracker.emas.values():
        for b_ema, b_net in zip(ema.buffers(), net.buffers()):
            assert torch.equal(b_ema, b_net)
    assert not torch.equal(net[1].running_mean, torch.zeros(3))


def test_clear_errors_for_missing_runs_times_and_headers(tmp_path):
    run = str(tmp_path / 'run')
    _write_phema(run, 3, 0.05, 0.0, step=30)
    _write_phema(run, 4, 0.05, 0.0, step=40)
    cases = [(['--run', str(tmp_path / 'nowhere')], 'no such run directory'),
             (['--run', run, '--at', '0'], 'no phema-.*up to kimg 0; the saved EMAs are at kimg 3-4'),
             (['--run', str(tmp_path)], r'no phema-\*\.pkl files \(train with --phema')]
    bogus = str(tmp_path / 'bogus')
    _write_phema(bogus, 1, 0.05, 0.0, step=1)
    data = persistence.load_network_pickle(os.path.join(bogus, phema_file_name(1, 0.05)))
    del data['phema']
    persistence.save_network_pickle(os.path.join(bogus, phema_file_name(1, 0.05)), data)
    cases.append((['--run', bogus], r'phema-000001-0.050.pkl: not a saved post-hoc EMA'))
    # Saved at step 0 (a profile with no time behind it: LAPACK's "SVD did not converge" before), by hand only.
    step_zero = str(tmp_path / 'step-zero')
    _write_phema(step_zero, 0, 0.05, 0.0, step=0)
    _write_phema(step_zero, 1, 0.05, 0.0, step=10)
    cases.append((['--run', step_zero], r'phema-000000-0.050.pkl: not a saved post-hoc EMA \(expected a phema record '
                                        r'with its step >= 1 and gamma > -1'))
    for args, message in cases:
        result = CliRunner().invoke(phema_cli.main, [*args, '--std', '0.07'])
        assert result.exit_code == 1 and re.search(message, result.output), (args, result.output)
    # A width click's range lets through (nan) is refused before any file is read.
    with mock.patch.object(snapshots, 'read_snapshot', side_effect=AssertionError('a file was read')):
        result = CliRunner().invoke(phema_cli.main, ['--run', run, '--std', 'nan'])
    assert result.exit_code != 0 and 'a relative EMA width must be in (0, 0.2887), got nan' in result.output, \
        result.output


def test_reconstruction_combines_the_saved_emas_with_the_least_squares_weights(tmp_path):
    """Saved EMAs holding different constants v_i: the reconstruction holds sum_i x_i v_i, with x from the profiles'
    inner products by numerical integration (least squares, scaled to sum 1), the latest time as the target."""
    from training.phema import reconstruct

    run = str(tmp_path / 'run')
    t, g, values = [], [], []
    for kimg in (1, 2, 3):
        for std in (0.05, 0.10):
            value = 1.0 + kimg + 10 * std  # distinct per file
            _write_phema(run, kimg, std, value, step=100 * kimg)
            t.append(100.0 * kimg), g.append(std_to_gamma(std)), values.append(value)
    tau = _grid(300.0)
    profiles = np.stack([_profile(tau, ti, gi) for ti, gi in zip(t, g)])
    target = _profile(tau, 300.0, std_to_gamma(0.07))
    raw = np.linalg.lstsq(trapezoid(profiles[:, None] * profiles[None, :], tau), trapezoid(profiles * target, tau),
                          rcond=None)[0]
    x = raw / raw.sum()
    expected = float(x @ np.array(values))
    assert abs(expected - np.mean(values)) > 0.05  # not the plain average
    data, info = reconstruct(run, 0.07, log=lambda *args: None)
    np.testing.assert_allclose(info['weights'], x, rtol=2e-3, atol=2e-3 * np.abs(x).max())
    params = torch.cat([p.flatten() for p in data['ema'].parameters()]).double()
    torch.testing.assert_close(params, torch.full_like(params, expected), rtol=1e-3, atol=0)
    assert data['phema']['step'] == 300 and data['phema']['kimg'] == 3


def test_step_update_gives_each_step_its_profile_mass():
    # A one-parameter "network" whose value at step j is the one-hot e_j: the EMA's value is each step's weight.
    num_steps, sigma_rel = 40, 0.1
    net = torch.nn.Linear(num_steps, 1, bias=False)
    tracker = PowerEMA(net, [sigma_rel])
    with torch.no_grad():
        for step in range(1, num_steps + 1):
            net.weight.zero_()
            net.weight[0, step - 1] = 1.0
            tracker.update(net, step)
    weights = tracker.emas[sigma_rel].weight[0].double()
    gamma = tracker.gammas[sigma_rel]
    j = torch.arange(1, num_steps + 1, dtype=torch.float64)
    expected = (j ** (gamma + 1) - (j - 1) ** (gamma + 1)) / num_steps ** (gamma + 1)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-7)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_reconstructed_ema_matches_one_tracked_directly(tmp_path):
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(32))
    run_dir = str(tmp_path / 'run')
    os.makedirs(run_dir)
    tl.training_loop(**loop_kwargs(run_dir, data, batch_size=8, total_kimg=6, kimg_per_tick=1, snapshot_ticks=1,
                                   state_dump_ticks=6, phema_stds=(0.05, 0.07, 0.10), lr_rampup_kimg=0))
    state = torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], weights_only=True)
    assert sorted(state['phema']) == ['0.05', '0.07', '0.1']
    direct = persistence.load_network_pickle(sorted(glob.glob(os.path.join(run_dir, 'phema-*-0.070.pkl')))[-1])
    # Reconstruct 0.07 from the 0.05 and 0.10 EMAs only.
    only = str(tmp_path / 'only')
    os.makedirs(only)
    for path in glob.glob(os.path.join(run_dir, 'phema-*.pkl')):
        if not path.endswith('-0.070.pkl'):
            shutil.copy(path, only)
    out = str(tmp_path / 'reconstructed.pkl')
    result = CliRunner().invoke(phema_cli.main, ['--run', only, '--std', '0.07', '--out', out])
    assert result.exit_code == 0, result.output
    rebuilt = persistence.load_network_pickle(out)
    flat = {name: torch.cat([p.flatten() for p in d['ema'].parameters()]).double() for name, d in
            [('direct', direct), ('rebuilt', rebuilt)]}
    net = torch.cat([p.flatten() for p in persistence.load_network_pickle(
        sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1])['ema'].parameters()]).double()
    first = torch.cat([p.flatten() for p in persistence.load_network_pickle(
        sorted(glob.glob(os.path.join(run_dir, 'phema-*-0.070.pkl')))[0])['ema'].parameters()]).double()
    error = (flat['rebuilt'] - flat['direct']).norm() / (flat['direct'] - first).norm()
    # Stated bound: the rebuilt EMA is within 5% of the tracked one, relative to how far that EMA moved in the run.
    assert error < 0.05, float(error)
    assert rebuilt['phema']['std'] == 0.07 and rebuilt['phema']['reconstructed_from'] == 14
    assert not torch.equal(flat['direct'], net)


def test_a_reconstruction_by_phema_py_before_its_coefficients_summed_to_one_is_refused(tmp_path):
    """phema.py before 2026-12-01 21:17 did not scale its coefficients to sum 1 (every weight off by their sum: 0.034
    in a 2-kimg digits run's reconstruction; its record has no 'misfit'): generate.py and fid.py took it silently."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet", model_channels=8,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    record = dict(std=0.07, gamma=11.244939447857934, step=63, kimg=2, reconstructed_from=6)
    old, new = str(tmp_path / 'network-phema-000002-0.070.pkl'), str(tmp_path / 'new.pkl')
    persistence.save_network_pickle(old, dict(ema=net, phema=record))
    persistence.save_network_pickle(new, dict(ema=net, phema=dict(record, misfit=0.054)))
    with pytest.raises(persistence.NetworkPickleError, match=re.escape(
            f"{old}: a post-hoc EMA reconstructed by phema.py before 2026-12-01, whose coefficients did not sum to 1 "
            f"(every weight is scaled by their sum); reconstruct it again: python phema.py --run=RUN_DIR --std=0.07 "
            f"--at=2")):
        snapshots.read_snapshot(old)
    assert snapshots.read_snapshot(new).data['phema']['misfit'] == 0.054
    saved = str(tmp_path / phema_file_name(2, 0.05))  # an EMA the run saved: no reconstruction, no misfit
    persistence.save_network_pickle(saved, dict(ema=net, phema=dict(std=0.05, gamma=6.9, step=63, kimg=2)))
    assert snapshots.read_snapshot(saved).data['phema']['std'] == 0.05


def test_widths_whose_file_names_would_collide_are_refused():
    import click

    from training import train_options
    assert train_options.width_list(None, None, '0.05,0.1') == [0.05, 0.1]
    for value, names in [('0.0504,0.0501', '0.050, 0.050'), ('0.0004', '0.000')]:
        with pytest.raises(click.BadParameter, match=f'gives {names}; expected distinct widths of at least 0.001'):
            train_options.width_list(None, None, value)


def test_default_output_names_keep_the_width_and_tilde_is_expanded(tmp_path, monkeypatch):
    # --std=0.0001 and 0.0004 were both written to network-phema-000005-0.000.pkl, each replacing the other.
    monkeypatch.setenv('HOME', str(tmp_path))
    run = str(tmp_path / 'run')
    for kimg in range(1, 6):
        for std in (0.05, 0.10):
            _write_phema(run, kimg, std, 1.0, step=100 * kimg)
    for std, name in (('0.07', '0.070'), ('0.0001', '0.0001'), ('0.0004', '0.0004'), ('0.123456789', '0.123457')):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the misfit warning of the narrow widths
            result = CliRunner().invoke(phema_cli.main, ['--run=~/run', '--std', std])
        assert result.exit_code == 0, result.output
        assert f'Wrote {run}/network-phema-000005-{name}.pkl' in result.output


def test_an_out_with_a_run_files_name_is_refused_in_a_run_folder_only(tmp_path):
    """--out=RUN/network-snapshot-000200.pkl replaced the run's snapshot (fid.py and resumes took the reconstruction
    for it): refused in a folder holding a run's files. Elsewhere the name replaces nothing of a run: written."""
    run = str(tmp_path / 'run')
    for kimg in (1, 2):
        _write_phema(run, kimg, 0.05, 1.0, step=100 * kimg)
    inside = os.path.join(run, 'network-snapshot-000002.pkl')
    result = CliRunner().invoke(phema_cli.main, ['--run', run, '--std', '0.05', '--out', inside])
    assert result.exit_code == 2 and "the name of a file train.py writes into its runs, in a run's folder" in \
        result.output, result.output
    assert not os.path.exists(inside)
    elsewhere = str(tmp_path / 'picked' / 'network-snapshot-000002.pkl')
    result = CliRunner().invoke(phema_cli.main, ['--run', run, '--std', '0.05', '--out', elsewhere])
    assert result.exit_code == 0 and os.path.isfile(elsewhere), result.output


def test_an_out_with_a_run_files_name_is_written_again_in_a_folder_of_picks(tmp_path):
    """A second pick into a folder of no run (it holds only the first pick, a network-snapshot-*.pkl): written too,
    not refused as if the first pick made it a run's folder."""
    run = str(tmp_path / 'run')
    for kimg in (1, 2):
        _write_phema(run, kimg, 0.05, 1.0, step=100 * kimg)
    for kimg in (1, 2):
        out = str(tmp_path / 'picked' / f'network-snapshot-00000{kimg}.pkl')
        result = CliRunner().invoke(phema_cli.main, ['--run', run, '--std', '0.05', '--at', str(kimg), '--out', out])
        assert result.exit_code == 0 and os.path.isfile(out), result.output
