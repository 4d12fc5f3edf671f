"""Forward processes (processes/): the registry, snapshot records, and a toy process plugged in by one registration
and sampled by generate.py's own code path."""

import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import processes
from processes import EDMProcess, build_process, process_record
from samplers.generation import SeedInputs, seed_inputs, to_uint8
from training import snapshots
from training.preconditioning import EDMPrecond


def tiny_denoiser(seed=0, label_dim=0):
    torch.manual_seed(seed)
    return EDMPrecond(img_resolution=8, img_channels=1, label_dim=label_dim, model_type='SongUNet', model_channels=8,
                      channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval().requires_grad_(False)


class OneStepSampling:
    """Toy sampling: one denoiser call at `level` from latents * level (a one-step generator's shape)."""

    def __init__(self, level):
        self.level = level

    def prepare(self, net, config, device=None):
        return torch.tensor(self.level, dtype=torch.float64, device=device)

    def describe(self, net, config):
        return f'one step at sigma={self.level}; 1 NFE per image'

    def sample(self, net, plan, inputs: SeedInputs, config):
        return net(inputs.latents.to(torch.float64) * plan, plan, inputs.class_labels).to(torch.float64)


class ToyProcess:
    """A registered process with an option; trained like EDM's, sampled in one step at its `level`."""

    name = 'toy'

    def __init__(self, level=3.0):
        self.level = float(level)
        self.sampling = OneStepSampling(self.level)

    def options(self):
        return {'level': self.level}

    @staticmethod
    def corrupt(y, sigma, eps):
        return y + eps * sigma

    @staticmethod
    def target(y, x, sigma):
        return y


def test_edm_process_formulas_and_records():
    process = EDMProcess()
    y, eps, sigma = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([0.5, 2.0]).reshape(2, 1, 1, 1)
    assert torch.equal(process.corrupt(y, sigma, eps), y + eps * sigma)
    assert process.target(y, None, sigma) is y
    assert process_record(process) == {'name': 'edm', 'options': {}}
    assert isinstance(build_process(None), EDMProcess)  # EDM's and its forks' pickles record no process
    assert isinstance(build_process({'name': 'edm', 'options': {}}), EDMProcess)
    with pytest.raises(ValueError, match=r"x\.pkl: trained with the process 'blur', which this version does not know"):
        build_process({'name': 'blur', 'options': {}}, source='x.pkl')
    with pytest.raises(ValueError, match='malformed process record'):
        build_process({'options': {}}, source='x.pkl')
    with pytest.raises(ValueError, match='is not registered'):
        process_record(ToyProcess())


def test_a_toy_process_is_one_registration_and_generate_py_samples_through_it(tmp_path, monkeypatch):
    monkeypatch.setitem(processes.PROCESSES, 'toy', ToyProcess)
    net = tiny_denoiser()
    path = str(tmp_path / 'network-snapshot-000000.pkl')
    snapshots.save_snapshot(path, ema=net, loss_kwargs={'class_name': 'losses.denoising.EDMLoss'},
                            process=ToyProcess(level=2.5))
    snapshot = snapshots.read_snapshot(path)
    assert type(snapshot.process) is ToyProcess and snapshot.process.level == 2.5

    import generate
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'out'), '--seeds', '0-2',
                                                '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert 'one step at sigma=2.5; 1 NFE per image' in result.output
    inputs = seed_inputs(net, [0, 1, 2], device='cpu')
    with torch.no_grad():
        expected = to_uint8(net(inputs.latents.to(torch.float64) * 2.5, torch.tensor(2.5, dtype=torch.float64)))
    for seed in range(3):
        png = np.asarray(PIL.Image.open(tmp_path / 'out' / f'{seed:06d}.png'))
        assert np.array_equal(png, expected[seed, 0].numpy()), seed


def test_snapshot_of_an_unknown_process_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(processes.PROCESSES, 'toy', ToyProcess)
    path = str(tmp_path / 'network-snapshot-000000.pkl')
    snapshots.save_snapshot(path, ema=tiny_denoiser(), loss_kwargs={'class_name': 'losses.denoising.EDMLoss'},
                            process=ToyProcess())
    monkeypatch.delitem(processes.PROCESSES, 'toy')
    import generate
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'out'),
                                                '--device', 'cpu'])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    known = ', '.join(processes.PROCESSES)
    assert errors == [f"Error: {path}: trained with the process 'toy', which this version does not know "
                      f"(known: {known})"]
    assert not os.path.exists(tmp_path / 'out')
