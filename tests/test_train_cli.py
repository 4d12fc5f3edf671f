"""train.py end to end on a tiny dataset: artefacts, run-dir naming, resume, dry run, option errors."""

import contextlib
import fractions
import glob
import json
import os
import re
import warnings

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from train_worker import random_images, write_zip_dataset

import dnnlib
import train
from losses.denoising import SIGMA_BIN_EDGES
from torch_utils import persistence, training_stats

TINY_NET = ['--cbase', '8', '--cres', '1,2', '--blocks', '1', '--attn', '4', '--workers', '0', '--device', 'cpu']


@pytest.fixture(scope='module')
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    images = random_images(64)
    return dict(uncond=write_zip_dataset(str(root / 'tiny.zip'), images),
                cond=write_zip_dataset(str(root / 'tinylab.zip'), images, labels=[i % 3 for i in range(64)]))


def _invoke(args):
    result = CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)
    return result


def _printed_options(output: str) -> dict:
    start = output.index('Training options:') + len('Training options:')
    return json.loads(output[start:output.index('\n\n', start + 2)])


def test_train_opens_the_dataset_once(datasets, tmp_path, monkeypatch):
    """train.py validates --data by opening it, and the training loop trains on that object: a ZIP's directory is
    listed once per rank (at ImageNet's 1.28M images a listing takes ~13 s)."""
    from training import dataset as dataset_module
    opened = []
    original = dataset_module.ImageFolderDataset.__init__

    def counting_init(self, path, *args, **kwargs):
        opened.append(path)
        original(self, path, *args, **kwargs)

    monkeypatch.setattr(dataset_module.ImageFolderDataset, '__init__', counting_init)
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--batch', 16, '--duration',
                      0.000016, '--tick', 1, *TINY_NET])
    assert result.exit_code == 0, result.output
    assert opened == [datasets['uncond']]


def test_train_end_to_end_and_resume(datasets, tmp_path, monkeypatch):
    outdir = tmp_path / 'runs'
    args = ['--outdir', outdir, '--data', datasets['cond'], '--cond', '1', '--batch', 64, '--duration', 0.001,
            '--tick', 1, '--snap', 1, '--dump', 1, '--seed', 3, '--dropout', 0, *TINY_NET]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    run_dir = outdir / '00000-tinylab-cond-ddpmpp-edm-gpus1-batch64-fp32'
    assert sorted(os.listdir(outdir)) == [run_dir.name]
    assert sorted(os.listdir(run_dir)) == ['log.txt', 'network-snapshot-000000.pkl', 'network-snapshot-000001.pkl',
                                           'stats.jsonl', 'training-state-000001.pt', 'training_options.json']

    options = json.load(open(run_dir / 'training_options.json'))
    assert options['run_dir'] == str(run_dir) and options['seed'] == 3 and options['total_kimg'] == 1
    assert options['dataset_kwargs'] == dict(class_name='training.dataset.ImageFolderDataset',
                                             path=datasets['cond'], use_labels=True, xflip=False, cache=True,
                                             resolution=8, max_size=64)
    assert options['network_kwargs']['class_name'] == 'training.preconditioning.EDMPrecond'
    assert (options['network_kwargs']['model_channels'], options['network_kwargs']['channel_mult']) == (8, [1, 2])
    assert options['network_kwargs']['augment_dim'] == 9 and options['augment_kwargs']['p'] == 0.12
    assert options['loss_kwargs'] == {'class_name': 'losses.denoising.EDMLoss'}
    assert options['optimizer_kwargs'] == dict(class_name='torch.optim.Adam', lr=0.001, betas=[0.9, 0.999], eps=1e-8)
    assert (options['ema_halflife_kimg'], options['lr_rampup_kimg'], options['kimg_per_tick']) == (500, 10000, 1)
    assert options['ema_rampup_ratio'] == 0.05  # EDM's ramp by default (--ema-rampup)

    log = open(run_dir / 'log.txt').read()
    assert 'tick 0 ' in log and 'tick 1 ' in log and 'Exiting...' in log
    lines = [json.loads(line) for line in open(run_dir / 'stats.jsonl')]
    assert len(lines) == 2
    assert {'Loss/loss', 'Progress/tick', 'Progress/kimg', 'Timing/total_sec', 'Timing/sec_per_tick',
            'Timing/sec_per_kimg', 'Timing/maintenance_sec', 'Resources/cpu_mem_gb', 'Resources/peak_gpu_mem_gb',
            'Resources/peak_gpu_mem_reserved_gb', 'Loss/nonfinite', 'Progress/lr', 'timestamp',
            *training_stats.bin_names('Loss/sigma', SIGMA_BIN_EDGES)} == set(lines[-1])
    assert lines[-1]['Loss/nonfinite']['mean'] == 0 and lines[-1]['Loss/nonfinite']['num'] == 15  # steps, none bad
    assert lines[-1]['Progress/kimg']['mean'] == 1.024 and lines[-1]['Loss/loss']['num'] == 15 * 64 * 64

    snapshot = persistence.load_network_pickle(str(run_dir / 'network-snapshot-000001.pkl'))
    assert set(snapshot) == {'ema', 'loss', 'process', 'augment_pipe', 'dataset_kwargs'}
    assert snapshot['loss'] == {'name': 'edm', 'options': {}} and snapshot['process'] == {'name': 'edm', 'options': {}}
    assert (snapshot['ema'].label_dim, snapshot['ema'].img_resolution) == (3, 8)
    state = torch.load(run_dir / 'training-state-000001.pt', weights_only=True)
    assert state['cur_nimg'] == 1024 and state['seed'] == 3
    for name, tensor in snapshot['ema'].state_dict().items():
        assert torch.equal(tensor, state['ema'][name])

    # Resume our training state: a new run dir, the saved seed, and training continues to 2 kimg. The state given
    # relative to the current folder is recorded absolute (phema.py follows it from any folder).
    monkeypatch.chdir(outdir)
    # Post-hoc EMAs cannot start mid-run: refused before anything is written (the next run is still 00001).
    result = _invoke(['--resume', os.path.join(run_dir.name, 'training-state-000001.pt'), '--phema', '0.05,0.1'])
    assert result.exit_code == 2 and 'keeps no post-hoc EMAs: they are tracked from the first step' in result.output
    result = _invoke(['--outdir', outdir, '--data', datasets['cond'], '--cond', '1', '--batch', 64, '--duration',
                      0.002, '--tick', 1, '--snap', 1, '--dump', 1, '--dropout', 0, *TINY_NET,
                      '--resume', os.path.join(run_dir.name, 'training-state-000001.pt')])
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    resumed_dir = outdir / '00001-tinylab-cond-ddpmpp-edm-gpus1-batch64-fp32'
    options = json.load(open(resumed_dir / 'training_options.json'))
    assert options['seed'] == 3 and options['resume_state_dump'] == str(run_dir / 'training-state-000001.pt')
    state = torch.load(resumed_dir / 'training-state-000002.pt', weights_only=True)
    assert state['cur_nimg'] == 2048 and state['cur_iter'] == 32
    # log.txt holds the summary printed before the run directory existed (options, what was resumed and changed).
    log = open(resumed_dir / 'log.txt').read()
    assert log.index('Training options:') < log.index('Resuming from:') < log.index('\ntick ')
    assert 'changed --duration: 0.001 -> 0.002 (the continuation stays exact)' in log

    # --resume=auto on the finished run (a kill after its last state was written): nothing to train, nothing written.
    # EDM's loop would train one more step and write a 000002 snapshot and state that differ from the finished ones.
    before = sorted(os.walk(outdir))
    result = _invoke(['--outdir', outdir, '--resume', 'auto', '--duration', 0.002])
    assert result.exit_code == 0, result.output
    assert (f"{resumed_dir / 'training-state-000002.pt'} is at 2.048 kimg, the end of the run (--duration=0.002 "
            "Mimg): nothing to train" in result.output)
    assert sorted(os.walk(outdir)) == before


@pytest.mark.parametrize(('args', 'name'), [
    ([], 'ddpmpp-edm-gpus1'),
    (['--loss', 'spd'], 'ddpmpp-eps-gpus1'),
    (['--loss', 'ddpm', '--precond', 'eps'], 'ddpmpp-eps-ddpm-gpus1'),
    (['--precond', 'vp', '--loss', 'edm'], 'ddpmpp-vp-edm-gpus1'),
])
def test_run_name_tells_losses_over_one_network_kind_apart(datasets, tmp_path, args, name):
    # EDM's names where the loss is the preconditioning's default; DDPM's and SPD's runs (both eps) were named alike.
    result = _invoke(['--outdir', tmp_path, '--data', datasets['uncond'], '-n', *TINY_NET, *args])
    assert result.exit_code == 0, result.output
    assert _printed_options(result.output)['run_dir'] == str(tmp_path / f'00000-tiny-uncond-{name}-batch512-fp32')


