"""Paper presets (issue 17): each published configuration equals the values in ../shared/docs (the project's research
notes on the papers and their READMEs), a preset plus an explicit option applies the option, and --preset=list
shows every preset with its source."""

import json
import math
import os
import re

import pytest
from click.testing import CliRunner
from train_worker import random_images, write_zip_dataset

import train
from training import training_loop as tl
from training.presets import (
    PRESET_SOURCES,
    SAMPLER_PRESET_SOURCES,
    SAMPLER_PRESETS,
    TRAIN_PRESETS,
    preset_command,
)

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'shared', 'docs')


def _doc_line(name: str, needle: str) -> str:
    path = os.path.join(DOCS, name)
    if not os.path.isfile(path):
        pytest.skip(f'{path} is not beside this checkout')
    lines = [line for line in open(path) if needle in line]
    assert lines, f'{needle!r} not in {path}'
    return lines[0]


def _flags(text: str) -> dict:
    """--key=value (or --key value) pairs of a doc line; the first of a repeated flag."""
    flags = {}
    for key, value in re.findall(r'--([a-z][\w-]*)[= ]([^\s`]+)', text):
        flags.setdefault(key.replace('-', '_'), value)
    return flags


def _same(preset_value, doc_value: str) -> bool:
    if isinstance(preset_value, bool):
        return str(int(preset_value)) == doc_value or str(preset_value).lower() == doc_value.lower()
    if isinstance(preset_value, list):
        return ','.join(map(str, preset_value)) == doc_value
    if isinstance(preset_value, (int, float)):
        return float(preset_value) == float(doc_value)
    return str(preset_value) == doc_value


def test_edm_presets_equal_edm_md_table():
    ffhq = _flags(_doc_line('edm.md', '| FFHQ / AFHQv2 64'))
    for name in ('edm-ffhq-vp', 'edm-ffhq-ve', 'edm-afhqv2-vp', 'edm-afhqv2-ve'):
        for key in ('batch', 'cres', 'lr', 'augment'):
            assert _same(TRAIN_PRESETS[name][key], ffhq[key]), (name, key)
    assert _same(TRAIN_PRESETS['edm-ffhq-vp']['dropout'], ffhq['dropout'])  # 0.05 (FFHQ) / 0.25 (AFHQv2)
    assert '/ `0.25` (AFHQv2)' in _doc_line('edm.md', '| FFHQ / AFHQv2 64') and TRAIN_PRESETS['edm-afhqv2-vp'][
        'dropout'] == 0.25
    imagenet = _flags(_doc_line('edm.md', '| ImageNet-64 |'))
    preset = TRAIN_PRESETS['edm-imagenet64-adm']
    assert set(imagenet) <= set(preset)
    for key, value in imagenet.items():
        assert _same(preset[key], value), key
    assert 'defaults' in _doc_line('edm.md', '| CIFAR-10 {cond, uncond}')  # CIFAR: EDM's defaults, nothing else
    for name in ('edm-cifar10-cond-vp', 'edm-cifar10-uncond-ve'):
        assert set(TRAIN_PRESETS[name]) == {'data', 'cond', 'arch', 'precond'}
    # The pickles' vp/ve are architectures: every EDM preset trains EDM's preconditioning and loss (README, Table 2 F)
    assert all(TRAIN_PRESETS[name]['precond'] == 'edm' for name in TRAIN_PRESETS if name.startswith('edm-'))
    assert {TRAIN_PRESETS[name]['arch'] for name in TRAIN_PRESETS if name.startswith('edm-') and name.endswith('-ve')} \
        == {'ncsnpp'}


