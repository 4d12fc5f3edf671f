"""SPD / DDPM snapshots at the command lines: train.py --init checks the loss against the pickle's preconditioning,
--loss-opt fit excludes explicit Sigma0 constants, generate.py's output-folder record compares the resolved plan,
and the errors and help texts name the flags the user gave (docs: README, SPD)."""

import json
import os

import pytest
import torch
from click.testing import CliRunner
from train_worker import random_images, write_zip_dataset

import fid
import generate
import losses
import train
from losses.spd import DDPMLoss, SPDLoss
from processes import EDMProcess
from samplers.cli_options import sampler_config
from torch_utils import persistence
from training import snapshots
from training.preconditioning import EDMPrecond, EpsPrecond

TINY = dict(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1,
            attn_resolutions=[])


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """An 8x8 grayscale dataset and tiny snapshots of each kind: SPD (T=20), DDPM (T=50), EDM."""
    root = tmp_path_factory.mktemp('spdcli')
    paths = dict(data=write_zip_dataset(str(root / 'data.zip'), random_images(64, resolution=8)))
    torch.manual_seed(0)
    for name, net, loss, process in (
            ('spd', EpsPrecond(**TINY), dict(class_name='losses.spd.SPDLoss', T=20), SPDLoss(T=20).process),
            ('ddpm', EpsPrecond(**TINY), dict(class_name='losses.spd.DDPMLoss', T=50), DDPMLoss(T=50).process),
            ('edm', EDMPrecond(**TINY), dict(class_name='losses.denoising.EDMLoss'), EDMProcess())):
        paths[name] = str(root / f'{name}.pkl')
        snapshots.save_snapshot(paths[name], ema=net.eval().requires_grad_(False), loss_kwargs=loss, process=process)
    return paths


def _train(files, tmp_path, *args):
    base = ['--outdir', str(tmp_path / 'runs'), '--data', files['data'], '--batch', '8', '--augment', '0',
            '--workers', '0', '--device', 'cpu', '--dry-run']
    return CliRunner().invoke(train.main, base + [str(a) for a in args], catch_exceptions=False)


def _printed_network(output: str) -> str:
    start = output.index('Training options:') + len('Training options:')
    return json.loads(output[start:output.index('\n\n', start + 2)])['network_kwargs']['class_name']


# ---------------------------------------------------------------------------------------------------------------------
# train.py --init: the loss must train the network's preconditioning, as without --init.