def test_dry_run_writes_nothing_and_options_follow_precond(datasets, tmp_path):
    outdir = tmp_path / 'runs'
    result = _invoke(['--outdir', outdir, '--data', datasets['uncond'], '--precond', 've', '--loss-opt',
                      'sigma_max=80', '--batch', 16, '--precision', 'bf16', '--desc', 'hello', '-n', *TINY_NET])
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output and not os.path.exists(outdir)
    options = _printed_options(result.output)
    assert options['network_kwargs']['class_name'] == 'training.preconditioning.VEPrecond'
    assert options['loss_kwargs'] == {'class_name': 'losses.denoising.VELoss', 'sigma_max': 80}
    assert options['run_dir'] == str(outdir / '00000-tiny-uncond-ddpmpp-ve-gpus1-batch16-bf16-hello')
    assert options['precision'] == 'bf16' and isinstance(options['seed'], int)  # random seed drawn

    # --loss overrides the precond's default loss; arch presets as EDM's.
    result = _invoke(['--outdir', outdir, '--data', datasets['uncond'], '--precond', 'vp', '--loss', 'edm',
                      '--arch', 'ncsnpp', '-n', '--device', 'cpu'])
    options = _printed_options(result.output)
    assert options['network_kwargs']['class_name'] == 'training.preconditioning.VPPrecond'
    assert options['loss_kwargs'] == {'class_name': 'losses.denoising.EDMLoss'}
    assert options['network_kwargs']['embedding_type'] == 'fourier'
    assert options['network_kwargs']['resample_filter'] == [1, 3, 3, 1]
    assert options['network_kwargs']['model_channels'] == 128 and options['total_kimg'] == 200000
    assert options['network_kwargs']['dropout'] == 0.13 and options['batch_size'] == 512


@pytest.mark.parametrize('duration, total_kimg, rounded_up', [('1.001', 1001, False), ('0.57', 570, False),
                                                             ('200', 200000, False), ('0.0025', 3, True),
                                                             ('0.0000001', 1, True)])
def test_duration_in_whole_kimg(datasets, tmp_path, duration, total_kimg, rounded_up):
    # EDM's int(duration * 1000): 1.001 -> 1000 and 0.57 -> 569 (float error). A fraction of a kimg rounds up, with a
    # warning: a run ending at 2.5 kimg would name its last snapshot 000002, over the one of 2 kimg.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = _invoke(['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--duration', duration, '-n',
                          '--lr-rampup', 0, *TINY_NET])
    assert result.exit_code == 0, result.output
    options = _printed_options(result.output)
    assert options['total_kimg'] == total_kimg and type(options['total_kimg']) is int
    messages = [str(w.message) for w in caught if 'whole number of kimg' in str(w.message)]
    assert messages == ([f'--duration={float(duration):g} Mimg is not a whole '
                         f'number of kimg (snapshots and training states are named by kimg): training for '
                         f'{total_kimg} kimg'] if rounded_up else [])


@pytest.mark.parametrize('extra, message', [
    (['--batch', 12, '--batch-gpu', 5],
     'Invalid value for --batch-gpu: the per-process batch 12 (--batch 12 / 1 processes) is not a multiple of 5'),
    (['--loss-opt', 'foo=1'], "Invalid value for --loss-opt: loss 'edm' has no option 'foo'"),
    (['--loss-opt', 'P_mean=x'], "cannot read 'x' as float"),
    (['--loss-opt', 'sigma_data=0'], '--loss-opt: EDM needs sigma_data > 0 and P_std >= 0, got sigma_data=0'),
    (['--loss-opt', 'P_mean=60'], '--loss-opt: P_mean=60, P_std=1.2 gives noise levels 2.83e+23 ... 4.61e+28'),
    (['--precond', 've', '--loss-opt', 'sigma_min=0'], '--loss-opt: VE needs 0 < sigma_min <= sigma_max'),
    (['--cond', '1'], '--cond=True requires labels specified in dataset.json'),
    (['--transfer', 'a.pkl', '--resume', 'b.pt'], '--transfer and --resume cannot be specified at the same time'),
    (['--resume', 'nope.pt'], "Invalid value for --resume: nope.pt: no such file"),  # not "not a training-state"
    (['--resume', '.'], "Invalid value for --resume: . holds no training-state-*.pt"),
    (['--fp16', '1', '--precision', 'bf16'], 'use either --fp16'),
    (['--precond', 'foo'], "Invalid value for '--precond'"),
    (['--loss', 'foo'], "Invalid value for '--loss'"),
    (['--batch', 0], "Invalid value for '--batch'"),
    (['--cres', '1,x'], "Invalid value for '--cres'"),
    # A fifth level of 8x8 images would be 0x0: built, then a traceback at the first step, after the run folder.
    (['--cres', '1,2,2,2,2'], 'Invalid value for --cres: --cres=1,2,2,2,2 has 5 levels, which halve the image 4 times, '
                              'but --data holds 8x8 images, whose side is not divisible by 16: give --cres at most 4 '
                              'entries'),
])
def test_bad_options(datasets, tmp_path, extra, message):
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '-n', *extra])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not os.path.exists(tmp_path / 'runs')


def test_missing_dataset_and_edm_state_without_snapshot(datasets, tmp_path):
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', tmp_path / 'missing.zip', '-n'])
    assert result.exit_code == 2 and 'Invalid value for --data:' in result.output and 'missing.zip' in result.output

    # A state that weights_only refuses is taken for EDM's, which needs its network-snapshot beside it.
    edm_state = tmp_path / 'old' / 'training-state-000005.pt'
    os.makedirs(edm_state.parent)
    torch.save(dict(net=fractions.Fraction(1, 3), optimizer_state={}), edm_state)
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '-n', '--resume', edm_state])
    assert result.exit_code != 0
    assert 'an EDM training state needs' in result.output and 'network-snapshot-000005.pkl' in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only error')
def test_cuda_device_on_cpu_machine(datasets, tmp_path):
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '-n', '--device', 'cuda'])
    assert result.exit_code != 0 and 'CUDA is not available on this machine' in result.output


def test_warns_when_the_learning_rate_ramp_outlasts_the_run(datasets, tmp_path):
    args = ['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--duration', 0.003, '-n', *TINY_NET]
    with pytest.warns(UserWarning, match=r'learning-rate ramp-up \(--lr-rampup=10000 kimg\) is longer than the run '
                                         r'\(3 kimg\).*at the end it is 0\.03% of it'):
        assert _invoke(args).exit_code == 0
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*learning-rate ramp-up.*')
        assert _invoke([*args, '--lr-rampup', 1]).exit_code == 0  # a ramp that fits: no warning


def _tiny_run(outdir, data, *extra, duration=0.001):
    result = _invoke(['--outdir', outdir, '--data', data, '--batch', 64, '--duration', duration, '--tick', 1,
                      '--snap', 1, '--dump', 1, '--seed', 5, *TINY_NET, *extra])
    assert result.exit_code == 0, result.output
    return result


def _resumed_from(output: str) -> str:
    return output.split('Resuming from:')[1].split('\n')[0].strip()


@pytest.mark.slow
def test_resume_finds_the_newest_run_and_files_that_moved(datasets, tmp_path, monkeypatch):
    import shutil

    # A run started with --transfer resumes (its saved options named --transfer, which a resume refused).
    _tiny_run(tmp_path / 'base', datasets['uncond'])
    snapshot = tmp_path / 'base' / '00000-tiny-uncond-ddpmpp-edm-gpus1-batch64-fp32' / 'network-snapshot-000001.pkl'
    _tiny_run(tmp_path / 'tuned', datasets['uncond'], '--transfer', snapshot)
    result = _invoke(['--outdir', tmp_path / 'tuned', '--resume', 'auto', '--duration', 0.002, '-n'])
    assert result.exit_code == 0 and _resumed_from(result.output).endswith('training-state-000001.pt'), result.output

    # --resume=auto continues the run written to last, not the state of most images under --outdir: run 00000 is
    # finished at 2 kimg, the newer 00001 stopped at 1.
    _tiny_run(tmp_path / 'runs', datasets['uncond'], duration=0.002)
    _tiny_run(tmp_path / 'runs', datasets['uncond'], '--desc', 'newer')
    result = _invoke(['--outdir', tmp_path / 'runs', '--resume', 'auto', '--duration', 0.002, '-n'])
    assert result.exit_code == 0, result.output
    assert _resumed_from(result.output) == str(tmp_path / 'runs' / '00001-tiny-uncond-ddpmpp-edm-gpus1-batch64-fp32-'
                                               'newer' / 'training-state-000001.pt')

    # Relative paths are recorded absolute: the state resumes from another folder, into the same --outdir; a
    # dataset that moved is named anew (a note, not a refusal).
    work = tmp_path / 'work'
    work.mkdir()
    shutil.copy(datasets['uncond'], work / 'tiny.zip')
    monkeypatch.chdir(work)
    _tiny_run('rel', 'tiny.zip')
    run_dir = work / 'rel' / '00000-tiny-uncond-ddpmpp-edm-gpus1-batch64-fp32'
    assert json.load(open(run_dir / 'training_options.json'))['dataset_kwargs']['path'] == str(work / 'tiny.zip')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    state = run_dir / 'training-state-000001.pt'
    result = _invoke(['--resume', state, '--duration', 0.002, '-n'])
    assert result.exit_code == 0, result.output
    assert f'Output directory:        {work / "rel"}' in result.output
    # The same file through a link is the same data: no note, and --resume=auto continues the run.
    os.symlink(work / 'tiny.zip', tmp_path / 'link.zip')
    result = _invoke(['--outdir', work / 'rel', '--resume', 'auto', '--duration', 0.002, '-n', '--data',
                      tmp_path / 'link.zip'])
    assert result.exit_code == 0 and 'passing over' not in result.output, result.output
    assert str(state) in result.output and '--data:' not in result.output, result.output
    os.rename(work / 'tiny.zip', work / 'moved.zip')
    result = _invoke(['--resume', state, '--duration', 0.002, '-n', '--data', work / 'moved.zip'])
    assert result.exit_code == 0, result.output
    assert f"--data: '{work / 'tiny.zip'}' -> '{work / 'moved.zip'}' (another path" in result.output