def test_stf_and_aot_presets_equal_losses_md():
    stf = _flags(_doc_line('losses.md', 'README configs: `--cond=0 --arch=ncsnpp --stf=1 --rbatch 1024`'))
    for name in ('stf-cifar10-uncond-ncsnpp', 'stf-cifar10-uncond-ddpmpp'):
        assert TRAIN_PRESETS[name]['stf_refs'] == int(stf['rbatch']) and TRAIN_PRESETS[name]['cond'] is False
    assert TRAIN_PRESETS['stf-cifar10-uncond-ncsnpp']['arch'] == stf['arch']
    aot = _doc_line('losses.md', 'the current one uses `--batch 256 --aot 512` (uncond) or `--aot 2048` (cond)')
    assert TRAIN_PRESETS['aot-cifar10-uncond']['aot'] == 512 and TRAIN_PRESETS['aot-cifar10-cond']['aot'] == 2048
    assert all(TRAIN_PRESETS[n]['batch'] == 256 and TRAIN_PRESETS[n]['arch'] == 'ncsnpp'
               for n in ('aot-cifar10-uncond', 'aot-cifar10-cond')) and '`--arch ncsnpp`' in _doc_line(
        'losses.md', '`--arch ncsnpp` on 4 GPUs')
    assert '--batch 256' in aot
    sampling = _doc_line('losses.md', 'Published settings (table §2.8): uncond `--rho 90 --steps 14`')
    assert '`--rho 72 --steps 15`' in sampling
    assert SAMPLER_PRESETS['aot-uncond'] == dict(steps=14, rho=90)
    assert SAMPLER_PRESETS['aot-cond'] == dict(steps=15, rho=72)


def test_edm_sampler_presets_equal_edm_md():
    line = _doc_line('edm.md', 'Recommended: CIFAR 18 steps')
    assert SAMPLER_PRESETS['edm-cifar10'] == dict(steps=18) and 'FFHQ/AFHQ 40 steps' in line
    assert SAMPLER_PRESETS['edm-ffhq'] == SAMPLER_PRESETS['edm-afhqv2'] == dict(steps=40)
    text = line + _doc_line('edm.md', 'ImageNet 256 steps with S_churn 40')
    assert 'ImageNet 256 steps with S_churn 40, S_min 0.05, S_max 50, S_noise 1.003' in text.replace('\n', ' ')
    assert SAMPLER_PRESETS['edm-imagenet64'] == dict(steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)


def _dry_run_options(tmp_path, *args) -> tuple[dict, str]:
    """train.py --dry-run on a tiny dataset with `args`: (the printed training options, the whole output)."""
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(16))
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'runs'), '--data', data, '--device', 'cpu',
                                             '-n', *args])
    assert result.exit_code == 0, result.output
    start = result.output.index('Training options:') + len('Training options:')
    return json.loads(result.output[start:result.output.index('\n\n', start + 2)]), result.output


def test_spd_presets_equal_losses_md(tmp_path):
    """SPD's CIFAR-10 run and its DDPM control (losses.md §4.3: the UNet, AdamW lr 1e-4 without decay or anneal, EMA
    0.9999 per step, fp32, random flips, dropout 0.3, README batch 1024), through train.py --dry-run."""
    model = _doc_line('losses.md', 'Model: guided-diffusion UNet, 128 channels')
    optim = _doc_line('losses.md', 'AdamW lr 1e-4, wd 0, no anneal, EMA 0.9999')
    assert 'dropout 0.3' in model and 'README batch 1024' in optim and 'fp32, random h-flip' in optim
    for name, loss in (('spd-cifar10', 'spd'), ('ddpm-cifar10', 'ddpm')):
        preset = TRAIN_PRESETS[name]
        assert preset['loss'] == loss and preset['arch'] == 'adm-cifar' and preset['batch'] == 1024
        assert preset['lr'] == 1e-4 and preset['lr_rampup'] == 0 and preset['dropout'] == 0.3
        assert preset['xflip'] is True and preset['precision'] == 'fp32' and preset['augment'] == 0
        # EMA 0.9999 per optimizer step as EDM's half-life in Mimg: 0.5 = 0.9999 ** (half-life / batch)
        assert preset['ema'] == pytest.approx(1024 * math.log(0.5) / math.log(0.9999) / 1e6, abs=5e-5)
        assert preset['ema_rampup'] == 0  # the reference's 0.9999 from the first step, not EDM's ramp
    options, _ = _dry_run_options(tmp_path, '--preset', 'spd-cifar10', '--batch', '8')
    assert options['optimizer_kwargs']['lr'] == 1e-4 and options['network_kwargs']['dropout'] == 0.3
    # EDM's train.py truncates the half-life to whole kimg (int(ema * 1000)): 7097 of the exact 7097.47
    assert options['ema_halflife_kimg'] == 7097 and options['lr_rampup_kimg'] == 0
    assert options['ema_rampup_ratio'] is None
    beta = tl.ema_beta(1024, 1024, options['ema_halflife_kimg'], options['ema_rampup_ratio'])  # the first step
    assert beta == pytest.approx(0.9999, abs=1e-8)  # 7097 kimg instead of 7097.47: 6.7e-9 off
    assert options['loss_kwargs']['class_name'].endswith('SPDLoss') and options['batch_size'] == 8


