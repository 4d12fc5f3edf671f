"""GDD on the command line: what train.py and generate.py say about options that do not fit a GDD run or a one-step
snapshot (wrappers over GDD, --precond hints, no --init, --steps=1, --precision)."""

import os
import warnings

import pytest
import test_gdd
from click.testing import CliRunner

from losses import AOTLoss, LossWrapper, STFLoss, preconditioning_for

_train = test_gdd._train
edm_release = test_gdd.edm_release  # fixtures
one_step_snapshot = test_gdd.one_step_snapshot


def _gdd_args(release, outdir, *extra):
    return ['--loss', 'gdd', '--loss-opt', 'discriminator=sn_cnn', '--loss-opt', 'disc_channels=8', '--outdir', outdir,
            '--data', release['data'], '--dropout', 0, '--augment', 0, '--batch', 32, '--device', 'cpu', *extra]


def test_aot_over_gdd_is_refused_before_any_run_directory(edm_release, tmp_path):
    message = ('--aot: AOT pairs noise with images for a denoising loss (edm, vp, ve, spd, ddpm); --loss=gdd is not '
               'one (it lacks the hooks batch_source, noise)')
    with pytest.raises(TypeError) as info:
        AOTLoss({'class_name': 'losses.gdd.GDDLoss', 'discriminator': 'sn_cnn'}, pool_size=64)
    assert str(info.value) == message
    AOTLoss({'class_name': 'losses.stf.STFLoss'}, pool_size=64)  # denoising bases stay accepted
    AOTLoss({'class_name': 'losses.spd.DDPMLoss'}, pool_size=64)
    outdir = tmp_path / 'runs'
    for dry_run in (['-n'], []):
        result = _train(_gdd_args(edm_release, outdir, '--init', edm_release['path'], '--aot', 64, *dry_run))
        assert result.exit_code == 2, result.output
        assert f'Error: Invalid value for {message}' in result.output, result.output
        assert not outdir.exists() or not os.listdir(outdir)


def test_wrappers_pass_the_base_losss_capability_flags_through():
    gdd = LossWrapper({'class_name': 'losses.gdd.GDDLoss', 'discriminator': 'sn_cnn'})
    assert gdd.uses_loop_lr_ramp is False and gdd.feeds_augment_labels is False
    stf = STFLoss()  # over EDM, which declares neither: the defaults
    assert stf.uses_loop_lr_ramp is True and stf.feeds_augment_labels is True
    nested = LossWrapper({'class_name': 'losses.wrapper.LossWrapper',
                          'base_kwargs': {'class_name': 'losses.gdd.GDDLoss'}})
    assert nested.uses_loop_lr_ramp is False and nested.feeds_augment_labels is False


def test_precond_hint_says_what_leaving_it_out_gives():
    with pytest.raises(ValueError) as info:
        preconditioning_for('gdd', 'vp')
    assert str(info.value) == ('--precond=vp cannot train --loss=gdd, which trains gdd or edm (leave --precond out to '
                               'get edm, gdd with --init)')
    with pytest.raises(ValueError) as info:
        preconditioning_for('spd', 'vp')
    assert str(info.value) == '--precond=vp cannot train --loss=spd, which trains eps (leave --precond out to get eps)'


def test_gdd_without_init_warns(edm_release, tmp_path):
    warning = ('--loss=gdd distils a pretrained network and normally takes --init=PKL (e.g. an EDM pickle); without '
               '--init it distils a randomly initialised network')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = _train(_gdd_args(edm_release, tmp_path, '--arch', 'ddpmpp', '--cbase', 8, '--cres', '1', '-n'))
    assert result.exit_code == 0, result.output
    assert warning in [str(w.message) for w in caught], [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = _train(_gdd_args(edm_release, tmp_path, '--init', edm_release['path'], '-n'))
    assert result.exit_code == 0, result.output
    assert not [w for w in caught if 'distils a pretrained network' in str(w.message)]


def test_one_step_snapshot_steps_1_and_precision(one_step_snapshot, tmp_path):
    import generate

    path = one_step_snapshot['path']
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 's1'), '--seeds', '0-1',
                                                '--steps', '1', '--device', 'cpu'])
    assert result.exit_code == 2, result.output
    assert ('Error: --steps=1: a one-step snapshot samples in one step without --steps (or any other sampler '
            'option); for a one-step grid use --steps=1 --end=sigma_min') in result.output, result.output
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 's1end'), '--seeds',
                                                '0-1', '--steps', '1', '--end', 'sigma_min', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'bf16'), '--seeds',
                                                '0-1', '--precision', 'bf16', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert 'Sampler: one step: D(80 z; 80) (float64 input, network under bf16 autocast); 1 NFE' in result.output
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'fp32'), '--seeds',
                                                '0-1', '--device', 'cpu'])
    assert 'Sampler: one step: D(80 z; 80) (float64 input, fp32 network); 1 NFE' in result.output, result.output