def test_run_directory_mistakes_are_refused_before_anything_is_written(datasets, tmp_path):
    # --desc with a path separator: a nested run directory --resume=auto would not see.
    result = _invoke(['--outdir', tmp_path / 'd', '--data', datasets['uncond'], '--desc', 'abl/lr1', '-n'])
    assert result.exit_code == 2 and "'abl/lr1': the run directory name may not hold a path separator" in result.output
    # --nosubdir into a folder that holds a run: the two would mix (states, snapshots, stats.jsonl).
    _tiny_run(tmp_path / 'flat', datasets['uncond'], '--nosubdir')
    before = sorted(os.listdir(tmp_path / 'flat'))
    result = _invoke(['--outdir', tmp_path / 'flat', '--data', datasets['uncond'], '--nosubdir', *TINY_NET])
    assert result.exit_code == 2 and 'holds another run (network-snapshot-000000.pkl' in result.output
    assert '--nosubdir would mix the two' in result.output and sorted(os.listdir(tmp_path / 'flat')) == before
    # --arch next to --init: the pickle decides the architecture (--cbase and the like were refused already).
    snapshot = tmp_path / 'flat' / 'network-snapshot-000001.pkl'
    result = _invoke(['--outdir', tmp_path / 'i', '--data', datasets['uncond'], '--init', snapshot, '--arch', 'adm',
                      '-n'])
    assert result.exit_code == 2 and '--arch: --init takes the architecture from the pickle' in result.output
    # A preset's architecture is not the user's: --init's pickle decides (EDM's preset, --init from a snapshot).
    result = _invoke(['--outdir', tmp_path / 'i', '--data', datasets['uncond'], '--init', snapshot, '--preset',
                      'edm-cifar10-uncond-vp', '-n', '--workers', '0', '--device', 'cpu'])
    assert result.exit_code == 0 and f'Network architecture:    from {snapshot}' in result.output, result.output
    # An EDM training state (torch.save of the pickled net and Adam's state) with its snapshot beside it is found by
    # --resume=DIR as --resume=FILE takes it (before, DIR and auto skipped it as unreadable).
    import shutil

    from training import snapshots
    edm_run = tmp_path / 'edm'
    edm_run.mkdir()
    shutil.copy(snapshot, edm_run / 'network-snapshot-000001.pkl')
    net = snapshots.read_snapshot(str(snapshot)).net.train().requires_grad_(True)
    torch.save(dict(net=net, optimizer_state=torch.optim.Adam(net.parameters()).state_dict()),
               edm_run / 'training-state-000001.pt')
    result = _invoke(['--outdir', tmp_path / 'e', '--data', datasets['uncond'], '--resume', edm_run, '-n',
                      *TINY_NET])
    assert result.exit_code == 0 and _resumed_from(result.output) == str(edm_run / 'training-state-000001.pt'), \
        result.output
    # Naming on resume what the run's defaults resolved to is no change (--precond=edm was refused against a state
    # saved without --precond, --loss=edm listed as a change); another value still is.
    flat_state = tmp_path / 'flat' / 'training-state-000001.pt'
    result = _invoke(['--resume', flat_state, '--precond', 'edm', '--loss', 'edm', '--duration', 0.002, '-n'])
    assert result.exit_code == 0 and 'changed --duration' in result.output, result.output
    assert 'changed --precond' not in result.output and 'changed --loss' not in result.output
    result = _invoke(['--resume', flat_state, '--precond', 'vp', '--duration', 0.002, '-n'])
    assert result.exit_code == 2 and "'vp' contradicts the training state" in result.output
    assert "which was trained with 'edm': the network" in result.output  # not "with None" (saved without --precond)


def test_resume_onto_a_dataset_of_another_shape_is_one_line_before_any_run_directory(datasets, tmp_path):
    """A resume whose --data names a dataset of another resolution or channel count: the state's weights cannot fit
    the network built for it. One line naming a tensor, from our states and from EDM's (before: load_state_dict's
    traceback from inside the loop, after the run directory had been created)."""
    import shutil

    from training import snapshots
    _tiny_run(tmp_path / 'run', datasets['uncond'], '--nosubdir')
    state = tmp_path / 'run' / 'training-state-000001.pt'
    larger = write_zip_dataset(str(tmp_path / 'larger.zip'), random_images(8, resolution=16))
    rgb = write_zip_dataset(str(tmp_path / 'rgb.zip'), np.repeat(random_images(8)[..., None], 3, axis=3))
    edm_run = tmp_path / 'edm'
    edm_run.mkdir()
    shutil.copy(tmp_path / 'run' / 'network-snapshot-000001.pkl', edm_run / 'network-snapshot-000001.pkl')
    net = snapshots.read_snapshot(str(edm_run / 'network-snapshot-000001.pkl')).net
    torch.save(dict(net=net, optimizer_state=torch.optim.Adam(net.parameters()).state_dict()),
               edm_run / 'training-state-000001.pt')
    outdir = tmp_path / 'out'
    for resume, extra in ((state, []), (edm_run / 'training-state-000001.pt', TINY_NET)):
        for data, interface, tensor in (
                (larger, 'img_resolution=16, img_channels=1', '8x8_block0.conv0.weight is (8, 8, 3, 3) there, (16, 8, '
                                                              '3, 3) here (and '),
                (rgb, 'img_resolution=8, img_channels=3', 'there, (8, 3, 3, 3) here')):
            for dry_run in (['-n'], []):
                result = _invoke(['--outdir', outdir, '--resume', resume, '--data', data, '--duration', 0.002,
                                  *extra, *dry_run])
                assert result.exit_code == 2, result.output
                assert f'Invalid value for --resume: {resume}: its weights do not fit the network for this dataset ' \
                       f'({interface}, label_dim=0): ' in result.output and tensor in result.output, result.output
                assert 'Is --data the dataset it was trained on?' in result.output
                assert not outdir.exists() or not os.listdir(outdir)
    # The dataset it was trained on, under another name: a note, and the run goes on.
    moved = tmp_path / 'moved.zip'
    shutil.copy(datasets['uncond'], moved)
    result = _invoke(['--outdir', outdir, '--resume', state, '--data', moved, '--duration', 0.002, '-n'])
    assert result.exit_code == 0, result.output


def test_warnings_given_before_the_log_opens_are_in_log_txt(datasets, tmp_path):
    """A run's log.txt is read long after the terminal is gone: the options' warnings, given before it exists, are
    written at its top (after that, the log catches everything printed)."""
    with pytest.warns(UserWarning, match='learning-rate ramp-up'):
        _tiny_run(tmp_path / 'run', datasets['uncond'], '--nosubdir')
    log = (tmp_path / 'run' / 'log.txt').read_text()
    head = log[:log.index('Creating output directory') if 'Creating output directory' in log else len(log)]
    assert 'Warnings before this log began:\n  UserWarning: the learning-rate ramp-up (--lr-rampup=10000 kimg) is ' \
           'longer than the run (1 kimg)' in head, log[:3000]
    assert log.count('learning-rate ramp-up') == 1
    import warnings
    assert warnings.showwarning.__name__ != 'show_and_keep'  # given back when the command ended