@pytest.mark.parametrize(('args', 'message'), [
    # SPD's epsilon predictor under EDM's loss (explicit, and the default loss): generate.py crashed on the result.
    (['--loss', 'edm'], 'is EpsPrecond (--precond=eps); --precond=eps is not a denoiser; --loss=edm trains edm'),
    ([], 'is EpsPrecond (--precond=eps); --precond=eps is not a denoiser; --loss=edm trains edm'),
    (['--loss', 'vp'], 'is EpsPrecond (--precond=eps); --precond=eps is not a denoiser; --loss=vp trains edm'),
    # EDM's denoiser wrapper under SPD's loss (NaN losses): the refusal of a fresh run.
    (['--loss', 'spd', '--precond', 'edm'], '--precond=edm cannot train --loss=spd, which trains eps'),
    (['--loss', 'edm', '--precond', 'eps'], '--precond=eps is not a denoiser; --loss=edm trains edm'),
])
def test_init_refuses_a_loss_that_cannot_train_the_pickles_preconditioning(files, tmp_path, args, message):
    result = _train(files, tmp_path, '--init', files['spd'], *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert 'Dry run' not in result.output and not os.path.exists(tmp_path / 'runs')
    # The same line as a fresh run's, where --precond is given.
    if '--precond' in args:
        fresh = _train(files, tmp_path, '--cbase', 8, '--cres', 1, '--blocks', 1, '--attn', '', *args)
        assert fresh.exit_code == 2 and message in fresh.output, fresh.output


@pytest.mark.parametrize(('snapshot', 'args', 'expected'), [
    ('edm', ['--loss', 'edm'], 'training.preconditioning.EDMPrecond'),
    ('edm', ['--loss', 'vp'], 'training.preconditioning.EDMPrecond'),
    ('edm', ['--loss', 've', '--precond', 've'], 'training.preconditioning.VEPrecond'),
    ('spd', ['--loss', 'spd', '--loss-opt', 'T=50'], 'training.preconditioning.EpsPrecond'),
    ('spd', ['--loss', 'ddpm', '--precond', 'eps'], 'training.preconditioning.EpsPrecond'),
])
def test_init_keeps_the_legitimate_pairs(files, tmp_path, snapshot, args, expected):
    result = _train(files, tmp_path, '--init', files[snapshot], *args)
    assert result.exit_code == 0 and 'Dry run' in result.output, result.output
    assert _printed_network(result.output) == expected


# ---------------------------------------------------------------------------------------------------------------------
# --loss-opt fit beside explicit constants.

@pytest.mark.parametrize(('options', 'given'), [(['c1=5', 'm=1'], 'c1, m'), (['c2=0.5'], 'c2'),
                                                (['c1=1.59'], 'c1')])
def test_fit_and_explicit_constants_exclude_each_other(files, tmp_path, options, given):
    kwargs = losses.loss_kwargs('spd', losses.parse_loss_options('spd', ['fit=data', *options]))
    with pytest.raises(ValueError, match=rf'^--loss-opt fit=data and --loss-opt {given} exclude each other'):
        losses.prepare_loss_kwargs(kwargs, dict(path=files['data'], resolution=8))
    result = _train(files, tmp_path, '--cbase', 8, '--cres', 1, '--blocks', 1, '--attn', '', '--loss', 'spd',
                    *[item for option in ['fit=data', *options] for item in ('--loss-opt', option)])
    assert result.exit_code == 2 and f'Error: --loss-opt fit=data and --loss-opt {given} exclude' in result.output
    # fit alone still fits all three.
    alone, _ = losses.prepare_loss_kwargs(losses.loss_kwargs('spd', dict(fit='data')),
                                          dict(path=files['data'], resolution=8))
    assert alone.fit == '' and alone.fit_source.startswith('fitted to') and alone.c1 != 1.59


# ---------------------------------------------------------------------------------------------------------------------
# generate.py's output-folder record: the plan as it resolves.

def _config(sampling, solver=None, steps=None, *solver_opt):
    return sampler_config(solver=solver, schedule=None, num_steps=steps, sigma_min=None, sigma_max=None, rho=None,
                          end=None, solver_opt=solver_opt, sampling=sampling)


def test_eps_network_without_process_record_is_refused(files, tmp_path):
    """An EpsPrecond pickle whose 'process' entry is gone was read as EDM's process and generate.py crashed on
    net.sigma_min; now the read names the missing record. EDM denoisers without one stay EDM's process."""
    for name, expect_error in [('spd', True), ('edm', False)]:
        data = dict(persistence.load_network_pickle(files[name]))
        del data['process']
        path = str(tmp_path / f'{name}-no-process.pkl')
        persistence.save_network_pickle(path, data)
        if expect_error:
            with pytest.raises(persistence.NetworkPickleError, match=r"no-process\.pkl: the network is EpsPrecond, "
                                                                     r".* no 'process' record"):
                snapshots.read_snapshot(path)
            result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'out'),
                                                        '--seeds', '0', '--device', 'cpu'])
            assert result.exit_code != 0 and "has no 'process' record" in result.output, result.output
            assert 'Traceback' not in result.output and not (tmp_path / 'out').exists()
        else:
            assert snapshots.read_snapshot(path).process.name == 'edm'