def test_every_preset_has_a_source_and_a_command():
    assert set(PRESET_SOURCES) == set(TRAIN_PRESETS) and set(SAMPLER_PRESET_SOURCES) == set(SAMPLER_PRESETS)
    command = preset_command('edm-ffhq-vp')
    assert command.startswith('torchrun --standalone --nproc_per_node=8 train.py') and '--cres=1,2,2,2' in command
    assert '--nproc_per_node=32' in preset_command('edm-imagenet64-adm')
    result = CliRunner().invoke(train.main, ['--preset', 'list'])
    assert result.exit_code == 0
    for name in TRAIN_PRESETS:
        assert f'{name}  ({PRESET_SOURCES[name]})' in result.output


def test_preset_plus_override(tmp_path):
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(16))
    result = CliRunner().invoke(train.main, ['--preset', 'edm-ffhq-vp', '--outdir', str(tmp_path / 'runs'), '--data',
                                             data, '--lr', '3e-4', '--device', 'cpu', '-n'])
    assert result.exit_code == 0, result.output
    start = result.output.index('Training options:') + len('Training options:')
    options = json.loads(result.output[start:result.output.index('\n\n', start + 2)])
    assert options['optimizer_kwargs']['lr'] == 3e-4  # the explicit option wins
    assert options['network_kwargs']['channel_mult'] == [1, 2, 2, 2] and options['batch_size'] == 256
    assert options['network_kwargs']['dropout'] == 0.05 and options['augment_kwargs']['p'] == 0.15
    # EDM's FFHQ pickles (edm-ffhq-64x64-uncond-vp.pkl) are DDPM++ with EDM's preconditioning (README: no --precond)
    assert options['network_kwargs']['class_name'] == 'training.preconditioning.EDMPrecond'
    assert options['dataset_kwargs']['path'] == data  # --data given explicitly replaces the preset's path
    assert f'  explicit options win: --data={data} (preset: datasets/ffhq-64x64.zip), --lr=0.0003 (preset: 0.0002)' \
        in result.output
    result = CliRunner().invoke(train.main, ['--preset', 'nope', '--outdir', str(tmp_path), '--data', data, '-n'])
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert result.exit_code == 2 and len(errors) == 1 and "unknown preset 'nope': expected one of" in errors[0]
    assert all(name in errors[0] for name in TRAIN_PRESETS)


# ---------------------------------------------------------------------------------------------------------------------
# generate.py / fid.py --preset: each sampler preset's resulting configuration, grid and NFE against numbers written
# here from ../shared/docs (samplers.md §1, §2.2, §3.2; edm.md §4), not from the preset table.

def _tiny_network(path):
    import torch

    from torch_utils import persistence
    from training.preconditioning import EDMPrecond
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=8,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[])
    persistence.save_network_pickle(str(path), dict(ema=net))
    return str(path)


