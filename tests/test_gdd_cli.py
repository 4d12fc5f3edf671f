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
    assert ('Sampler: a one-step generator (trained at sigma 80) sampled over a sigma grid as an EDM denoiser, which '
            'it may no longer be; without sampler options it samples in one step: ') in result.output, result.output
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'bf16'), '--seeds',
                                                '0-1', '--precision', 'bf16', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert 'Sampler: one step: D(80 z; 80) (float64 input, network under bf16 autocast); 1 NFE' in result.output
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'fp32'), '--seeds',
                                                '0-1', '--device', 'cpu'])
    assert 'Sampler: one step: D(80 z; 80) (float64 input, fp32 network); 1 NFE' in result.output, result.output
    # --compile is taken, but the one call (force_fp32) runs eager: the Sampler line says so (it said nothing, and
    # generation.json recorded compile=true).
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'compiled'), '--seeds',
                                                '0-1', '--compile', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert ('Sampler: one step: D(80 z; 80) (float64 input, fp32 network; eager: --compile does not apply to the '
            'one call (force_fp32)); 1 NFE') in result.output, result.output
    # The same images, so the folder takes more seeds without --compile (it refused them: 'these differ: compile'),
    # and their PNGs equal those of the folder made without it.
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'compiled'), '--seeds',
                                                '2-3', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    for seed in (0, 1):
        assert (tmp_path / 'compiled' / f'{seed:06d}.png').read_bytes() == \
            (tmp_path / 'fp32' / f'{seed:06d}.png').read_bytes()