def test_record_is_the_resolved_plan(files):
    spd = snapshots.read_snapshot(files['spd'])
    sampling, net = spd.process.sampling, spd.net

    def record(*args):
        return sampling.record(net, _config(sampling, *args))

    few = record(None, 8)
    assert few['solver'] == 'dpmpp_2m' and len(few['steps']) == 8 and few['steps'][0] == 19 and few['steps'][-1] == 0
    assert few == record('dpmpp_2m', 8) == record(None, 8, 'spacing=logsnr') == record('dpmpp_2m', 8, 'spacing=logsnr')
    assert few != record(None, 8, 'spacing=uniform') != record('heun', 8)
    assert few != record(None, 9)
    full = record()
    assert full == dict(solver='ancestral', solver_options=dict(clip_x0=False), steps=list(range(19, -1, -1)))
    assert full == record('ancestral', None, 'clip_x0=false') == record(None, 20, 'spacing=quadratic')
    assert full != record(None, None, 'clip_x0=true') != record('ddim')
    # The DDPM control's own default (clip_x0=True) is what is recorded; the opposite, given, differs.
    ddpm = snapshots.read_snapshot(files['ddpm'])
    sampling, net = ddpm.process.sampling, ddpm.net
    default = record()
    assert default['solver_options'] == dict(clip_x0=True)
    assert default == record(None, None, 'clip_x0=true') != record(None, None, 'clip_x0=false')


def test_generate_reruns_into_a_folder_with_equivalent_options(files, tmp_path):
    def run(*args):
        return CliRunner().invoke(generate.main, ['--network', files['spd'], '--outdir', str(tmp_path / 'out'),
                                                  '--seeds', '0-1', '--device', 'cpu', *args])

    first = run('--steps', '8')
    assert first.exit_code == 0, first.output
    for args in (['--steps', '8', '--solver', 'dpmpp_2m'], ['--steps', '8', '--solver-opt', 'spacing=logsnr']):
        again = run(*args)
        assert again.exit_code == 0 and 'skipped 2 that already existed' in again.output, again.output
    other = run('--steps', '8', '--solver-opt', 'spacing=uniform')
    assert other.exit_code != 0 and 'holds images made with other settings (these differ: settings.steps' \
        in other.output, other.output


# ---------------------------------------------------------------------------------------------------------------------
# Messages and help.

@pytest.mark.parametrize('args', [['--order', '3'], ['--S_churn', '1'], ['--variant', 'bh1'],
                                  ['--lower-order-final', 'never'], ['--exact-third-order'], ['--S_noise', '1']])
def test_solver_flags_no_spd_solver_takes(files, tmp_path, args):
    result = CliRunner().invoke(generate.main, ['--network', files['spd'], '--outdir', str(tmp_path), '--seeds', '0',
                                                '--device', 'cpu', '--steps', '4', *args])
    flag = args[0]
    assert result.exit_code == 2, result.output
    assert (f"{flag} does not apply to any solver of the snapshot's process (its solvers: ancestral, ddim, heun, "
            f"dpmpp_2m); dpmpp_2m's options: spacing") in result.output, result.output
    assert 'only to )' not in result.output


def test_steps_beyond_T_are_refused_and_T_is_all(files, tmp_path):
    """--steps above the snapshot's T (20) was capped to T without a word (and the default solver became all-T
    ancestral); now it is refused naming T. --steps T is all steps, ancestral, as without --steps. --dg is refused by
    its flag's name."""
    def run(*args):
        return CliRunner().invoke(generate.main, ['--network', files['spd'], '--outdir', str(tmp_path / 'out'),
                                                  '--seeds', '0', '--device', 'cpu', *args])

    for args in (['--steps', '21'], ['--steps', '35', '--solver', 'heun']):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert (f"--steps {args[1]} is more than the 20 time steps of the snapshot's 'spd' process (T = 20): give "
                f"--steps 20 or fewer") in result.output, result.output
    assert not (tmp_path / 'out').exists()
    result = run('--dg', str(tmp_path / 'discriminator.pkl'))  # refused by the flag's name before it is read
    assert result.exit_code == 2 and "--dg (dg guidance) does not apply to the 'spd' process" in result.output
    result = run('--steps', '20')
    assert result.exit_code == 0 and 'solver=ancestral' in result.output and 'steps=20 of T=20 (all)' in \
        result.output, result.output


@pytest.mark.parametrize(('args', 'named'), [(['--disc', 'vp'], '--disc does not apply'),
                                             (['--disc', 've', '--sigma_max', '3'], '--disc, --sigma_max do not apply'),
                                             (['--schedule', 'vp'], '--schedule does not apply'),
                                             (['--scaling', 'vp'], '--scaling does not apply')])