def test_each_run_in_one_process_shows_and_logs_its_warnings(datasets, tmp_path):
    # train.main called again and again in one process (a notebook): Python shows a warning once per code location,
    # so from the third run on (a filter change in between had reset that once) its option warnings were neither
    # shown nor written into its log.txt.
    import warnings
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter('default')
        for run in range(3):
            _tiny_run(tmp_path / f'run{run}', datasets['uncond'], '--nosubdir')
            head = (tmp_path / f'run{run}' / 'log.txt').read_text().split('Creating output directory')[0]
            assert 'Warnings before this log began:\n  UserWarning: the learning-rate ramp-up' in head, (run, head)
    assert sum('learning-rate ramp-up' in str(w.message) for w in shown) == 3


def test_loss_opt_on_resume_updates_the_saved_options_key_by_key():
    # Before, --loss-opt on resume replaced the run's whole list: `--loss-opt freeze=1` on a GDD run dropped its
    # discriminator=sn_cnn (the default projected one came back); `c1=3` on an SPD run dropped T=50.
    saved = {'loss': 'spd', 'loss_opt': ['T=50', 'c1=2.0']}
    opts = dnnlib.EasyDict(loss=None, loss_opt=('c1=3.0', 'm=2.5'))
    from training import resume
    notes = resume.apply_saved_options(opts, saved, {'loss_opt'}, 'state.pt')
    assert opts.loss == 'spd' and opts.loss_opt == ['T=50', 'c1=3.0', 'm=2.5']
    assert notes == ["--loss-opt: ['T=50', 'c1=2.0'] -> ['T=50', 'c1=3.0', 'm=2.5'] (the continuation is not exact)"]
    # The same items again: no change, no note.
    opts = dnnlib.EasyDict(loss=None, loss_opt=('c1=2.0',))
    assert resume.apply_saved_options(opts, saved, {'loss_opt'}, 'state.pt') == []
    assert opts.loss_opt == ['T=50', 'c1=2.0']
    # Another loss: its options are not the saved loss's, so they replace them.
    opts = dnnlib.EasyDict(loss='ddpm', loss_opt=('T=40',))
    resume.apply_saved_options(opts, saved, {'loss', 'loss_opt'}, 'state.pt')
    assert list(opts.loss_opt) == ['T=40']


def test_a_resume_that_switches_between_edms_fp16_and_autocast_drops_the_runs_own_choice(datasets, tmp_path):
    """--fp16=1 (EDM's fp16 network; GDD's presets) and --precision exclude each other. Resumed with the other one,
    the run's own value was carried over and the resume refused: 'use either --fp16 ... or --precision ..., not both',
    naming an option not given. The given one replaces it, as it replaces a preset's, and the note says so."""
    outdir = tmp_path / 'runs'
    with pytest.warns(UserWarning, match='--fp16 has no effect on the CPU'):
        result = _invoke(['--outdir', outdir, '--data', datasets['uncond'], '--batch', 16, '--duration', 0.000016,
                          '--tick', 1, '--fp16', 1, *TINY_NET])
    assert result.exit_code == 0, result.output
    state = glob.glob(str(outdir / '*' / 'training-state-*.pt'))[0]
    result = _invoke(['--resume', state, '--precision', 'bf16', '--duration', 0.002, '-n'])
    assert result.exit_code == 0, result.output
    options = _printed_options(result.output)
    assert options['precision'] == 'bf16' and options['network_kwargs']['use_fp16'] is False
    assert "--fp16: True -> False (replaced by --precision=bf16: the continuation is not exact)" in result.output
    # The reverse: --fp16=1 on a bf16 run.
    from training import resume
    opts = dnnlib.EasyDict(fp16=True, precision='fp32')
    notes = resume.apply_saved_options(opts, {'fp16': False, 'precision': 'bf16'}, {'fp16'}, 'state.pt')
    assert (opts.fp16, opts.precision) == (True, 'fp32')
    assert sorted(notes) == ['--fp16: False -> True (the continuation is not exact)',
                             "--precision: 'bf16' -> 'fp32' (replaced by --fp16=1: the continuation is not exact)"]


def test_run_directory_numbers_are_claimed_by_creating_them(tmp_path, monkeypatch):
    # Two runs started at once into one --outdir both listed it before either made its folder, and shared 00000.
    from training import run_folder
    outdir = tmp_path / 'runs'
    first = run_folder.next_run_dir(str(outdir), 'x', nosubdir=False, create=True)
    assert first == str(outdir / '00000-x') and os.path.isdir(first)
    monkeypatch.setattr(run_folder.os, 'listdir', lambda path: [])  # the other run's listing, before 00000 existed
    assert run_folder.next_run_dir(str(outdir), 'x', nosubdir=False, create=True) == str(outdir / '00001-x')
    monkeypatch.undo()
    (outdir / '00002-x').write_text('a file of that name')  # not a run folder, but the name is taken
    assert run_folder.next_run_dir(str(outdir), 'x', nosubdir=False, create=True) == str(outdir / '00003-x')
    assert run_folder.next_run_dir(str(outdir), 'y', nosubdir=False) == str(outdir / '00004-y')  # -n: nothing created
    assert sorted(os.listdir(outdir)) == ['00000-x', '00001-x', '00002-x', '00003-x']


def test_nosubdir_resume_from_elsewhere_and_restart_before_the_first_state(datasets, tmp_path):
    # --nosubdir --resume=STATE-of-another-folder into a folder holding a run: the resumed run overwrote its states
    # and stats (exit 0); refused now, as without --resume.
    _tiny_run(tmp_path / 'a', datasets['uncond'], '--nosubdir')
    _tiny_run(tmp_path / 'b', datasets['uncond'], '--nosubdir')
    before = sorted(os.listdir(tmp_path / 'b'))
    state = tmp_path / 'a' / 'training-state-000001.pt'
    result = _invoke(['--resume', state, '--outdir', tmp_path / 'b', '--nosubdir', '--duration', 0.002])
    assert result.exit_code == 2, result.output
    assert (f'holds another run (network-snapshot-000000.pkl, network-snapshot-000001.pkl, stats.jsonl, ...): '
            f'--nosubdir would mix it with the run resumed from {state}') in result.output
    assert sorted(os.listdir(tmp_path / 'b')) == before
    # A job killed before its first state, restarted with --resume=auto: set aside, started over (it was refused on
    # every restart: "holds another run ... use another --outdir, or --resume" with --resume given).
    flat = tmp_path / 'flat'
    _tiny_run(flat, datasets['uncond'], '--nosubdir')
    for name in os.listdir(flat):
        if name.startswith('training-state-') or name == 'network-snapshot-000001.pkl':
            os.remove(flat / name)
    leftovers = sorted(os.listdir(flat))
    assert 'stats.jsonl' in leftovers and 'network-snapshot-000000.pkl' in leftovers
    result = _invoke(['--outdir', flat, '--data', datasets['uncond'], '--nosubdir', '--resume', 'auto', '-n',
                      *TINY_NET])
    assert result.exit_code == 0 and sorted(os.listdir(flat)) == leftovers, result.output  # -n moves nothing
    result = _tiny_run(flat, datasets['uncond'], '--nosubdir', '--resume', 'auto')
    aside = flat / 'interrupted-before-first-state-1'
    assert f'moved them to {aside} and starting over' in result.output
    assert sorted(os.listdir(aside)) == leftovers
    assert os.path.isfile(flat / 'training-state-000001.pt')
    # A resume file that does not exist says so.
    missing = tmp_path / 'gone' / 'training-state-000001.pt'
    result = _invoke(['--resume', missing, '-n'])
    assert result.exit_code == 2 and f'{missing}: no such file' in result.output