@pytest.fixture(scope='module')
def tiny_pickle(tmp_path_factory):
    return _tiny_network(tmp_path_factory.mktemp('presets') / 'net.pkl')


def _generate(args):
    import generate
    return CliRunner().invoke(generate.main, [str(a) for a in args])


def _edm_rho_grid(n_intervals, rho, sigma_min=0.002, sigma_max=80.0):
    """Karras et al. eq. 5 over n_intervals + 1 levels (samplers.md §1, edm(rho))."""
    return [(sigma_max ** (1 / rho) + i / n_intervals * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(n_intervals + 1)]


def _doc_numbers(text):
    return [float(v) for v in re.findall(r'\d+(?:\.\d+)?', text)]


def _recorded_grid(outdir):
    """The grid generate.py sampled with, rebuilt from the options its generation.json records."""
    import types

    from samplers.generation import SamplerConfig, build_grid
    options = json.load(open(os.path.join(outdir, 'generation.json')))['options']
    net = types.SimpleNamespace(sigma_min=0.0, sigma_max=float('inf'), round_sigma=lambda s: s)
    grid, solver, kwargs = build_grid(net, SamplerConfig(**options))
    return options, grid, solver, kwargs


def test_every_sampler_preset_gives_the_documented_sampler(tiny_pickle, tmp_path):
    nfe_line = _doc_line('samplers.md', 'NFE 2N − 1 with the appended zero (EDM: 18 steps → 35')
    documented_nfe = dict(zip(('edm-cifar10', 'edm-ffhq', 'edm-imagenet64'),
                              [int(v) for v in re.findall(r'→ (\d+)', nfe_line)]))
    assert documented_nfe == {'edm-cifar10': 35, 'edm-ffhq': 79, 'edm-imagenet64': 511}
    documented_nfe['edm-afhqv2'] = documented_nfe['edm-ffhq']  # "FFHQ/AFHQ 40 steps → 79"
    # EDM's own 18-step CIFAR grid as samplers.md prints it (3 decimals), then 0.
    cifar_line = _doc_line('samplers.md', "EDM's own 18-step CIFAR grid")
    cifar_grid = _doc_numbers(cifar_line.split(':', 1)[1]) + _doc_numbers(
        open(os.path.join(DOCS, 'samplers.md')).read().split(cifar_line, 1)[1].splitlines()[0])
    assert len(cifar_grid) == 19 and cifar_grid[0] == 80 and cifar_grid[-1] == 0
    churn = _doc_line('samplers.md', 'Published stochastic settings: ImageNet-64 S_churn')
    churn = dict(zip(('S_churn', 'S_min', 'S_max', 'S_noise'), _doc_numbers(churn.split('ImageNet-64', 1)[1])[:4]))
    assert churn == dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    aot = _doc_line('losses.md', 'Published settings (table §2.8): uncond `--rho 90 --steps 14`')
    assert '`--rho 72 --steps 15`' in aot
    teacher = _doc_line('samplers.md', 'configs/cifar10.yml → UniPC order 3, **bh1**, 20 NFE')
    assert '--steps 20 --skip_type edm' in teacher

    expected = {  # solver, options, steps, end, NFE, the grid's positive levels
        'edm-cifar10': ('heun', {}, 18, 'zero', 35, cifar_grid[:-1]),
        'edm-ffhq': ('heun', {}, 40, 'zero', 79, _edm_rho_grid(39, 7)),
        'edm-afhqv2': ('heun', {}, 40, 'zero', 79, _edm_rho_grid(39, 7)),
        'edm-imagenet64': ('heun', churn, 256, 'zero', 511, _edm_rho_grid(255, 7)),
        'aot-uncond': ('heun', {}, 14, 'zero', 2 * 14 - 1, _edm_rho_grid(13, 90)),
        'aot-cond': ('heun', {}, 15, 'zero', 2 * 15 - 1, _edm_rho_grid(14, 72)),
        # LD3's teacher: UniPC-3 bh1, 20 steps (= 20 NFE) on edm rho 7 ending at sigma_min (N intervals, no zero)
        'ld3-teacher': ('unipc', dict(order=3, variant='bh1'), 20, 'sigma_min', 20, _edm_rho_grid(20, 7)),
    }
    assert set(expected) == set(SAMPLER_PRESETS)
    for name, (solver, options, steps, end, nfe, levels) in expected.items():
        outdir = tmp_path / name
        result = _generate(['--network', tiny_pickle, '--outdir', outdir, '--seeds', '0', '--device', 'cpu',
                            '--preset', name])
        assert result.exit_code == 0, result.output
        assert f'Preset {name} ({SAMPLER_PRESET_SOURCES[name]}): ' in result.output
        assert f'; {nfe} NFE per image' in result.output, (name, result.output)
        recorded, grid, used_solver, used_options = _recorded_grid(outdir)
        assert used_solver == solver and used_options == options and grid.num_steps == steps and grid.end == end
        positive = grid.sigmas[:-1] if end == 'zero' else grid.sigmas
        rounding = dict(rel=1e-4, abs=5e-4) if name == 'edm-cifar10' else dict(rel=1e-12)  # the doc's 3 decimals
        assert positive.tolist() == pytest.approx(levels, **rounding), name
        if end == 'zero':
            assert grid.sigmas[-1] == 0


def test_sampler_preset_explicit_options_win_and_are_reported(tiny_pickle, tmp_path):
    result = _generate(['--network', tiny_pickle, '--outdir', tmp_path / 'a', '--seeds', '0', '--device', 'cpu',
                        '--preset', 'edm-imagenet64', '--steps', '6', '--S_churn', '0'])
    assert result.exit_code == 0, result.output
    assert 'Preset edm-imagenet64: explicit options win: --steps=6 (preset: 256), --S_churn=0.0 (preset: 40)' \
        in result.output
    options, grid, solver, kwargs = _recorded_grid(tmp_path / 'a')
    assert grid.num_steps == 6 and kwargs == dict(S_churn=0.0, S_min=0.05, S_max=50, S_noise=1.003)
    # Another solver drops the preset's solver options (they belong to its solver); a --solver-opt replaces one.
    result = _generate(['--network', tiny_pickle, '--outdir', tmp_path / 'b', '--seeds', '0', '--device', 'cpu',
                        '--preset', 'ld3-teacher', '--solver', 'ipndm'])
    assert result.exit_code == 0, result.output
    assert "--solver=ipndm drops the preset's solver options: --order=3 (an option of unipc)" in result.output
    options, grid, solver, kwargs = _recorded_grid(tmp_path / 'b')
    assert solver == 'ipndm' and kwargs == {} and grid.num_steps == 20 and grid.end == 'sigma_min'
    result = _generate(['--network', tiny_pickle, '--outdir', tmp_path / 'c', '--seeds', '0', '--device', 'cpu',
                        '--preset', 'ld3-teacher', '--solver-opt', 'order=2'])
    assert result.exit_code == 0, result.output
    assert _recorded_grid(tmp_path / 'c')[3] == dict(order=2, variant='bh1')


def test_sampler_preset_list_and_unknown_name(tiny_pickle, tmp_path):
    import generate
    result = CliRunner().invoke(generate.main, ['--preset=list'])  # no --network / --outdir needed
    assert result.exit_code == 0, result.output
    for name in SAMPLER_PRESETS:
        assert f'{name}  ({SAMPLER_PRESET_SOURCES[name]})' in result.output
    assert '--steps=256 --S_churn=40 --S_min=0.05 --S_max=50 --S_noise=1.003' in result.output
    result = _generate(['--network', tiny_pickle, '--outdir', tmp_path, '--device', 'cpu', '--preset', 'edm-cifar'])
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert result.exit_code == 2 and len(errors) == 1 and "unknown preset 'edm-cifar'" in errors[0]
    assert all(name in errors[0] for name in SAMPLER_PRESETS) and not os.listdir(tmp_path)


def test_every_sampler_preset_option_is_a_generate_and_fid_option():
    import click

    import fid
    import generate
    from samplers.cli_options import _preset_param
    for command in (generate.main, fid.main.commands['calc']):
        ctx = click.Context(command)
        for options in SAMPLER_PRESETS.values():
            for key, value in options.items():
                param = _preset_param(ctx, key)
                assert param.process_value(ctx, value) is not None


def test_explicit_options_take_what_they_replace_from_the_preset_and_errors_name_it(tmp_path):
    """--precision replaces a preset's --fp16 (they were refused as given together); another --loss drops the
    preset loss's options and a preconditioning it cannot train; an error about an option the preset set says so."""
    data = write_zip_dataset(str(tmp_path / 'tiny.zip'), random_images(16))
    base = ['--outdir', str(tmp_path / 'runs'), '--data', data, '--device', 'cpu', '-n']
    options, output = _dry_run_options(tmp_path, '--preset', 'edm-imagenet64-adm', '--precision', 'bf16', '--cond', '0')
    assert options['network_kwargs']['use_fp16'] is False and options['precision'] == 'bf16'
    assert "--precision drops the preset's --fp16=True" in output
    options, output = _dry_run_options(tmp_path, '--preset', 'edm-cifar10-uncond-vp', '--loss', 'spd')
    assert options['network_kwargs']['class_name'] == 'training.preconditioning.EpsPrecond'
    assert "--loss drops the preset's --precond=edm" in output
    options, output = _dry_run_options(tmp_path, '--preset', 'edm-cifar10-uncond-vp', '--precond', 'vp', '--loss',
                                       'edm')
    assert options['network_kwargs']['class_name'] == 'training.preconditioning.VPPrecond'  # EDM's loss trains VP
    result = CliRunner().invoke(train.main, [*base, '--preset', 'stf-cifar10-uncond-ncsnpp', '--loss', 'spd'])
    assert result.exit_code == 2 and result.output.rstrip().endswith(
        '(--stf: from --preset=stf-cifar10-uncond-ncsnpp)'), result.output
    result = CliRunner().invoke(train.main, [*base, '--preset', 'edm-cifar10-uncond-vp', '--precond', 'nope'])
    assert result.exit_code == 2 and 'from --preset' not in result.output  # typed, not the preset's


def test_a_sampler_preset_on_a_process_with_its_own_samplers_is_refused_and_errors_name_it(tiny_pickle, tmp_path):
    from losses.spd import SPDLoss
    from samplers import save_schedule_file
    from training import snapshots
    from training.preconditioning import EpsPrecond
    net = EpsPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[]).eval()
    spd = str(tmp_path / 'spd.pkl')
    snapshots.save_snapshot(spd, ema=net, loss_kwargs=dict(class_name='losses.spd.SPDLoss', T=20),
                            process=SPDLoss(T=20).process)
    # EDM's preset on SPD became DPM-Solver++(2M) at its 18 steps, silently.
    result = _generate(['--network', spd, '--outdir', tmp_path / 'a', '--seeds', '0', '--device', 'cpu', '--preset',
                        'edm-cifar10'])
    assert result.exit_code == 2 and "--preset=edm-cifar10 is a sigma-grid sampler configuration; this network's " \
        "process 'spd' brings its own samplers: leave --preset out" in result.output and not (tmp_path / 'a').exists()
    schedule = str(tmp_path / 'grid.json')
    save_schedule_file(schedule, [80.0, 1.0, 0.002], solver='euler', nfe=2)
    result = _generate(['--network', tiny_pickle, '--outdir', tmp_path / 'b', '--seeds', '0', '--device', 'cpu',
                        '--preset', 'aot-uncond', '--schedule', schedule])
    assert result.exit_code == 2 and 'do not apply to a schedule file (it holds its grid) (--preset=aot-uncond ' \
        'gives --steps=14 --rho=90; explicit options win over it)' in result.output, result.output