def _warnings_of(args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = _train(args)
    return result, [str(w.message) for w in caught]


def test_reference_settings_left_at_edms_defaults_are_warned_about(edm_release, tmp_path):
    """GDD's reference augments nothing and trains without dropout; a run that leaves --augment / --dropout out gets
    EDM's 0.12 / 0.13 and is told (the dropout note was a print at loop start, not in --dry-run)."""
    base = ['--loss', 'gdd', '--loss-opt', 'discriminator=sn_cnn', '--loss-opt', 'disc_channels=8', '--outdir',
            tmp_path, '--data', edm_release['data'], '--batch', 32, '--device', 'cpu', '--init', edm_release['path'],
            '-n']
    result, messages = _warnings_of(base)
    assert result.exit_code == 0, result.output
    reference = [m for m in messages if 'its reference trains with' in m]
    assert reference == ["--loss=gdd: its reference trains with --dropout=0; this run has train.py's default "
                         "--dropout=0.13 (EDM's): pass --dropout=0 for the reference's setting",
                         "--loss=gdd: its reference trains with --augment=0; this run has train.py's default "
                         "--augment=0.12 (EDM's): pass --augment=0 for the reference's setting"], messages
    result, messages = _warnings_of([*base, '--dropout', 0.1, '--augment', 0])  # chosen: no warning
    assert result.exit_code == 0 and not [m for m in messages if 'its reference trains with' in m], messages


def test_preset_loss_options_merge_key_by_key(edm_release, tmp_path):
    """--preset gdd-i-ffhq --loss-opt discriminator=sn_cnn replaced the preset's freeze=1, d_lr and backbones; now
    the given keys replace theirs only, and the note says so."""
    from training.presets import TRAIN_PRESETS
    from training.resume import merge_loss_options

    preset = TRAIN_PRESETS['gdd-i-ffhq']['loss_opt']
    result = _train(['--preset', 'gdd-i-ffhq', '--init', edm_release['path'], '--data', edm_release['data'],
                     '--outdir', tmp_path, '--batch', 32, '--device', 'cpu', '--loss-opt', 'discriminator=sn_cnn',
                     '--loss-opt', 'd_lr=1e-5', '-n'])
    assert result.exit_code == 0, result.output
    options = test_gdd._printed_options(result.output)['loss_kwargs']
    assert options['freeze'] == 1 and options['discriminator'] == 'sn_cnn' and options['d_lr'] == 1e-5
    assert options['backbones'] == dict(item.split('=') for item in preset)['backbones']
    merged = merge_loss_options(preset, ['discriminator=sn_cnn', 'd_lr=1e-5'])
    assert f"--loss-opt=discriminator=sn_cnn,d_lr=1e-5 merged key by key into the preset's ({','.join(preset)}): " \
           f"{','.join(merged)}" in ' '.join(result.output.split())


def test_init_of_another_preconditioning_is_refused_unless_asked(edm_release, tmp_path):
    """A VP pickle under --loss=gdd was rewrapped in GDDPrecond without a word (its D changed completely); now
    refused naming --precond, which rewraps it on request. EDM's own pickles keep working."""
    from torch_utils import persistence
    from training.preconditioning import VPPrecond

    vp = VPPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet', model_channels=8,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    path = tmp_path / 'vp.pkl'
    persistence.save_network_pickle(str(path), dict(ema=vp))
    result = _train(_gdd_args(edm_release, tmp_path / 'runs', '--init', path, '-n'))
    assert result.exit_code == 2, result.output
    assert (f"--init: the network of {path} is VPPrecond (--precond=vp); --loss=gdd trains gdd or edm networks: give "
            f"such a pickle, or --precond=gdd to rewrap its backbone anyway (its outputs change)") in \
        ' '.join(result.output.split()), result.output
    result = _train(_gdd_args(edm_release, tmp_path / 'runs', '--init', path, '--precond', 'gdd', '-n'))
    assert result.exit_code == 0, result.output
    result = _train(_gdd_args(edm_release, tmp_path / 'runs', '--init', edm_release['path'], '-n'))
    assert result.exit_code == 0 and test_gdd._printed_options(result.output)['network_kwargs']['class_name'] == \
        'training.preconditioning.GDDPrecond', result.output


def test_missing_local_discriminator_files_fail_the_dry_run(edm_release, tmp_path):
    args = ['--loss', 'gdd', '--outdir', tmp_path / 'runs', '--data', edm_release['data'], '--batch', 32, '--device',
            'cpu', '--init', edm_release['path'], '--dropout', 0, '--augment', 0, '-n']
    for options, message in [(['backbones=vgg16_bn', f'disc_weights=vgg16_bn={tmp_path}/none.pt'],
                              f'--loss-opt disc_weights: vgg16_bn={tmp_path}/none.pt: no such file'),
                             (['backbones=vgg16_bn', 'disc_weights=resnet=x.pt'],
                              "--loss-opt disc_weights: 'resnet' is not one of the backbones (vgg16_bn)"),
                             (['disc_embedding=~/missing-embedding.pkl'],
                              '--loss-opt disc_embedding: ~/missing-embedding.pkl: no such file')]:
        result = _train([*args, *[a for o in options for a in ('--loss-opt', o)]])
        assert result.exit_code == 2 and message in ' '.join(result.output.split()), result.output
        assert not (tmp_path / 'runs').exists()


def test_projected_discriminator_on_data_with_alpha_is_refused_before_any_run_directory(tmp_path):
    """The projected discriminator's feature networks read RGB (grey repeated): on RGBA or grey + alpha data the
    loop's build of it failed after the run directory existed (and a dry run said the options were fine)."""
    import numpy as np
    from train_worker import random_images, write_zip_dataset
    grey = random_images(2)[..., None]
    outdir = tmp_path / 'runs'
    for name, images in (('rgba', np.concatenate([np.repeat(grey, 3, axis=3), np.full_like(grey, 255)], 3)),
                         ('la', np.concatenate([grey, np.full_like(grey, 255)], 3))):
        data = write_zip_dataset(str(tmp_path / f'{name}.zip'), images)
        channels = images.shape[3]
        for dry_run in (['-n'], []):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the alpha and attention warnings
                result = _train(['--loss', 'gdd', '--loss-opt', 'backbones=vgg16_bn', '--outdir', outdir, '--data',
                                 data, '--dropout', 0, '--augment', 0, '--device', 'cpu', *dry_run])
            assert result.exit_code == 2, result.output
            assert (f'Error: --loss-opt discriminator=projected reads RGB or grey images; --data has {channels} '
                    f'channels (drop the alpha channel, or use discriminator=sn_cnn)') in result.output
            assert not outdir.exists() or not os.listdir(outdir)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            result = _train(['--loss', 'gdd', '--loss-opt', 'discriminator=sn_cnn', '--outdir', outdir, '--data', data,
                             '--dropout', 0, '--augment', 0, '--device', 'cpu', '-n'])
        assert result.exit_code == 0, result.output  # the other discriminator reads any number of channels