def test_grid_flags_are_refused_by_the_name_given(files, tmp_path, args, named):
    result = CliRunner().invoke(generate.main, ['--network', files['spd'], '--outdir', str(tmp_path), '--seeds', '0',
                                                '--device', 'cpu', '--steps', '4', *args])
    assert result.exit_code == 2 and f"{named} to the 'spd' process" in result.output, result.output
    if args[0] == '--disc':
        assert '--schedule' not in result.output.split('Error:')[-1].split(':')[0]


def test_edm_no_op_spellings_still_sample_spd(files, tmp_path):
    for args in (['--disc', 'edm'], ['--schedule', 'linear'], ['--scaling', 'none']):
        result = CliRunner().invoke(generate.main, ['--network', files['spd'], '--outdir', str(tmp_path / args[1]),
                                                    '--seeds', '0', '--device', 'cpu', '--steps', '4', *args])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize(('args', 'message'), [
    (['--stf', '1'], 'Invalid value for --stf: STF targets need a denoising loss (edm, vp, ve); --loss=spd is not '
                     'one'),
    (['--loss-opt', 'T=1'], 'Invalid value for --loss-opt: T (the number of diffusion steps) must be an integer from '
                            '2 to 1,000,000'),
    (['--loss-opt', 'c1=-1'], 'Invalid value for --loss-opt: c1 must be a positive number, got -1.0'),
])
def test_spd_training_errors_name_the_flags(files, tmp_path, args, message):
    result = _train(files, tmp_path, '--cbase', 8, '--cres', 1, '--blocks', 1, '--attn', '', '--loss', 'spd', *args)
    assert result.exit_code == 2 and message in result.output, result.output
    ddpm = _train(files, tmp_path, '--cbase', 8, '--cres', 1, '--blocks', 1, '--attn', '', '--loss', 'ddpm',
                  '--loss-opt', 'beta_end=5')
    assert ddpm.exit_code == 2 and 'Invalid value for --loss-opt: beta_start and beta_end' in ddpm.output, ddpm.output


def test_fourier_embedding_with_time_index_labels_is_warned_about(files, tmp_path):
    """NCSN++'s Fourier embedding under a time-index noise label (SPD's eps, EDM's VP): warned, naming the fix;
    NCSN++ under EDM's or VE's log-sigma labels and DDPM++ under eps are not."""
    import warnings

    tiny = ['--cbase', 8, '--cres', 1, '--blocks', 1, '--attn', '']
    for args, warned in [(['--loss', 'spd', '--arch', 'ncsnpp'], 'EpsPrecond'),
                         (['--precond', 'vp', '--arch', 'ncsnpp'], 'VPPrecond'),
                         (['--loss', 'spd', '--arch', 'ddpmpp'], None), (['--precond', 've', '--arch', 'ncsnpp'], None),
                         (['--precond', 'edm', '--arch', 'ncsnpp'], None)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            result = _train(files, tmp_path, *tiny, *args)
        assert result.exit_code == 0, result.output
        messages = [str(w.message) for w in caught if 'Fourier noise embedding' in str(w.message)]
        if warned:
            assert len(messages) == 1 and f'{warned} labels the noise level with a time index' in messages[0] \
                and 'use --arch=ddpmpp or adm' in messages[0], messages
        else:
            assert messages == [], (args, messages)


@pytest.mark.parametrize('command, path', [(generate.main, []), (fid.main, ['calc'])])
def test_help_names_the_spd_defaults_and_solvers(command, path):
    result = CliRunner().invoke(command, [*path, '--help'], terminal_width=400)
    assert result.exit_code == 0
    text = ' '.join(result.output.split())
    assert "[default: 18, or the schedule file's; SPD/DDPM snapshots: all T (ancestral)]" in text
    assert 'SPD/DDPM snapshots: ancestral, ddim, heun, dpmpp_2m' in text
    assert 'SPD/DDPM: ancestral, or dpmpp_2m when --steps < T]' in text
