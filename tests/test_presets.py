"""Paper presets (issue 17): each published configuration equals the values in ../shared/docs (the project's research
notes on the papers and their READMEs), a preset plus an explicit option applies the option, and --preset=list
shows every preset with its source."""

import json
import os
import re

import pytest
from click.testing import CliRunner
from train_worker import random_images, write_zip_dataset

import train
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
    assert options['network_kwargs']['class_name'] == 'training.preconditioning.VPPrecond'
    assert options['dataset_kwargs']['path'] == data  # --data given explicitly replaces the preset's path
    result = CliRunner().invoke(train.main, ['--preset', 'nope', '--outdir', str(tmp_path), '--data', data, '-n'])
    assert result.exit_code == 2 and "unknown preset 'nope'" in result.output