def test_preset_on_data_of_another_resolution_warns(datasets, tmp_path):
    with pytest.warns(UserWarning, match=r"--preset=edm-cifar10-uncond-vp was published for 32x32 images "
                                         r"\(cifar10-32x32.zip\); --data holds 8x8: its architecture and schedule "
                                         r"are not the paper's setting there"):
        result = _invoke(['--outdir', tmp_path / 'p', '--data', datasets['uncond'], '--preset',
                          'edm-cifar10-uncond-vp', '-n', '--workers', '0', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        result = _invoke(['--outdir', tmp_path / 'q', '--data', datasets['uncond'], '-n', *TINY_NET])
    assert result.exit_code == 0, result.output


def test_resume_auto_passes_over_runs_of_other_options(datasets, tmp_path):
    # A sweep sharing --outdir: `--resume=auto` continues the run of the options given, not the newest run.
    outdir = tmp_path / 'runs'
    args = ['--outdir', outdir, '--data', datasets['uncond'], '--batch', 64, '--duration', 0.001, '--tick', 1,
            '--snap', 1, '--dump', 1, '--dropout', 0, *TINY_NET]
    assert _invoke([*args, '--seed', 3]).exit_code == 0
    result = _invoke([*args, '--seed', 4, '--resume', 'auto'])
    assert result.exit_code == 0, result.output
    first, second = (outdir / f'0000{i}-tiny-uncond-ddpmpp-edm-gpus1-batch64-fp32' for i in (0, 1))
    assert f'--resume=auto: passing over {first}, another run (--seed: 3 -> 4)' in result.output
    assert 'of a run with these options; starting a new run' in result.output and 'Resuming from' not in result.output
    assert json.load(open(second / 'training_options.json'))['seed'] == 4
    # The first run's command again, longer: it continues the first run, though the second was written to last.
    result = _invoke([*args[:7], 0.002, *args[8:], '--seed', 3, '--resume', 'auto'])
    assert result.exit_code == 0, result.output
    assert f'passing over {second}, another run (--seed: 4 -> 3)' in result.output
    assert f'Resuming from:           {first / "training-state-000001.pt"}' in result.output
    # A network option: another network, passed over too.
    result = _invoke([*args, '--seed', 3, '--cbase', 16, '--resume', 'auto', '-n'])
    assert f'passing over {first}, another run (--cbase: another network)' in result.output, result.output


def test_a_run_keeps_what_its_preset_set_in_the_version_that_made_it(datasets, tmp_path):
    """edm-cifar10-uncond-vp set --precond=vp before 2026-12-03 (edm since). Continued by its own command line after
    an update, such a run was passed over by --resume=auto as another network, and a run of another preconditioning
    started from step 0; --resume=STATE with the preset was refused for a --precond that was never given. The run
    keeps the value its preset gave it, and says so."""
    outdir = tmp_path / 'runs'
    args = ['--preset', 'edm-cifar10-uncond-vp', '--outdir', outdir, '--data', datasets['uncond'], '--batch', 64,
            '--tick', 1, '--snap', 1, '--dump', 1, '--seed', 5, *TINY_NET]
    # As the earlier version made it: its recorded options are the preset's name and the --precond=vp it set.
    assert _invoke([*args, '--duration', 0.001, '--precond', 'vp']).exit_code == 0
    state = outdir / '00000-tiny-uncond-ddpmpp-vp-gpus1-batch64-fp32' / 'training-state-000001.pt'
    note = ("changed --precond: 'edm' -> 'vp' (--preset=edm-cifar10-uncond-vp sets 'edm' in this version; the run "
            "keeps the 'vp' it was made with)")
    for resume in ('auto', state):
        result = _invoke([*args, '--duration', 0.002, '--resume', resume, '-n'])
        assert result.exit_code == 0, result.output
        assert f'Resuming from:           {state}' in result.output and note in result.output, result.output
        assert _printed_options(result.output)['network_kwargs']['class_name'] == 'training.preconditioning.VPPrecond'
    # Only a preset's earlier values: a run of a preset with an option typed otherwise is still another run.
    ffhq = ['--preset', 'edm-ffhq-vp', *args[2:]]
    assert _invoke([*ffhq, '--duration', 0.001, '--lr', 0.003]).exit_code == 0
    result = _invoke([*ffhq, '--duration', 0.002, '--resume', 'auto', '-n'])
    assert "another run (--lr: 0.003 -> 0.0002)" in result.output and 'Resuming from' not in result.output, \
        result.output


def test_a_removed_preset_names_its_successor_which_resumes_its_runs(datasets, tmp_path, monkeypatch):
    """edm-cifar10-uncond-edm was removed on 2026-12-03 (the same settings as edm-cifar10-uncond-vp): a job script
    naming it is refused naming the successor, and the successor's name resumes the run exactly (a preset's name is
    compared by what it sets)."""
    from training import presets
    old, new = 'edm-cifar10-uncond-edm', 'edm-cifar10-uncond-vp'
    args = ['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--batch', 64, '--tick', 1, '--snap', 1,
            '--dump', 1, '--seed', 5, *TINY_NET]
    with monkeypatch.context() as patch:  # as the earlier version had it
        patch.setitem(presets.TRAIN_PRESETS, old, presets.TRAIN_PRESETS[new])
        patch.delitem(presets.REMOVED_PRESETS, old)
        assert _invoke(['--preset', old, *args, '--duration', 0.001]).exit_code == 0
    state = tmp_path / 'runs' / '00000-tiny-uncond-ddpmpp-edm-gpus1-batch64-fp32' / 'training-state-000001.pt'
    refused = _invoke(['--preset', old, *args, '--duration', 0.002, '--resume', 'auto', '-n'])
    assert refused.exit_code == 2, refused.output
    assert (f"preset '{old}' was removed on 2026-12-03: its settings are '{new}'") in ' '.join(refused.output.split())
    result = _invoke(['--preset', new, *args, '--duration', 0.002, '--resume', 'auto', '-n'])
    assert result.exit_code == 0, result.output
    assert f'Resuming from:           {state}' in result.output
    assert f"changed --preset: '{old}' -> '{new}' (the continuation stays exact)" in result.output, result.output


def test_resume_auto_with_another_preset_passes_over_a_run_of_a_preset_that_set_more(datasets, tmp_path):
    """--preset=edm-cifar10-uncond-ve --resume=auto in an --outdir shared with an aot-cifar10-uncond run: the EDM
    preset sets only what both set alike, so the AOT run's --aot (and the preset's batch) were carried over as not
    given and the AOT run was resumed as 'the continuation stays exact' (5e1ff90 made a preset's name exact). A preset
    name is exact only where both presets set the same; the run is passed over, as before."""
    args = ['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--batch', 64, '--tick', 1, '--snap', 1,
            '--dump', 1, '--seed', 5, *TINY_NET]
    assert _invoke(['--preset', 'aot-cifar10-uncond', *args, '--aot', 64, '--duration', 0.001]).exit_code == 0
    result = _invoke(['--preset', 'edm-cifar10-uncond-ve', *args, '--duration', 0.002, '--resume', 'auto', '-n'])
    assert result.exit_code == 0, result.output
    assert 'Resuming from:' not in result.output and 'AOTLoss' not in result.output, result.output
    assert "another run (--preset: 'aot-cifar10-uncond' -> 'edm-cifar10-uncond-ve')" in result.output


def test_resume_passes_over_files_named_like_states_without_a_kimg(tmp_path):
    """The glob training-state-*.pt also matches a copy kept under another name (training-state-best.pt): it has no
    kimg, so no network snapshot of that kimg beside it; looking for one formatted None with :06d, a TypeError."""
    from training import resume, training_loop
    run = tmp_path / 'run'
    run.mkdir()
    torch.save({'note': 'a copy'}, run / 'training-state-best.pt')
    with pytest.raises(click.BadParameter, match='holds no training-state'):
        resume.find_resume_state(str(run), None)
    assert resume.find_resume_state('auto', str(tmp_path)) is None
    torch.save(dict(format=training_loop.STATE_FORMAT, version=training_loop.STATE_VERSION),
               run / 'training-state-000002.pt')
    assert resume.find_resume_state('auto', str(tmp_path)) == str(run / 'training-state-000002.pt')


def test_resume_finds_the_states_under_an_outdir_named_with_glob_characters(tmp_path):
    """A sweep's --outdir=runs[lr=2e-4] is a folder, not a glob pattern: its [...] matched one character, so
    --resume=auto found no state and started a new run without a word, and --resume=RUN_DIR said it held none."""
    from training import resume, training_loop
    outdir = tmp_path / 'sweep [lr=2e-4]'
    (outdir / '00000-run').mkdir(parents=True)
    state = outdir / '00000-run' / 'training-state-000002.pt'
    torch.save(dict(format=training_loop.STATE_FORMAT, version=training_loop.STATE_VERSION), state)
    assert resume.find_resume_state('auto', str(outdir)) == str(state)
    assert resume.find_resume_state(str(outdir / '00000-run'), None) == str(state)


def test_paths_with_a_tilde_are_expanded(datasets, tmp_path, monkeypatch):
    # `--outdir=~/runs`: the shell expands no ~ after "=", so train.py made a literal ./~ folder.
    monkeypatch.setenv('HOME', str(tmp_path))
    with open(datasets['uncond'], 'rb') as src, open(tmp_path / 'tiny.zip', 'wb') as dst:
        dst.write(src.read())
    result = _invoke(['--outdir=~/runs', '--data=~/tiny.zip', '--batch', 64, *TINY_NET, '-n'])
    assert result.exit_code == 0, result.output
    assert f'Output directory:        {tmp_path / "runs" / "00000-tiny-uncond-ddpmpp-edm-gpus1-batch64-fp32"}' in \
        result.output
    assert f'Dataset path:            {tmp_path / "tiny.zip"}' in result.output


def test_write_failures_and_signal_stops_end_without_a_traceback(datasets, tmp_path, monkeypatch):
    from torch_utils import distributed as dist
    from training import training_loop
    args = ['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--batch', 64, *TINY_NET]

    def disk_full(**kwargs):
        raise dnnlib.util.OutputPathError(f"cannot write {kwargs['run_dir']}/training-state-000001.pt (File too "
                                          f"large)")
    monkeypatch.setattr(training_loop, 'training_loop', disk_full)
    result = _invoke(args)
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert result.output.strip().splitlines()[-1].startswith('Error: cannot write ')

    def stopped(**kwargs):  # what a SIGTERM leaves: a stop agreed by every rank, the state written
        monkeypatch.setattr(dist, '_stop_agreed', True)
    monkeypatch.setattr(training_loop, 'training_loop', stopped)
    result = _invoke(args)
    assert result.exit_code == 143 and 'Traceback' not in result.output
    log = open(tmp_path / 'runs' / '00001-tiny-uncond-ddpmpp-edm-gpus1-batch64-fp32' / 'log.txt').read()
    assert 'Stopped by a signal at' in log and 'Traceback' not in log


def test_a_resume_in_place_sets_aside_the_files_of_later_kimg(datasets, tmp_path):
    # --nosubdir, resumed in its own folder from an earlier state (here with another --lr): the snapshots, phema
    # EMAs and states past that state are the abandoned continuation's, and phema.py mixed them in.
    run = tmp_path / 'run'
    _tiny_run(run, datasets['uncond'], '--nosubdir', '--phema', '0.05,0.1', duration=0.003)
    # What fid.py and phema.py write under the names of a kimg: results beside a snapshot, a reconstruction and its
    # result (fid.py --network=RUN_DIR kept the abandoned snapshot's FID as the new one's of the same name).
    for name in ('network-snapshot-000001-fid10_full.json', 'network-snapshot-000002-fid10_full.json',
                 'network-phema-000003-0.070.pkl', 'network-phema-000003-0.070-fid10_full-is10.json'):
        (run / name).write_text(name)
    later = sorted(name for name in os.listdir(run) if re.search(r'-00000[23][-.]', name))
    assert len(later) == 11  # snapshot, state and two phema EMAs at kimg 2 and 3; the three above
    abandoned = {name: open(run / name, 'rb').read() for name in later}
    result = _invoke(['--resume', run / 'training-state-000001.pt', '--nosubdir', '--lr', 0.002, '--duration',
                      0.002])
    assert result.exit_code == 0, result.output
    aside = run / 'superseded-after-kimg-1-1'
    assert 'moved 11 file(s) of later kimg than the state' in result.output and f'to {aside}' in result.output
    assert (run / 'network-snapshot-000001-fid10_full.json').exists()
    assert {name: open(aside / name, 'rb').read() for name in os.listdir(aside)} == abandoned
    assert not (run / 'network-snapshot-000003.pkl').exists() and not (run / 'phema-000003-0.050.pkl').exists()
    assert open(run / 'network-snapshot-000002.pkl', 'rb').read() != abandoned['network-snapshot-000002.pkl']


def test_a_damaged_image_and_another_ranks_failure_are_one_line_in_log_txt(datasets, tmp_path, monkeypatch):
    from training import training_loop
    args = ['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--batch', 64, *TINY_NET]

    def damaged(**kwargs):  # as a loader worker re-raises it in the main process
        raise train.DatasetError('Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most '
                                 'recent call last):\n  File "x.py", line 1\ntraining.dataset.DatasetError: '
                                 'tiny.zip:00000/img00000037.png: cannot decode image (OSError: broken data stream)')
    monkeypatch.setattr(training_loop, 'training_loop', damaged)
    result = _invoke(args)
    assert result.exit_code == 1 and 'Traceback' not in result.output
    assert result.output.strip().splitlines()[-1] == ('Error: tiny.zip:00000/img00000037.png: cannot decode image '
                                                      '(OSError: broken data stream)')

    def peer_gone(**kwargs):  # rank 0 in a collective when rank 1 has died of its own error
        raise RuntimeError('[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer '
                           '[127.0.0.1]:29500')
    monkeypatch.setattr(training_loop, 'training_loop', peer_gone)
    with pytest.raises(RuntimeError, match='Connection closed by peer'):
        _invoke(args)
    log = open(tmp_path / 'runs' / '00001-tiny-uncond-ddpmpp-edm-gpus1-batch64-fp32' / 'log.txt').read()
    assert log.rstrip().splitlines()[-1].startswith('Error: another rank ended ([../third_party/gloo/')
    assert 'Traceback' not in log


RANK1_DAMAGED_IMAGE = """
import sys
sys.path.insert(0, {root!r})
import train
from torch_utils import distributed as dist
from training import training_loop
from training.dataset import DatasetError

run_loop = training_loop.training_loop


def loop(**kwargs):  # rank 1's loader meets a damaged image, as a worker re-raises it; rank 0 trains on
    if dist.get_rank() == 1:
        raise DatasetError('Caught DatasetError in DataLoader worker process 0.\\nOriginal Traceback (most recent '
                           'call last):\\ntraining.dataset.DatasetError: tiny.zip:00000/img00000037.png: cannot '
                           'decode image (OSError: broken data stream)')
    return run_loop(**kwargs)


training_loop.training_loop = loop
train.main()
"""


@pytest.mark.distributed
def test_an_error_met_by_another_rank_alone_is_in_log_txt(datasets, tmp_path):
    # Rank 0 writes log.txt and saw only "another rank ended": the log of the failed run did not name the cause.
    import subprocess

    from launch import torchrun
    from train_worker import ROOT
    script = tmp_path / 'rank1.py'
    script.write_text(RANK1_DAMAGED_IMAGE.format(root=ROOT))
    proc = subprocess.run(torchrun(2, script, '--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--batch',
                                   64, '--duration', 0.001, *TINY_NET), cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert proc.returncode != 0
    log = next((tmp_path / 'runs').glob('*/log.txt')).read_text()
    assert ('Error on rank 1: tiny.zip:00000/img00000037.png: cannot decode image (OSError: broken data stream)\n'
            in log), log[-3000:] + proc.stderr[-3000:]
    assert 'Error on rank 0' not in log


def test_a_resume_that_changes_the_method_drops_its_options_or_is_refused(datasets, tmp_path, monkeypatch):
    """Options of a method the resume replaces are not carried over, and a --loss that picks another
    preconditioning is a network change."""
    _tiny_run(tmp_path / 'edm', datasets['uncond'], '--nosubdir', '--loss-opt', 'P_mean=-1.0')
    edm_state = tmp_path / 'edm' / 'training-state-000001.pt'
    # SPD's loss picks eps preconditioning: the backbone's weights fit, and the run went on reading the EDM
    # denoiser as an epsilon predictor (only "not exact"). Refused before any folder exists.
    result = _invoke(['--outdir', tmp_path / 'out', '--resume', edm_state, '--loss', 'spd', '--duration', 0.002])
    assert result.exit_code == 2 and not (tmp_path / 'out').exists(), result.output
    assert (f'Invalid value for --loss: {edm_state} holds a network of class EDMPrecond; these options train one of '
            f'class EpsPrecond (the preconditioning --loss picks): the network would not match') in result.output
    # Another loss over the same preconditioning: the run's --loss-opt items were EDM's (P_mean), and VP's loss was
    # refused with "loss 'vp' has no option 'P_mean'".
    result = _invoke(['--resume', edm_state, '--loss', 'vp', '--precond', 'edm', '--duration', 0.002, '-n'])
    assert result.exit_code == 0, result.output
    options = _printed_options(result.output)
    assert options['loss_kwargs']['class_name'] == 'losses.denoising.VPLoss' and 'P_mean' not in options['loss_kwargs']
    assert "changed --loss: 'edm' -> 'vp'" in result.output
    # A wrapper turned off takes its options with it (--stf-refs was refused as given without --stf=1).
    _tiny_run(tmp_path / 'stf', datasets['uncond'], '--nosubdir', '--stf', 1, '--stf-refs', 64)
    result = _invoke(['--resume', tmp_path / 'stf' / 'training-state-000001.pt', '--stf', 0, '--duration', 0.002,
                      '-n'])
    assert result.exit_code == 0 and 'changed --stf: True -> False' in result.output, result.output
    assert 'stf' not in json.dumps(_printed_options(result.output)['loss_kwargs']).lower()


def test_a_state_the_loop_cannot_continue_leaves_no_empty_run_folder(datasets, tmp_path, monkeypatch):
    # Found only when the loop loads the state (another GDD freeze level: its optimizer's parameters), after the new
    # numbered folder was made: it stood beside the real runs holding log.txt and training_options.json.
    from training import training_loop
    _tiny_run(tmp_path / 'runs', datasets['uncond'])
    _tiny_run(tmp_path / 'flat', datasets['uncond'], '--nosubdir')
    state = next((tmp_path / 'runs').glob('*/training-state-000001.pt'))

    def mismatch(**kwargs):
        raise training_loop.ResumeMismatchError(f"{state}: the optimizer of phase 'G' trains other parameters")
    monkeypatch.setattr(training_loop, 'training_loop', mismatch)
    result = _invoke(['--outdir', tmp_path / 'runs', '--resume', state, '--duration', 0.002])
    assert result.exit_code == 1 and "Error: " + f"{state}: the optimizer of phase 'G'" in result.output
    assert [path.name for path in (tmp_path / 'runs').iterdir()] == [state.parent.name]
    # In the run's own folder (--nosubdir) nothing is removed.
    before = sorted(os.listdir(tmp_path / 'flat'))
    result = _invoke(['--resume', tmp_path / 'flat' / 'training-state-000001.pt', '--nosubdir', '--duration', 0.002])
    assert result.exit_code == 1 and sorted(os.listdir(tmp_path / 'flat')) == before


def test_init_rewrapped_in_another_preconditioning_is_warned(datasets, tmp_path):
    # An EDM denoiser's backbone under VP's wrapper (or an SPD epsilon predictor's under GDD's) computes another
    # function: the run starts from its weights, not from the pretrained model; it trained without a word.
    _tiny_run(tmp_path / 'edm', datasets['uncond'], '--nosubdir')
    snapshot = tmp_path / 'edm' / 'network-snapshot-000001.pkl'
    base = ['--outdir', tmp_path / 'out', '--data', datasets['uncond'], '--init', snapshot, '-n', '--workers', '0',
            '--device', 'cpu']
    with pytest.warns(UserWarning, match=r'--init: .*network-snapshot-000001\.pkl holds a --precond=edm network '
                                         r'\(EDMPrecond\); --precond=vp rewraps its backbone, whose weights then '
                                         r'compute another function'):
        result = _invoke([*base, '--precond', 'vp'])
    assert result.exit_code == 0, result.output
    for same in (['--precond', 'edm'],  # its own wrapper
                 ['--precond', 'gdd', '--loss', 'gdd', '--loss-opt', 'discriminator=sn_cnn', '--dropout', '0',
                  '--augment', '0']):  # GDD's wrapper takes EDM's weights as they are (5e-5 relative at sigma 80)
        with warnings.catch_warnings():
            warnings.filterwarnings('error', message='--init: ')
            result = _invoke([*base, *same])
        assert result.exit_code == 0, result.output


def test_attention_at_a_resolution_the_network_lacks_is_warned(datasets, tmp_path):
    """--attn=5 on 8x8 data with --cres=1,2 (levels 8 and 4): EDM builds the network without attention, silently."""
    args = ['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '-n', '--cbase', '8', '--cres', '1,2',
            '--blocks', '1', '--device', 'cpu']
    with pytest.warns(UserWarning, match=r'--attn=5: the network has no 5x5 level \(its levels: 8, 4\), so no '
                                         r'attention there'):
        assert _invoke([*args, '--attn', '5']).exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        assert _invoke([*args, '--attn', '4']).exit_code == 0


def test_transfer_from_a_network_of_another_shape_is_refused(datasets, tmp_path):
    """--transfer copies weights by name: an RGB network's [C, 3, 3, 3] input kernels failed to copy into a
    greyscale one at the start of training (a greyscale network's were broadcast into an RGB one without a word),
    and another resolution names the blocks otherwise (only the noise mapping was copied)."""
    from training.preconditioning import EDMPrecond

    def pickle_of(name, **interface):
        kwargs = {**dict(img_resolution=8, img_channels=1, label_dim=0), **interface}
        net = EDMPrecond(**kwargs, model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1,
                         attn_resolutions=[4])
        path = str(tmp_path / name)
        persistence.save_network_pickle(path, dict(ema=net))
        return path

    args = ['--outdir', tmp_path / 'runs', '-n', *TINY_NET]
    for name, interface, data, refusal in (
            ('rgb.pkl', dict(img_channels=3), 'uncond', 'has img_channels=3, but the dataset .* needs 1'),
            ('res16.pkl', dict(img_resolution=16), 'uncond', 'has img_resolution=16, but the dataset .* needs 8'),
            ('classes5.pkl', dict(label_dim=5), 'cond', 'has label_dim=5, but the dataset .* needs 3')):
        result = _invoke([*args, '--data', datasets[data], '--cond', int(data == 'cond'),
                          '--transfer', pickle_of(name, **interface)])
        assert result.exit_code == 2 and re.search(f'Invalid value for --transfer: .*{name} {refusal}: its weights do '
                                                   f'not fit this network', result.output), result.output
    # A class embedding added or left out is one tensor more or less: the others copy.
    assert _invoke([*args, '--data', datasets['cond'], '--cond', 1, '--transfer', pickle_of('u.pkl')]).exit_code == 0
    assert _invoke([*args, '--data', datasets['uncond'], '--transfer', pickle_of('c.pkl', label_dim=5)]).exit_code == 0


def test_a_resolution_the_levels_cannot_halve_is_refused_before_the_run(tmp_path):
    """28x28 (MNIST's own size) under ADM's four levels: 28 -> 14 -> 7 -> 3 comes back up as 6, and the decoder's
    skip connection failed with a traceback at the first step, after the run folder existed (EDM fails there too)."""
    data = write_zip_dataset(str(tmp_path / 'mnist28.zip'), random_images(4, resolution=28))
    args = ['--outdir', tmp_path / 'runs', '--data', data, '--cbase', '8', '--blocks', '1', '--device', 'cpu']
    for given, levels in ((['--arch', 'adm'], '--cres=1,2,3,4 \\(--arch=adm\\) has 4 levels'),
                          (['--cres', '1,2,2,2'], '--cres=1,2,2,2 has 4 levels')):
        result = _invoke([*args, *given])
        assert result.exit_code == 2
        assert re.search(f'Invalid value for --cres: {levels}, which halve the image 3 times, but --data holds '
                         f'28x28 images, whose side is not divisible by 8: give --cres at most 3 entries',
                         result.output)
    assert not (tmp_path / 'runs').exists()
    assert _invoke([*args, '--arch', 'adm', '--cres', '1,2,2', '--attn', '14', '--cbase', '64', '-n']).exit_code == 0


def test_data_with_alpha_is_warned(tmp_path):
    """A folder of RGBA PNGs (common for images saved from the web) trains as 4 channels, which fid.py refuses."""
    rgba = np.concatenate([np.repeat(random_images(2)[..., None], 3, axis=3), np.full((2, 8, 8, 1), 255, np.uint8)], 3)
    data = write_zip_dataset(str(tmp_path / 'rgba.zip'), rgba)
    with pytest.warns(UserWarning, match=r'--data holds RGBA images \(4 channels\): the network learns the alpha '
                                         r'channel as one more colour, and fid.py cannot evaluate its images'):
        assert _invoke(['--outdir', tmp_path / 'runs', '--data', data, '-n', *TINY_NET]).exit_code == 0


def test_default_attention_the_data_never_reaches_is_warned(tmp_path):
    """DDPM++'s attention at 16x16 and ADM's at 32, 16, 8 are absent from a 48x48 network (levels 48, 24, 12[, 6]),
    and ADM has none at all below 64 channels (a head is 64 channels): EDM builds both without a word."""
    data = write_zip_dataset(str(tmp_path / 'rgb48.zip'), np.repeat(random_images(2, 48)[..., None], 3, axis=3))
    args = ['--outdir', tmp_path / 'runs', '--data', data, '-n', '--blocks', '1', '--device', 'cpu']
    with pytest.warns(UserWarning, match=r'--arch=ddpmpp puts self-attention at 16 pixels, but at 48x48 its levels '
                                         r'are 48, 24, 12: the network has no attention there'):
        assert _invoke(args).exit_code == 0
    with pytest.warns(UserWarning, match=r'--arch=adm puts self-attention at 32, 16, 8 pixels, but at 48x48 its '
                                         r'levels are 48, 24, 12, 6'):
        assert _invoke([*args, '--arch', 'adm']).exit_code == 0
    with pytest.warns(UserWarning, match=r'--cbase=16: ADM splits attention into heads of 64 channels; its 24x24, '
                                         r'12x12 levels \(32, 48 channels\) get none, so no attention there; '
                                         r'--cbase=32 or more'):
        assert _invoke([*args, '--arch', 'adm', '--cbase', '16', '--attn', '24,12']).exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        assert _invoke([*args, '--arch', 'adm', '--cbase', '32', '--attn', '24,12']).exit_code == 0
        assert _invoke([*args, '--attn', '24']).exit_code == 0


def test_a_resume_without_outdir_continues_beside_the_state(datasets, tmp_path):
    """The state's recorded --outdir is where it was written: a moved run (or a state from elsewhere) continues beside
    where the state lies, and a downloaded state does not choose the folder the run writes into."""
    import shutil
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--batch', 16, '--duration', 0.001,
                      '--tick', 1, '--snap', 1, '--dump', 1, *TINY_NET])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / 'runs').iterdir()
    shutil.copytree(run, tmp_path / 'moved' / run.name)
    shutil.rmtree(tmp_path / 'runs')
    result = _invoke(['--resume', tmp_path / 'moved' / run.name / 'training-state-000001.pt', '--duration', 0.002,
                      '-n'])
    assert result.exit_code == 0, result.output
    assert (f'--resume: the state records --outdir={tmp_path / "runs"}; it lies in {tmp_path / "moved" / run.name}, '
            f'so the run continues in {tmp_path / "moved"} (give --outdir to choose)') in result.output
    assert f'Output directory:        {tmp_path / "moved" / "00001-"}' in result.output
    assert not (tmp_path / 'runs').exists()


def test_list_options_use_edms_list_syntax_with_its_bounds():
    # --cres/--attn share generate.py's parser of EDM's list syntax (train.py had its own copy, which built any range
    # it was given: --cres=1-9999999999 filled the memory before the check).
    import click

    from training import train_options
    assert train_options.channel_list(None, None, '1, 2,2-3,') == [1, 2, 2, 3]
    assert train_options.resolution_list(None, None, '') == [] and train_options.resolution_list(None, None, ' ,') == []
    assert train_options.resolution_list(None, None, '16,8') == [16, 8]
    for value in ['1-9999999999', '3-1', '1,x', '', '0,1']:
        with pytest.raises(click.BadParameter, match=f"expected a non-empty comma-separated list of positive "
                                                     f"integers, got '{re.escape(value)}'"):
            train_options.channel_list(None, None, value)
    with pytest.raises(click.BadParameter, match="expected a comma-separated list of positive resolutions, got '4-x'"):
        train_options.resolution_list(None, None, '4-x')


def test_option_warnings_shown_once_per_node_under_torchrun(datasets, tmp_path):
    """Every rank builds the same options from the same command line: a warning about them is shown by the node's
    local rank 0 only (8 GPUs printed each 8 times); the other ranks still keep it for the log."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stderr = {}
    for rank in ('0', '1'):
        proc = subprocess.run([sys.executable, os.path.join(root, 'train.py'), '--outdir', str(tmp_path / 'runs'),
                               '--data', str(datasets['uncond']), '--batch', '4', '--duration', '0.001', '-n',
                               *map(str, TINY_NET)], env=dict(os.environ, LOCAL_RANK=rank), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and 'Dry run; exiting.' in proc.stdout, proc.stderr
        stderr[rank] = proc.stderr
    assert 'UserWarning: the learning-rate ramp-up (--lr-rampup=10000 kimg) is longer than the run' in stderr['0']
    assert 'UserWarning' not in stderr['1']


def test_nosubdir_resumed_in_place_still_names_the_run_it_continued(datasets, tmp_path):
    """A job script restarting a --nosubdir run in its own folder rewrites training_options.json, whose
    resume_state_dump then names the folder's own state: train.py keeps the run the folder continued
    (continued_state_dump), so report.py, fid.py and phema.py still find the statistics and snapshots before it."""
    from training.run_chain import run_chain
    _tiny_run(tmp_path / 'a', datasets['uncond'], '--nosubdir')
    state_a = str(tmp_path / 'a' / 'training-state-000001.pt')
    assert _invoke(['--resume', state_a, '--outdir', tmp_path / 'x', '--nosubdir', '--duration', 0.002]).exit_code == 0
    for kimg in (2, 3):  # twice in place: the pointer is carried forward
        result = _invoke(['--resume', tmp_path / 'x' / f'training-state-00000{kimg}.pt', '--outdir', tmp_path / 'x',
                          '--nosubdir', '--duration', (kimg + 1) / 1000])
        assert result.exit_code == 0, result.output
    options = json.loads((tmp_path / 'x' / 'training_options.json').read_text())
    assert options['resume_state_dump'] == str(tmp_path / 'x' / 'training-state-000003.pt')
    assert options['continued_state_dump'] == state_a
    assert run_chain(str(tmp_path / 'x')) == [(str(tmp_path / 'a'), 1), (str(tmp_path / 'x'), None)]


def test_a_loss_declaring_an_unregistered_precond_is_a_one_line_error(datasets, tmp_path, monkeypatch):
    """A loss added with `preconditionings = ('mine',)` but no PRECOND_CLASSES line: a usage error naming the registry
    (a KeyError traceback before, found by the extensibility trial), before a run folder exists."""
    from losses.denoising import VELoss
    monkeypatch.setattr(VELoss, 'preconditionings', ('mine',), raising=False)
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', datasets['uncond'], '--loss', 've', '--dry-run',
                      *TINY_NET])
    assert result.exit_code == 2, result.output
    assert "--loss=ve trains --precond=mine, which training/presets.py PRECOND_CLASSES does not register" in \
        result.output
    assert not (tmp_path / 'runs').exists()


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (Linux), a file whose writes fail ENOSPC')
def test_a_log_or_stats_file_that_cannot_be_written_ends_the_run_in_one_line_naming_it(datasets, tmp_path):
    """A full disk met by log.txt (a --nosubdir folder's log.txt linked to /dev/full, whose writes fail with ENOSPC):
    one error line naming the file. Before, the failing print raised, its traceback failed to print through the same
    log (exit code 120, 'lost sys.stderr', three tracebacks, none naming the file). The same for a stats.jsonl line."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outdir = tmp_path / 'run'
    outdir.mkdir()
    os.symlink('/dev/full', outdir / 'log.txt')
    proc = subprocess.run([sys.executable, os.path.join(root, 'train.py'), '--outdir', str(outdir), '--nosubdir',
                           '--data', str(datasets['uncond']), '--batch', '8', '--duration', '0.001', '--lr-rampup', '0',
                           *map(str, TINY_NET)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and 'Traceback' not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert [line for line in proc.stderr.splitlines() if 'Error' in line] == \
        [f'Error: cannot write {outdir}/log.txt (No space left on device)'], proc.stderr

    stats = open('/dev/full', 'a')
    with pytest.raises(dnnlib.util.OutputPathError, match=r'^cannot write /dev/full \(No space left on device\)$'):
        training_stats.write_jsonl_line(stats, training_stats.Collector(regex='Loss'))
    with contextlib.suppress(OSError):  # the line is still in its buffer
        stats.close()


def test_a_dataset_named_near_the_length_limit_gets_a_run_folder_with_its_name_cut(datasets, tmp_path):
    """A legal 225-byte dataset file name ('é' is 2 bytes): the run folder's name, its number, the dataset's name and
    ~50 bytes of settings, went past 255 bytes and mkdir failed with 'File name too long' in a traceback. The
    dataset's part is cut (at a character boundary); a --desc too long to fit is refused naming it."""
    import shutil
    data = tmp_path / ('é' * 110 + '.zip')
    shutil.copy(datasets['uncond'], data)
    _tiny_run(tmp_path / 'runs', data)
    (run_dir,) = os.listdir(tmp_path / 'runs')
    assert len(os.fsencode(run_dir)) <= 255 and run_dir.startswith('00000-éé')
    assert run_dir.endswith('é-uncond-ddpmpp-edm-gpus1-batch64-fp32')
    assert os.path.isfile(tmp_path / 'runs' / run_dir / 'network-snapshot-000001.pkl')
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', data, '--desc', 'x' * 220, '--dry-run', *TINY_NET])
    assert result.exit_code == 2 and "Invalid value for --desc: the run folder's name would be 485 bytes long; file " \
        "systems take at most 255: give a shorter one" in " ".join(result.output.split()), result.output
    assert os.listdir(tmp_path / 'runs') == [run_dir]
    # --nosubdir makes no run folder: the --desc is only a description there.
    result = _invoke(['--outdir', tmp_path / 'flat', '--nosubdir', '--data', data, '--desc', 'x' * 220, '--dry-run',
                      *TINY_NET])
    assert result.exit_code == 0, result.output


def test_init_given_to_resume_a_run_made_without_one_is_an_error_line_not_a_traceback(datasets, tmp_path):
    """The run recorded no --init (None): comparing the given --init with it as the same file through a link
    (e99b3de) raised TypeError from os.path.expanduser(None), a traceback where the options' own error was due."""
    _tiny_run(tmp_path / 'runs', datasets['uncond'])
    (run_dir,) = (tmp_path / 'runs').iterdir()
    state, snapshot = run_dir / 'training-state-000001.pt', run_dir / 'network-snapshot-000001.pkl'
    assert not dnnlib.util.same_file(str(snapshot), None)
    for resume in (['--resume', state], ['--outdir', tmp_path / 'runs', '--resume', 'auto']):
        result = _invoke([*resume, '--init', snapshot, '--duration', 0.002, '-n'])
        assert result.exit_code == 2 and 'Error: ' in result.output, result.output
