"""GDD / GDD-I (losses/gdd.py, training/discriminators.py, GDDPrecond, one-step sampling): formulas against direct
computations, the phases' gradients, R1's schedule and gain, the GDD-I freeze rule on EDM's real architectures,
one-step sampling through generate.py and fid.py, GDD-format pickles imported without running their code, and an
exact resume of a GDD run."""

import copy
import functools
import glob
import inspect
import io
import json
import os
import pickle
import subprocess
import sys

import edm_format_fixture as fixture
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from train_worker import assert_tree_equal, loop_kwargs, random_images, write_zip_dataset

from losses import Batch, gdd
from metrics import detectors as detectors_lib
from processes import OneStepProcess
from torch_utils import persistence
from training import discriminators, snapshots
from training import training_loop as tl
from training.preconditioning import EDMPrecond, GDDPrecond
from training.presets import ARCH_PRESETS

TINY_SONG = dict(model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])


def tiny_generator(cls=GDDPrecond, label_dim=0, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = cls(img_resolution=8, img_channels=3, label_dim=label_dim, **TINY_SONG, **kwargs)
    return fixture.randomize_(net, seed).eval().requires_grad_(False)


def seed_latents(seeds, shape, label_dim=0):
    """EDM's per-seed draws, written out: a generator per seed, the latent, then the class."""
    latents, labels = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        latents.append(torch.randn(shape, generator=gen))
        if label_dim:
            labels.append(torch.randint(label_dim, size=[1], generator=gen))
    onehot = torch.eye(label_dim)[torch.cat(labels)] if label_dim else None
    return torch.stack(latents), onehot


def read_pngs(folder, seeds):
    return np.stack([np.asarray(PIL.Image.open(os.path.join(folder, f'{s:06d}.png'))) for s in seeds])


# ---------------------------------------------------------------------------------------------------------------------
# GDDPrecond.

def test_gdd_precond_formulas():
    net = tiny_generator()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([80.0, 0.7])
    with torch.no_grad():
        out = net(x, sigma)
        s = sigma.double().view(-1, 1, 1, 1)
        sd, eps = 0.5, 2e-3
        c_in = (1 / (sd ** 2 + s ** 2).sqrt()).float()
        F_x = net.model(c_in * x, (s.log() / 4).float().flatten(), None).double()
        expected = sd ** 2 / ((s - eps) ** 2 + sd ** 2) * x.double() + (s - eps) * sd / (s ** 2 + sd ** 2).sqrt() * F_x
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(net(x, torch.tensor(2e-3)), x)  # the boundary condition D(x; eps) = x

        edm = tiny_generator(EDMPrecond)  # epsilon = 0 is EDM's preconditioning, bit for bit
        zero = tiny_generator(epsilon=0.0)
        assert torch.equal(zero(x, sigma), edm(x, sigma))
        # float64 in -> float64 out, as GDD's class (its one-step sampler feeds float64): GDD's float32 scalings
        # applied to the float64 input, in GDD's order of operations.
        x64 = x.double() * 80
        out64 = net(x64, torch.tensor(80.0, dtype=torch.float64))
        s32 = torch.full([1, 1, 1, 1], 80.0)
        c_skip = 0.25 / ((s32 - 2e-3) ** 2 + 0.25)
        c_out = (s32 - 2e-3) * 0.5 / (s32 ** 2 + 0.25).sqrt()
        c_in = 1 / (0.25 + s32 ** 2).sqrt()
        F_64 = net.model((c_in * x64).float(), (s32.log() / 4).flatten(), None)
        assert out64.dtype == torch.float64
        assert torch.equal(out64, c_skip * x64 + c_out * F_64)


# ---------------------------------------------------------------------------------------------------------------------
# One-step sampling through generate.py and fid.py.

@pytest.fixture(scope='module')
def one_step_snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp('one_step')
    net = tiny_generator(label_dim=3)
    path = str(root / 'network-snapshot-000000.pkl')
    snapshots.save_snapshot(path, ema=net, loss_kwargs={'class_name': 'losses.gdd.GDDLoss'},
                            process=OneStepProcess(80.0))
    return dict(root=root, path=path, net=net)


def expected_one_step(net, seeds):
    latents, labels = seed_latents(seeds, [3, 8, 8], net.label_dim)
    with torch.no_grad():
        sigma = torch.full([len(seeds), 1, 1, 1], 80.0, dtype=torch.float64)
        images = net(latents.double() * sigma, sigma, labels, force_fp32=True).double()
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_one_step_is_the_default_sampler_of_a_gdd_snapshot(one_step_snapshot):
    import generate

    root, path, net = one_step_snapshot['root'], one_step_snapshot['path'], one_step_snapshot['net']
    snapshot = snapshots.read_snapshot(path)
    assert type(snapshot.process) is OneStepProcess and snapshot.data['process'] == {'name': 'one_step',
                                                                                      'options': {'sigma': 80.0}}
    seeds = list(range(5))
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(root / 'out'), '--seeds', '0-4',
                                                '--batch', '2', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert 'one step: D(80 z; 80)' in result.output and '1 NFE per image' in result.output
    assert np.array_equal(read_pngs(root / 'out', seeds), expected_one_step(net, seeds))

    # The speed options are not sampler options: still one step (bf16: within a few levels of fp32).
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(root / 'bf16'), '--seeds', '0-4',
                                                '--precision', 'bf16', '--compile', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert 'one step: D(80 z; 80)' in result.output and '1 NFE per image' in result.output
    difference = np.abs(read_pngs(root / 'bf16', seeds).astype(int) - read_pngs(root / 'out', seeds).astype(int))
    assert difference.max() <= 8, difference.max()

    # Any sampler option samples the generator over a sigma grid, as any EDM denoiser.
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(root / 'heun'), '--seeds', '0-4',
                                                '--solver', 'heun', '--steps', '4', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert 'solver=heun' in result.output and '7 NFE per image' in result.output
    assert not np.array_equal(read_pngs(root / 'heun', seeds), read_pngs(root / 'out', seeds))


def test_fid_network_uses_the_one_step_sampler(one_step_snapshot, tmp_path):
    import fid
    import generate

    path = one_step_snapshot['path']
    detectors_lib.save_standin(detectors_lib.StandinInception(), str(tmp_path / 'inception.pt'))
    detectors_lib.save_standin(detectors_lib.StandinVGG16(), str(tmp_path / 'vgg16.pt'))
    detector_args = ['--detector', f'inception={tmp_path / "inception.pt"}',
                     '--detector', f'vgg16={tmp_path / "vgg16.pt"}']
    result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / 'pngs'),
                                                '--seeds', '0-11', '--batch', '4', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    runner = CliRunner()
    result = runner.invoke(fid.main, ['ref', '--data', str(tmp_path / 'pngs'), '--dest', str(tmp_path / 'ref.npz'),
                                      '--metrics', 'fid,pr', '--batch', '4', '--workers', '0', *detector_args])
    assert result.exit_code == 0, result.output
    common = ['--ref', str(tmp_path / 'ref.npz'), '--metrics', 'fid,is,pr', '--batch', '4', '--workers', '0',
              *detector_args]
    result = runner.invoke(fid.main, ['calc', '--network', path, '--seeds', '0-11', '--out',
                                      str(tmp_path / 'net.json'), *common])
    assert result.exit_code == 0, result.output
    result = runner.invoke(fid.main, ['calc', '--images', str(tmp_path / 'pngs'), '--num', '12', '--out',
                                      str(tmp_path / 'pngs.json'), *common])
    assert result.exit_code == 0, result.output
    network, pngs = (json.loads((tmp_path / f'{n}.json').read_text()) for n in ('net', 'pngs'))
    assert 'one step' in network['source']['sampler']
    assert network['results'] == pngs['results'] and network['is_scores'] == pngs['is_scores']
    assert network['results']['fid'] == pytest.approx(0, abs=1e-6)  # the reference is these very images


def test_our_gdd_snapshot_loads_in_an_edm_environment(one_step_snapshot, tmp_path):
    """EDM's generate.py can load the `ema` of a GDD snapshot (GDDPrecond's embedded source needs nothing of ours)."""
    net = one_step_snapshot['net']
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 80
    sigma, labels = torch.tensor([80.0, 80.0]), torch.eye(3)[:2]
    torch.save(dict(x=x, sigma=sigma, labels=labels, images=None), tmp_path / 'inputs.pt')
    env = fixture.make_edm_environment(str(tmp_path / 'edm_env'))
    result = subprocess.run([sys.executable, '-I', os.path.join(env, 'load_like_edm.py'), env,
                             one_step_snapshot['path'], str(tmp_path / 'inputs.pt'), str(tmp_path / 'report.pt')],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = torch.load(tmp_path / 'report.pt', weights_only=True)
    assert report['ema_module'].startswith('_imported_module_') and report['project_modules'] == []
    assert report['process_record'] == {'name': 'one_step', 'options': {'sigma': 80.0}}
    with torch.no_grad():
        assert torch.equal(report['denoised'], net(x, sigma, labels))


def test_released_gdd_pickle_imports_without_running_its_code_and_samples_in_one_step(tmp_path):
    """GDD's released pickles: {net, ema, augment_pipe=None, dataset_kwargs} of GDDPrecond with embedded source (and
    GDD's extra attributes), no process record. The source would write a marker if it ran."""
    import generate

    marker = tmp_path / 'executed.txt'
    net = tiny_generator(label_dim=3, seed=4)

    def poisoned_source(obj):
        return fixture.poisoned_source(inspect.getsource(sys.modules[type(obj).__module__]), marker)

    def gdd_attributes(obj, state):
        if type(obj).__name__ == 'GDDPrecond':
            state = dict(state, eps=2e-3, counter=0)
            state.pop('epsilon', None)
        return state

    assert 'epsilon' not in net.init_kwargs  # as GDD's class, which has no such argument
    data = fixture.edm_style_dumps(dict(net=net, ema=net, augment_pipe=None,
                                        dataset_kwargs=dict(path='cifar10-32x32.zip', resolution=8)),
                                   poisoned_source, state_hook=gdd_attributes)
    path = tmp_path / 'cifar_cond_gdd_i.pkl'
    path.write_bytes(data)
    snapshot = snapshots.read_snapshot(str(path))
    assert not marker.exists()
    assert type(snapshot.net) is GDDPrecond and snapshot.net.epsilon == 2e-3
    assert type(snapshot.process) is OneStepProcess and snapshot.process.sigma == 80.0
    result = CliRunner().invoke(generate.main, ['--network', str(path), '--outdir', str(tmp_path / 'out'),
                                                '--seeds', '0-3', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert np.array_equal(read_pngs(tmp_path / 'out', range(4)), expected_one_step(net, list(range(4))))
    with pytest.raises(RuntimeError, match='embedded module source was executed'):  # control: the poison is live
        fixture.edm_style_loads(data)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Discriminators.

class LinearD(torch.nn.Module):
    """Stand-in discriminator with known logits and gradients: per sample, two heads of patch logits
    h_k = x.flatten() @ W_k (W_k: [D, P_k])."""

    def __init__(self, dim, patches=(3, 5), seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(dim, p, generator=gen) * 0.05)
                                               for p in patches])

    def trainable_parameters(self):
        return list(self.parameters())

    def forward(self, images, class_labels=None):
        x = images.flatten(1)
        return [x @ w for w in self.weights]


def test_sn_cnn_shapes_conditioning_and_frozen_nothing():
    torch.manual_seed(0)
    D = discriminators.build_discriminator('sn_cnn', img_resolution=16, img_channels=1, label_dim=10, channels=8)
    x, labels = torch.randn(4, 1, 16, 16), torch.eye(10)[[0, 1, 2, 3]]
    (logits,) = D(x, labels)
    assert logits.shape == (4, 16)  # 4x4 patches
    other = D(x, torch.eye(10)[[5, 5, 5, 5]])[0]
    assert not torch.equal(D.eval()(x, labels)[0], D.eval()(x, torch.eye(10)[[5, 5, 5, 5]])[0])
    assert other.shape == logits.shape and len(D.trainable_parameters()) == len(list(D.parameters()))
    with pytest.raises(ValueError, match="unknown discriminator 'big'"):
        discriminators.build_discriminator('big', img_resolution=8, img_channels=1, label_dim=0)


class TinyBackbone(torch.nn.Module):
    """A stand-in pretrained feature network: 4 levels at strides 2, 4, 8, 16."""

    channels = (4, 8, 8, 16)

    def __init__(self, state=None):
        super().__init__()
        c_in, layers = 3, []
        for c in self.channels:
            layers.append(torch.nn.Sequential(torch.nn.Conv2d(c_in, c, 3, 2, 1), torch.nn.BatchNorm2d(c)))
            c_in = c
        self.layers = torch.nn.ModuleList(layers)
        if state is not None:
            self.load_state_dict(state)

    def forward(self, x):
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


@pytest.fixture
def tiny_backbone(monkeypatch, tmp_path):
    torch.manual_seed(7)
    weights = tmp_path / 'tiny.pth'
    source = TinyBackbone()
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
    torch.save(source.state_dict(), weights)
    spec = discriminators.BackboneSpec(TinyBackbone, 'http://127.0.0.1:9/tiny-0123abcd.pth', '0123abcd',
                                       discriminators.IMAGENET_NORMALIZATION)
    monkeypatch.setitem(discriminators.BACKBONES, 'tiny', spec)
    return dict(path=str(weights), state=source.state_dict())


def test_projected_discriminator_with_a_stand_in_backbone(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    D = discriminators.ProjectedDiscriminator(32, 3, label_dim=10, backbones=['tiny'],
                                              weights={'tiny': tiny_backbone['path']}, class_embedding='random',
                                              interp224=False, cout=4, verbose=False).train()
    assert not D.features.training and D.heads.training  # frozen features stay in eval mode
    for name, tensor in D.features['tiny'].backbone.state_dict().items():
        assert torch.equal(tensor, tiny_backbone['state'][name]), name
    trainable = {id(p) for p in D.trainable_parameters()}
    assert trainable == {id(p) for p in D.heads.parameters()}
    assert not trainable & {id(p) for p in D.features.parameters()}
    x, labels = torch.rand(2, 3, 32, 32) * 2 - 1, torch.eye(10)[[1, 7]]
    (logits,) = D(x, labels)
    # Projected GAN's nominal resolutions (32 / 4 ... / 32, doubled) 16, 8, 4, 2 -> end 2 with a 1x1 last conv; the
    # fused features are 32, 16, 8, 4 pixels wide: every mini-discriminator gives 4 x 4 patches.
    assert logits.shape == (2, 4 * 16)
    assert [len(head.main) // 3 for head in D.heads['tiny'].values()] == [3, 2, 1, 0]
    # The features feed the heads: the R1 gradient reaches the pixels through the frozen network.
    x.requires_grad_(True)
    grad, = torch.autograd.grad(sum(l.sum() for l in D(x, labels)), x)
    assert grad.abs().sum() > 0

    # A size that is not a power of two: the reference's levels (48 // 4, // 8, // 16, // 32) x 2 = 24, 12, 6, 2 end
    # at 2 x 2 (2 x 48 // 32 = 3 would have no entry in the channel table).
    D48 = discriminators.ProjectedDiscriminator(48, 3, backbones=['tiny'], weights={'tiny': tiny_backbone['path']},
                                                interp224=False, cout=4, verbose=False)
    (logits,) = D48(torch.rand(2, 3, 48, 48) * 2 - 1)
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    assert [len(head.main) // 3 for head in D48.heads['tiny'].values()] == [3, 2, 1, 0]


def _dill_style_pickle(obj, type_name='set'):
    """pickle.dumps of the module `obj['embed']` with its set of non-persistent buffer names written as dill writes a
    set: its type by name through dill._dill._load_type (GDD's in_embeddings/tf_efficientnet_lite0.pkl does so),
    without needing dill."""
    import pickle
    import types
    fake = types.ModuleType('dill._dill')

    def _load_type(name):
        raise AssertionError('never called while pickling')
    _load_type.__module__, _load_type.__qualname__ = 'dill._dill', '_load_type'
    fake._load_type = _load_type

    class TypeByName:  # pickled as _load_type(type_name); a callable, as a reduce function must be
        def __reduce__(self):
            return _load_type, (type_name,)

        def __call__(self, *args):
            raise AssertionError('never called while pickling')

    class DillSet(set):  # reducer_override sees no exact set
        pass

    class Pickler(pickle.Pickler):
        def reducer_override(self, value):
            return (TypeByName(), (sorted(value),)) if type(value) is DillSet else NotImplemented

    obj = dict(obj, embed=copy.deepcopy(obj['embed']))
    obj['embed'].__dict__['_non_persistent_buffers_set'] = DillSet(obj['embed']._non_persistent_buffers_set)

    saved = {name: sys.modules.get(name) for name in ('dill', 'dill._dill')}
    sys.modules['dill'], sys.modules['dill._dill'] = types.ModuleType('dill'), fake
    try:
        buffer = io.BytesIO()
        Pickler(buffer, protocol=4).dump(obj)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
    return buffer.getvalue()


def test_class_embedding_pickled_with_dill_is_read_safely(tmp_path):
    """GDD's class embedding file is a dill pickle of {'embed': nn.Embedding(1000, 320)} naming `set` through
    dill._dill._load_type: read without dill and without running code; other dill types stay refused."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(1000, 320)
    data = _dill_style_pickle({'embed': embed})
    assert b'dill._dill' in data and b'_load_type' in data
    path = tmp_path / 'embedding.pkl'
    path.write_bytes(data)
    weight = discriminators._read_class_embedding(str(path))
    assert torch.equal(weight, embed.weight.detach())
    path.write_bytes(_dill_style_pickle({'embed': embed}, type_name='CodeType'))
    with pytest.raises(pickle.UnpicklingError, match="refusing dill's type 'CodeType'"):
        discriminators._read_class_embedding(str(path))


def test_mini_discriminator_matches_the_reference_layout():
    """GDD at 32 x 32 with interp224: nominal 256 -> levels 128, 64, 32, 16 -> 4, 3, 2, 1 down blocks to 8 x 8, with
    Projected GAN's channel table, then a 4x4 conv."""
    shapes = {}
    for level, (c_in, res) in enumerate(zip((64, 64, 128, 256), (128, 64, 32, 16))):
        head = discriminators.MiniDiscriminator(c_in, res, 8)
        shapes[level] = [tuple(m.weight_orig.shape) for m in head.modules() if hasattr(m, 'weight_orig')]
    assert shapes[0] == [(64, 64, 4, 4), (128, 64, 4, 4), (256, 128, 4, 4), (512, 256, 4, 4), (1, 512, 4, 4)]
    assert shapes[3] == [(512, 256, 4, 4), (1, 512, 4, 4)]
    head = discriminators.MiniDiscriminator(64, 16, 8)
    assert head(torch.randn(2, 64, 14, 14)).shape == (2, 16)  # 14 -> 7 -> a 4x4 valid conv: 4 x 4 patches
    cond = discriminators.MiniDiscriminator(64, 16, 8, class_embedding=torch.randn(1000, 320))
    assert cond(torch.randn(2, 64, 16, 16), torch.eye(10)[[0, 9]]).shape == (2, 25)


def test_vgg16_bn_features_equal_torchvision(tmp_path):
    # torchvision is the independent reference here and nothing else needs it, so it is not a requirement:
    # scripts/setup_env.sh installs it beside torch by default (CI's environments); elsewhere this test skips.
    vgg = pytest.importorskip('torchvision.models.vgg', reason='torchvision (the reference) is not installed')

    torch.manual_seed(0)
    reference = vgg.make_layers(vgg.cfgs['D'], batch_norm=True).eval()
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
    state = {f'features.{k}': v for k, v in reference.state_dict().items()}
    state['classifier.0.weight'] = torch.zeros(1)  # the file's classifier is ignored
    ours = discriminators.VGG16BNFeatures(state).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outputs = ours(x)
        expected = [reference[:stop](x) for stop in (13, 23, 33, 43)]
    assert [o.shape[1] for o in outputs] == list(ours.channels)
    for out, ref in zip(outputs, expected):
        assert torch.equal(out, ref)


def test_timm_backbones_have_the_reference_levels():
    timm = pytest.importorskip('timm')
    eff = discriminators.EfficientNetFeatures('tf_efficientnet_lite0',
                                              timm.create_model('tf_efficientnet_lite0').state_dict()).eval()
    assert eff.channels == (24, 40, 112, 320)
    with torch.no_grad():
        assert [tuple(f.shape[1:]) for f in eff(torch.zeros(1, 3, 224, 224))] == \
            [(24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)]
    vit = discriminators.ViTFeatures('deit_base_distilled_patch16_224', None).eval()
    with torch.no_grad():
        assert [tuple(f.shape[1:]) for f in vit(torch.zeros(1, 3, 224, 224))] == \
            [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]


def test_backbone_weights_errors(tiny_backbone, tmp_path, monkeypatch):
    from dnnlib import util

    monkeypatch.setattr(util, '_cache_dir_override', str(tmp_path / 'empty-cache'))
    with pytest.raises(discriminators.DiscriminatorUnavailableError) as info:  # offline: the URL and the ways out
        discriminators.ProjectedDiscriminator(32, 3, backbones=['tiny'], interp224=False, verbose=False)
    message = str(info.value)
    assert 'http://127.0.0.1:9/tiny-0123abcd.pth' in message and 'disc_weights=tiny=PATH' in message
    spec = discriminators.BACKBONES['tiny']
    monkeypatch.setitem(discriminators.BACKBONES, 'tiny', discriminators.BackboneSpec(
        spec.build, 'file://' + tiny_backbone['path'], '0123abcd', spec.normalization))
    with pytest.raises(discriminators.DiscriminatorUnavailableError, match='expected 0123abcd'):  # checksum
        discriminators.ProjectedDiscriminator(32, 3, backbones=['tiny'], interp224=False, verbose=False)
    monkeypatch.setitem(sys.modules, 'timm', None)
    with pytest.raises(discriminators.DiscriminatorUnavailableError, match=r'needs the optional package timm'):
        discriminators.ProjectedDiscriminator(32, 3, verbose=False)


# ---------------------------------------------------------------------------------------------------------------------
# The loss: formulas, phases, R1.

def make_loss(**options):
    loss = gdd.GDDLoss(discriminator='sn_cnn', **options)
    loss.check_data(batch_gpu_total=4, batch_gpu=4, dataset_size=100)
    return loss


def test_ns_and_hinge_losses_equal_direct_computation():
    net = tiny_generator()
    D = LinearD(3 * 8 * 8)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    batch = Batch(images=images, labels=torch.zeros(4, 0))
    for loss_type in ('ns', 'hinge'):
        for batch_sum, scale in ((True, 4.0), (False, 1.0)):
            loss = make_loss(loss_type=loss_type, batch_sum=batch_sum)
            torch.manual_seed(5)
            g = loss.generator_loss(dict(net=net, D=D), batch)
            torch.manual_seed(5)
            z = torch.randn_like(images)
            with torch.no_grad():
                fake = net(z * 80, torch.full([4], 80.0)).double()
                real = images.double()
            w = [p.detach().double() for p in D.weights]
            f_logits = [fake.flatten(1) @ wk for wk in w]
            r_logits = [real.flatten(1) @ wk for wk in w]
            if loss_type == 'ns':
                sp = torch.nn.functional.softplus
                expected_g = sum(sp(-h).mean(1) for h in f_logits)
            else:
                expected_g = sum((-h).mean(1) for h in f_logits)
            torch.testing.assert_close(g.double(), expected_g * scale, rtol=1e-5, atol=1e-6)

            torch.manual_seed(5)
            d = loss.discriminator_loss(dict(net=net, D=D), batch)
            if loss_type == 'ns':
                expected_d = sum(sp(h).mean(1) for h in f_logits) + sum(sp(-h).mean(1) for h in r_logits)
            else:
                expected_d = sum(torch.relu(1 + h).mean(1) for h in f_logits) + \
                    sum(torch.relu(1 - h).mean(1) for h in r_logits)
            torch.testing.assert_close(d.double(), expected_d * scale, rtol=1e-5, atol=1e-6)


def test_defaults_are_the_documented_reference_settings():
    """G(z) = D(80 z; 80), the non-saturating loss, lazy R1 with gamma 1e-4 every 16 iterations, D at lr 1e-4, no
    freezing, per-GPU sums (Zyriix/GDD's settings as the module states them)."""
    loss = gdd.GDDLoss(discriminator='sn_cnn')
    assert (loss.sigma, loss.loss_type, loss.r1_gamma, loss.r1_interval, loss.d_lr, loss.freeze, loss.batch_sum) == \
        (80.0, 'ns', 1e-4, 16, 1e-4, 0, True)
    assert gdd.ADAM_BETAS == (0.0, 0.99) and gdd.ADAM_EPS == 1e-8


def test_batch_sum_scales_by_the_ranks_batch_per_iteration_not_the_micro_batch():
    """With gradient accumulation (2 rounds of 4 per rank), batch_sum multiplies each sample's G and D loss by the 8
    samples of the rank's iteration (the reference's per-GPU sum; the loop divides by 8), not by the round's 4."""
    net, D = tiny_generator(), LinearD(3 * 8 * 8)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    batch = Batch(images=images, labels=torch.zeros(4, 0))
    summed, mean = gdd.GDDLoss(discriminator='sn_cnn'), gdd.GDDLoss(discriminator='sn_cnn', batch_sum=False)
    for loss in (summed, mean):
        loss.check_data(batch_gpu_total=8, batch_gpu=4, dataset_size=100)
    for phase in ('generator_loss', 'discriminator_loss'):
        torch.manual_seed(5)
        a = getattr(summed, phase)(dict(net=net, D=D), batch)
        torch.manual_seed(5)
        b = getattr(mean, phase)(dict(net=net, D=D), batch)
        torch.testing.assert_close(a, 8 * b, rtol=1e-6, atol=0)


def test_r1_penalty_gain_and_schedule():
    loss = make_loss(r1_gamma=0.3)
    D = LinearD(3 * 8 * 8)
    images = torch.rand(4, 3, 8, 8)
    r1 = loss.r1_loss(dict(net=tiny_generator(), D=D), Batch(images=images, labels=torch.zeros(4, 0)))
    # d/dx sum of all logits = sum over heads and patches of W's columns, the same for every sample.
    grad = sum(w.detach().double().sum(1) for w in D.weights)
    expected = 16 * 0.3 / 2 * grad.square().sum()
    torch.testing.assert_close(r1.double(), expected.expand(4), rtol=1e-6, atol=0)
    r1.sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in D.weights)  # it trains D (double backward)

    phases = loss.phases(dict(net=tiny_generator(), D=D), dict(lr=3e-4))
    assert [p.name for p in phases] == ['G', 'D', 'R1']
    assert [i for i in range(70) if phases[2].runs_at(i)] == [16, 32, 48, 64]  # never at iteration 0
    assert all(phases[0].runs_at(i) and phases[1].runs_at(i) for i in range(70))
    g_group, = phases[0].optimizer.param_groups
    d_group, = phases[1].optimizer.param_groups
    assert g_group['lr'] == 3e-4 and g_group['betas'] == (0.0, 0.99) and g_group['eps'] == 1e-8
    assert d_group['lr'] == pytest.approx(1e-4 * 16 / 17, rel=1e-15)
    assert d_group['betas'] == (0.0, pytest.approx(0.99 ** (16 / 17), rel=1e-15))
    assert phases[2].optimizer is phases[1].optimizer  # one Adam for D and R1 (StyleGAN2's lazy regularisation)
    assert all(p.lr_schedule(0) == 1 and p.lr_schedule(10 ** 9) == 1 for p in phases)  # no ramp
    no_r1 = make_loss(r1_gamma=0.0).phases(dict(net=tiny_generator(), D=D), dict(lr=3e-4))
    assert [p.name for p in no_r1] == ['G', 'D'] and no_r1[1].optimizer.param_groups[0]['lr'] == 1e-4


def test_backbone_weight_paths_may_hold_commas():
    """--loss-opt disc_weights splits at a comma only where NAME= follows: 'vgg16_bn=/w/run,2/vgg.pth' was split
    into '/w/run' (then reported missing) and '2/vgg.pth' (refused as not NAME=PATH)."""
    loss = gdd.GDDLoss(backbones='vgg16_bn,tf_efficientnet_lite0',
                       disc_weights='vgg16_bn=/w/run,2/vgg.pth, tf_efficientnet_lite0=/w/e,ff.pth')
    assert loss.disc_weights == {'vgg16_bn': '/w/run,2/vgg.pth', 'tf_efficientnet_lite0': '/w/e,ff.pth'}
    assert gdd._parse_pairs('a=1,,b=2,,', 'x') == {'a': '1', 'b': '2'}  # empty items are still skipped
    # Without NAME= after it a comma belongs to the path (reported whole if no such file exists).
    assert gdd._parse_pairs('a=/w/1,vgg16_bn', 'x') == {'a': '/w/1,vgg16_bn'}
    with pytest.raises(ValueError, match=r"expected NAME=PATH\[,NAME=PATH...\], got 'vgg16_bn'"):
        gdd._parse_pairs('vgg16_bn', 'disc_weights')


def test_bad_options_are_one_line_errors():
    for options, match in ((dict(loss_type='wgan'), 'loss_type'), (dict(freeze=4), 'freeze'),
                           (dict(discriminator='stylegan'), 'discriminator'), (dict(backbones='resnet'), 'backbones'),
                           (dict(disc_weights='vgg16_bn'), 'disc_weights'), (dict(r1_interval=0), 'r1_interval')):
        with pytest.raises(ValueError, match=match):
            gdd.GDDLoss(**options)


# ---------------------------------------------------------------------------------------------------------------------
# GDD-I's freeze rule on EDM's real architectures (from shapes, on the meta device).

def frozen_fraction(net, level):
    total = sum(p.numel() for p in net.parameters())
    frozen = sum(p.numel() for name, p in net.named_parameters() if gdd.frozen_parameter(name, level))
    return total, frozen / total


class DeepLinearD(torch.nn.Module):
    """Four linear layers with weights ~3e-3 and unit biases: activations of order 1, but d(logit)/d(pixel) of order
    1e-9, below float16's smallest subnormal (6e-8): an unscaled fp16 backward gives zero."""

    def __init__(self, dim, width=8, depth=4):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        sizes = [dim] + [width] * depth
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(a, b, generator=gen) * 3e-3)
                                               for a, b in zip(sizes[:-1], sizes[1:])])

    def forward(self, images, class_labels=None):
        x = images.flatten(1)
        for w in self.weights:
            x = x @ w + 1
        return [x]


def test_r1_under_fp16_autocast_scales_its_inner_gradient():
    """--precision fp16: R1's inner backward runs in float16; scaled by the GradScaler's scale (Batch.grad_scale, AMP's
    gradient-penalty recipe) it keeps the penalty of float32, where unscaled it underflows to zero."""
    loss = make_loss(r1_gamma=0.3)
    D, images = DeepLinearD(3 * 8 * 8), torch.rand(4, 3, 8, 8)
    nets = dict(net=tiny_generator(), D=D)
    jacobian = functools.reduce(torch.matmul, [w.detach().double() for w in D.weights]).sum(1)
    expected = (16 * 0.3 / 2 * jacobian.square().sum()).expand(4)
    exact = loss.r1_loss(nets, Batch(images=images, labels=torch.zeros(4, 0)))
    torch.testing.assert_close(exact.double(), expected, rtol=1e-5, atol=0)
    with torch.autocast('cpu', dtype=torch.float16):
        unscaled = loss.r1_loss(nets, Batch(images=images, labels=torch.zeros(4, 0)))
        scaled = loss.r1_loss(nets, Batch(images=images, labels=torch.zeros(4, 0),
                                          grad_scale=torch.tensor(4096.0)))
    assert unscaled.abs().max() == 0  # what the unscaled fp16 inner backward gave
    torch.testing.assert_close(scaled.double(), expected, rtol=0.005, atol=0)


def test_freeze_rule_on_edm_cifar10_ncsnpp_and_imagenet_adm():
    with torch.device('meta'):
        cifar = EDMPrecond(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9, dropout=0.13,
                           **ARCH_PRESETS['ncsnpp'])
        imagenet = EDMPrecond(img_resolution=64, img_channels=3, label_dim=1000, **ARCH_PRESETS['adm'])
    total, fraction = frozen_fraction(cifar, 1)
    assert total == pytest.approx(56.4e6, rel=2e-3) and round(100 * fraction, 1) == 84.4
    total, fraction = frozen_fraction(imagenet, 1)
    assert total == pytest.approx(295.9e6, rel=2e-3) and round(100 * fraction, 1) == 78.8
    assert round(100 * frozen_fraction(cifar, 2)[1], 1) == 86.5 and round(100 * frozen_fraction(imagenet, 2)[1], 1) \
        == 87.0
    assert frozen_fraction(cifar, 0)[1] == 0
    names = dict(cifar.named_parameters())
    for name in ('model.enc.16x16_block0.conv0.weight', 'model.dec.8x8_in0.conv1.bias', 'model.enc.16x16_down.conv0.'
                 'weight', 'model.enc.16x16_block1.proj.weight', 'model.dec.16x16_up.conv1.weight'):
        assert name in names and gdd.frozen_parameter(name, 1), name
    for name in ('model.enc.32x32_conv.weight', 'model.dec.32x32_aux_conv.weight', 'model.enc.16x16_aux_residual.'
                 'weight', 'model.enc.16x16_block0.qkv.weight', 'model.dec.16x16_block0.skip.weight',
                 'model.enc.16x16_block0.affine.weight', 'model.enc.16x16_block0.norm1.weight',
                 'model.map_layer0.weight'):
        assert name in names and not gdd.frozen_parameter(name, 1), name
    assert gdd.frozen_parameter('model.enc.16x16_block0.qkv.weight', 2)
    assert gdd.frozen_parameter('model.dec.16x16_block0.skip.weight', 3)


# ---------------------------------------------------------------------------------------------------------------------
# Through the training loop: which network each phase trains, GDD-I's frozen tensors, exact resume.

class RecordingGDDLoss(gdd.GDDLoss):
    """GDD whose phases note which networks' parameters received gradients while each phase ran."""

    current = None
    log = []
    calls = []

    def phases(self, networks, optimizer_kwargs):
        for name, module in networks.items():
            for p in module.parameters():
                p.register_hook(lambda grad, name=name: RecordingGDDLoss.log.append((RecordingGDDLoss.current, name)))
        return super().phases(networks, optimizer_kwargs)

    def generator_loss(self, *args):
        RecordingGDDLoss.current = 'G'
        RecordingGDDLoss.calls.append('G')
        return super().generator_loss(*args)

    def discriminator_loss(self, *args):
        RecordingGDDLoss.current = 'D'
        RecordingGDDLoss.calls.append('D')
        return super().discriminator_loss(*args)

    def r1_loss(self, *args):
        RecordingGDDLoss.current = 'R1'
        RecordingGDDLoss.calls.append('R1')
        return super().r1_loss(*args)


@pytest.fixture(scope='module')
def gdd_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('gdd_loop')
    data = write_zip_dataset(str(root / 'tiny.zip'), random_images(64))
    torch.manual_seed(3)
    pretrained = GDDPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet', model_channels=8,
                            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    fixture.randomize_(pretrained, 3)
    init = str(root / 'pretrained.pkl')
    persistence.save_network_pickle(init, dict(ema=pretrained.eval()))
    network_kwargs = dict(class_name='training.preconditioning.GDDPrecond', **pretrained.init_kwargs)
    for key in ('img_resolution', 'img_channels', 'label_dim'):
        network_kwargs.pop(key)
    return dict(data=data, init=init, pretrained=pretrained, network_kwargs=network_kwargs)


def gdd_loop_kwargs(run_dir, gdd_data, **loss_options):
    options = dict(class_name='losses.gdd.GDDLoss', discriminator='sn_cnn', disc_channels=8, r1_interval=2)
    options.update(loss_options)
    return loop_kwargs(run_dir, gdd_data['data'], network_kwargs=gdd_data['network_kwargs'], loss_kwargs=options,
                       resume_pkl=gdd_data['init'], optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3),
                       kimg_per_tick=0.008, ema_halflife_kimg=0.5, ema_rampup_ratio=0.05)


def test_each_phase_trains_only_its_network(gdd_data, tmp_path):
    RecordingGDDLoss.log.clear()
    RecordingGDDLoss.calls.clear()
    tl.training_loop(**dict(gdd_loop_kwargs(str(tmp_path), gdd_data, class_name='test_gdd.RecordingGDDLoss'),
                            total_kimg=0.032, state_dump_ticks=None))
    seen = set(RecordingGDDLoss.log)
    assert seen == {('G', 'net'), ('D', 'D'), ('R1', 'D')}, seen  # no D grads in G, no G grads in D or R1
    # G then D every iteration, R1 at iteration 2 (interval 2, never at 0), after D.
    assert RecordingGDDLoss.calls == ['G', 'D', 'G', 'D', 'G', 'D', 'R1', 'G', 'D']
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert all(s['Loss/nonfinite']['mean'] == 0 for s in stats)  # counted by the loop, none here
    assert 'Loss/R1' not in stats[1] and stats[2]['Loss/R1']['num'] == 8


def test_training_loop_hands_the_fp16_grad_scale_to_the_losses(gdd_data, tmp_path, monkeypatch):
    """The loop gives every phase's batch its GradScaler's current scale under fp16 (and None otherwise)."""
    seen = {}

    def recording(method):
        def record(self, nets, batch, augment_pipe=None):
            seen.setdefault(method, []).append(None if batch.grad_scale is None else float(batch.grad_scale))
            return getattr(gdd.GDDLoss, method)(self, nets, batch, augment_pipe)
        return record

    for method in ('generator_loss', 'discriminator_loss', 'r1_loss'):
        monkeypatch.setattr(RecordingGDDLoss, method, recording(method))
    for precision in ('fp32', 'fp16'):
        seen.clear()
        os.makedirs(tmp_path / precision)
        tl.training_loop(**dict(gdd_loop_kwargs(str(tmp_path / precision), gdd_data,
                                                class_name='test_gdd.RecordingGDDLoss'),
                                total_kimg=0.024, precision=precision))
        values = [v for method in ('generator_loss', 'discriminator_loss', 'r1_loss') for v in seen[method]]
        if precision == 'fp32':
            assert values and all(v is None for v in values)
        else:
            assert all(v is not None and v > 1 for v in values) and seen['r1_loss'], seen


def test_compile_leaves_the_r1_discriminator_eager(gdd_data, tmp_path, monkeypatch):
    """--compile with R1: the generator is compiled, D is not (its penalty differentiates twice, which torch.compile's
    AOT autograd refuses: 'does not currently support double backward' at the first R1 step before)."""
    compiled = []
    original = torch.compile

    def recording_compile(module, **kwargs):
        compiled.append(module)
        return original(module, backend='aot_eager', **kwargs)  # AOT autograd, without Inductor's C++ build

    monkeypatch.setattr(torch, 'compile', recording_compile)
    RecordingGDDLoss.calls.clear()
    tl.training_loop(**dict(gdd_loop_kwargs(str(tmp_path), gdd_data, class_name='test_gdd.RecordingGDDLoss'),
                            total_kimg=0.024, state_dump_ticks=None, compile=True))
    assert RecordingGDDLoss.calls == ['G', 'D', 'G', 'D', 'G', 'D', 'R1']
    assert len(compiled) == 1 and compiled[0].__class__.__name__ != 'SNCNNDiscriminator' \
        and hasattr(compiled[0], 'sigma_data')  # the generator (a preconditioned denoiser) alone

def test_gdd_i_keeps_frozen_tensors_bit_identical(gdd_data, tmp_path):
    tl.training_loop(**dict(gdd_loop_kwargs(str(tmp_path), gdd_data, freeze=1), total_kimg=0.024))
    state = torch.load(sorted(glob.glob(str(tmp_path / 'training-state-*.pt')))[-1], weights_only=True)
    pretrained = dict(gdd_data['pretrained'].named_parameters())
    frozen = [name for name in pretrained if gdd.frozen_parameter(name, 1)]
    trained = [name for name in pretrained if not gdd.frozen_parameter(name, 1)]
    assert len(frozen) >= 8 and any('proj' in n for n in frozen)
    for name in frozen:
        assert torch.equal(state['networks']['net'][name], pretrained[name]), name
        assert torch.equal(state['ema'][name], pretrained[name]), name
    changed = [n for n in trained if not torch.equal(state['networks']['net'][n], pretrained[n])]
    assert len(changed) == len(trained)
    assert len(state['optimizers']['G']['param_groups'][0]['params']) == len(trained)


def test_resume_with_another_freeze_level_is_a_one_line_error(gdd_data, tmp_path, capsys):
    """The G optimizer of freeze=1 holds fewer tensors than the state's (freeze=0): torch's raw parameter-group error
    becomes one naming the phase and the fix, and the resume is not announced as exact (the options changed)."""
    first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
    os.makedirs(first), os.makedirs(second)
    tl.training_loop(**dict(gdd_loop_kwargs(first, gdd_data), total_kimg=0.016))
    state_path = os.path.join(first, 'training-state-000000.pt')
    capsys.readouterr()
    with pytest.raises(ValueError) as info:
        tl.training_loop(**dict(gdd_loop_kwargs(second, gdd_data, freeze=1), total_kimg=0.032, resume_pkl=None,
                                resume_state_dump=state_path))
    assert str(info.value) == (f"{state_path}: the optimizer of phase 'G' trains other parameters than the state's "
                               f"(e.g. a changed --loss-opt freeze or discriminator); resume with the options the run "
                               f"was made with")
    output = capsys.readouterr().out
    assert f'Resuming from "{state_path}"...' in output and 'Resuming exactly' not in output
    assert isinstance(info.value, tl.ResumeMismatchError)  # train.py: one line, no traceback
    # Another discriminator width: torch's multi-line size-mismatch traceback became one line naming the network.
    with pytest.raises(tl.ResumeMismatchError) as info:
        tl.training_loop(**dict(gdd_loop_kwargs(second, gdd_data, disc_channels=16), total_kimg=0.032,
                                resume_pkl=None, resume_state_dump=state_path))
    message = str(info.value)
    assert message.startswith(f"{state_path}: the saved network 'D' does not fit the one these options build (")
    assert 'size mismatch' in message and '\n' not in message and 'disc_channels' in message


def test_resume_takes_this_runs_optimizer_hyperparameters(gdd_data, tmp_path):
    """Lazy R1 rescales D's Adam (lr * c, beta2 ** c, c = 2/3 at interval 2); a resume with r1_gamma=0 (no R1 phase)
    runs D's Adam at d_lr and beta2 0.99, not the state's rescaled values; the moments are carried over."""
    first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
    os.makedirs(first), os.makedirs(second)
    tl.training_loop(**dict(gdd_loop_kwargs(first, gdd_data), total_kimg=0.016))
    state_path = os.path.join(first, 'training-state-000000.pt')
    saved = torch.load(state_path, weights_only=True)['optimizers']['D']['param_groups'][0]
    assert saved['betas'][1] == pytest.approx(0.99 ** (2 / 3)) and saved['base_lr'] == pytest.approx(1e-4 * 2 / 3)
    tl.training_loop(**dict(gdd_loop_kwargs(second, gdd_data, r1_gamma=0), total_kimg=0.024, resume_pkl=None,
                            resume_state_dump=state_path))
    resumed = torch.load(os.path.join(second, 'training-state-000000.pt'), weights_only=True)['optimizers']
    assert set(resumed) == {'G', 'D'}
    group = resumed['D']['param_groups'][0]
    assert tuple(group['betas']) == (0.0, 0.99) and group['base_lr'] == pytest.approx(1e-4)
    assert resumed['D']['state'][0]['step'] == 3  # 2 D steps before the resume, 1 after


@pytest.mark.slow
def test_exact_resume_of_a_gdd_run(gdd_data, tmp_path):
    """6 iterations straight == 2, then a resume to 6 (R1 at 2 and 4): G, D, both optimizers, EMA and RNG."""
    straight, first, resumed = (str(tmp_path / n) for n in ('straight', 'first', 'resumed'))
    for directory in (straight, first, resumed):
        os.makedirs(directory)
    kwargs = gdd_loop_kwargs(straight, gdd_data, freeze=1)
    tl.training_loop(**dict(kwargs, run_dir=straight, total_kimg=0.048))
    tl.training_loop(**dict(kwargs, run_dir=first, total_kimg=0.016))
    state_path = os.path.join(first, 'training-state-000000.pt')
    assert torch.load(state_path, weights_only=True)['cur_iter'] == 2
    tl.training_loop(**dict(kwargs, run_dir=resumed, total_kimg=0.048, resume_pkl=None,
                            resume_state_dump=state_path))
    a, b = (torch.load(os.path.join(d, 'training-state-000000.pt'), weights_only=True) for d in (straight, resumed))
    assert a['cur_iter'] == b['cur_iter'] == 6 and set(a['networks']) == {'net', 'D'}
    assert set(a['optimizers']) == {'G', 'D', 'R1'}
    for key in ('networks', 'ema', 'optimizers', 'rng', 'data_position'):
        assert_tree_equal(a[key], b[key], key)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_one_rank_for_generator_discriminator_and_r1(gdd_data, tmp_path):
    """G (DDP), D and the lazy R1 phase (one gradient all-reduce per phase: D runs on fakes and reals before its
    backward, and R1 leaves D's output bias without a gradient, both of which DDP refuses) under 2 gloo ranks x batch
    4 equal 1 rank x batch 8 after 6 iterations (R1 at 2 and 4; rng='image': each image's z and noise come from its
    own seed). batch_sum=0: the reference's per-GPU loss sums make a run depend on the GPU count by design."""
    from launch import torchrun
    from train_worker import ROOT
    states = {}
    for name in ('ranks2', 'rank1'):
        run_dir = tmp_path / name
        os.makedirs(run_dir)
        config = dict(gdd_loop_kwargs(str(run_dir), gdd_data, batch_sum=False), total_kimg=0.048)
        if name == 'ranks2':
            config_path = tmp_path / 'config.json'
            config_path.write_text(json.dumps(config))
            result = subprocess.run(torchrun(2, os.path.join(ROOT, 'tests', 'train_worker.py'), config_path),
                                    cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True,
                                    text=True, timeout=300)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        else:
            tl.training_loop(**config)
        paths = sorted(glob.glob(str(run_dir / 'training-state-*.pt')))
        states[name] = torch.load(paths[-1], map_location='cpu', weights_only=True)
    two, one = states['ranks2'], states['rank1']
    assert two['world_size'] == 2 and two['cur_iter'] == one['cur_iter'] == 6
    for network in ('net', 'D'):
        for key, value in one['networks'][network].items():
            torch.testing.assert_close(two['networks'][network][key], value, rtol=0, atol=1e-5,
                                       msg=f'{network} {key}')
    # Not vacuous: both networks moved from where they started by far more than the tolerance.
    start = dict(gdd_data['pretrained'].state_dict())
    assert max((one['networks']['net'][k] - v).abs().max() for k, v in start.items()) > 1e-3
    d_moved = [k for k in one['networks']['D'] if 'weight' in k]
    assert d_moved and all(k in two['networks']['D'] for k in d_moved)
    assert one['optimizers']['R1']['state'], 'R1 never stepped'


# ---------------------------------------------------------------------------------------------------------------------
# train.py --init (generic) and the presets.

@pytest.fixture(scope='module')
def edm_release(tmp_path_factory):
    """A stand-in for EDM's released pickles (EDMPrecond, dropout 0.13, augment_dim 9), in EDM's format with embedded
    source that would write a marker if --init ran it."""
    root = tmp_path_factory.mktemp('edm_release')
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet', model_channels=8,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13, augment_dim=9)
    fixture.randomize_(net, 1).eval()
    marker = root / 'executed.txt'

    def poisoned_source(obj):
        return fixture.poisoned_source(inspect.getsource(sys.modules[type(obj).__module__]), marker)

    path = root / 'edm-tiny-uncond.pkl'
    path.write_bytes(fixture.edm_style_dumps(dict(ema=net, augment_pipe=None, dataset_kwargs={}), poisoned_source))
    data = write_zip_dataset(str(root / 'tiny.zip'), random_images(32))
    return dict(path=str(path), net=net, marker=marker, data=data, root=root)


def _train(args):
    import train
    return CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)


def _printed_options(output):
    start = output.index('Training options:') + len('Training options:')
    return json.loads(output[start:output.index('\n\n', start + 2)])


def test_init_takes_the_pickles_network_and_the_losss_preconditioning(edm_release, tmp_path):
    common = ['--outdir', tmp_path, '--data', edm_release['data'], '--init', edm_release['path'], '--dropout', 0,
              '--augment', 0, '--device', 'cpu', '-n']
    vgg_only = ['--loss-opt', 'backbones=vgg16_bn']  # the default pair needs timm, an optional package
    result = _train(['--loss', 'gdd', *vgg_only, *common])
    assert result.exit_code == 0, result.output
    assert not edm_release['marker'].exists()
    options = _printed_options(result.output)
    expected = {k: v for k, v in edm_release['net'].init_kwargs.items() if k not in ('img_resolution', 'img_channels',
                                                                                      'label_dim')}
    # GDD's default wrapper; no augmentation input without augmentation (EDM's rule; see the test below)
    expected.update(class_name='training.preconditioning.GDDPrecond', dropout=0, use_fp16=False, augment_dim=0)
    assert options['network_kwargs'] == expected and options['resume_pkl'] == edm_release['path']
    assert options['ema_rampup_ratio'] == 0.05  # the EMA ramp stays (EDM's 5%; --transfer turns it off)
    assert options['run_dir'].endswith('-tiny-uncond-ddpmpp-gdd-gpus1-batch512-fp32')
    assert options['loss_kwargs'] == {'class_name': 'losses.gdd.GDDLoss', 'backbones': 'vgg16_bn'}

    result = _train(['--loss', 'gdd', *vgg_only, '--precond', 'edm', *common])  # --precond keeps EDM's wrapper
    assert _printed_options(result.output)['network_kwargs']['class_name'] == 'training.preconditioning.EDMPrecond'
    result = _train(['--loss', 'edm', *common])  # a loss that declares nothing keeps the pickle's class
    assert _printed_options(result.output)['network_kwargs']['class_name'] == 'training.preconditioning.EDMPrecond'

    result = _train(['--loss', 'gdd', *vgg_only, '--cbase', 16, *common])
    assert result.exit_code != 0 and '--cbase: --init takes the architecture from the pickle' in result.output
    cond = write_zip_dataset(str(tmp_path / 'cond.zip'), random_images(8), labels=[0, 1] * 4)
    result = _train(['--loss', 'gdd', '--outdir', tmp_path, '--data', cond, '--cond', 1, '--init',
                     edm_release['path'], '-n', '--device', 'cpu'])
    assert result.exit_code != 0 and 'label_dim=0, but the dataset (--data, --cond) needs 2' in result.output
    assert not edm_release['marker'].exists()


def test_a_missing_backbone_package_stops_the_dry_run_before_any_run_directory(edm_release, tmp_path, monkeypatch):
    """Without timm the default projected discriminator cannot be built; train.py says so when it checks the options
    (--dry-run included), as it does for the other --loss-opt errors, not after it has created the run directory."""
    monkeypatch.setitem(sys.modules, 'timm', None)
    outdir = tmp_path / 'runs'
    for dry_run in (['-n'], []):
        result = _train(['--loss', 'gdd', '--outdir', outdir, '--data', edm_release['data'], '--init',
                         edm_release['path'], '--dropout', 0, '--augment', 0, '--device', 'cpu', *dry_run])
        assert result.exit_code == 2, result.output
        assert "Error: --loss-opt backbones: the projected discriminator's backbone " \
               "'tf_efficientnet_lite0' needs the optional package timm" in result.output
        assert not outdir.exists() or not os.listdir(outdir)
    result = _train(['--loss', 'gdd', '--loss-opt', 'discriminator=sn_cnn', '--outdir', outdir, '--data',
                     edm_release['data'], '--init', edm_release['path'], '--dropout', 0, '--augment', 0, '--device',
                     'cpu', '-n'])
    assert result.exit_code == 0, result.output  # the other discriminator needs no package


def test_init_without_augmentation_leaves_no_parameter_without_a_gradient(edm_release, tmp_path):
    """EDM's released networks have an augmentation input (augment_dim=9). Without augmentation, or under GDD (whose
    augmentation is the discriminator's), nothing feeds it: its weight would get no gradient, and DDP on more than one
    GPU stops at the second step ("parameters that were not used in producing loss"). train.py --init drops it then
    (EDM's rule), the outputs stay the pickle's."""
    import dnnlib
    from torch_utils import misc
    release = edm_release['net']
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.5, 2.0, 80.0])
    for loss, augment, augment_dim in (('gdd', 0, 0), ('edm', 0, 0), ('gdd', 0.1, 0), ('edm', 0.1, 9)):
        sn_cnn = ['--loss-opt', 'discriminator=sn_cnn'] if loss == 'gdd' else []  # no optional package needed
        result = _train(['--loss', loss, *sn_cnn, '--precond', 'edm', '--outdir', tmp_path, '--data',
                         edm_release['data'], '--init', edm_release['path'], '--augment', augment, '--device', 'cpu',
                         '-n'])
        assert result.exit_code == 0, result.output
        kwargs = _printed_options(result.output)['network_kwargs']
        assert kwargs['augment_dim'] == augment_dim
        net = dnnlib.util.construct_class_by_name(**kwargs, img_resolution=8, img_channels=1, label_dim=0).eval()
        misc.copy_params_and_buffers(release, net, require_all=False)
        torch.testing.assert_close(net(x, sigma), release(x, sigma), rtol=0, atol=0)
        net.train().requires_grad_(True)
        net(x, sigma).square().sum().backward()
        without = [name for name, p in net.named_parameters() if p.grad is None]
        assert without == ([] if augment_dim == 0 else ['model.map_augment.weight']), without


@pytest.mark.slow
def test_train_gdd_from_an_edm_pickle_end_to_end(edm_release, tmp_path):
    """train.py --loss=gdd --init=PKL for 1 kimg, then the snapshot samples in one step by default."""
    import generate

    result = _train(['--outdir', tmp_path, '--data', edm_release['data'], '--init', edm_release['path'], '--loss',
                     'gdd', '--loss-opt', 'discriminator=sn_cnn', '--loss-opt', 'disc_channels=8', '--loss-opt',
                     'freeze=1', '--dropout', 0, '--augment', 0, '--batch', 32, '--duration', 0.001, '--tick', 1,
                     '--snap', 1, '--dump', 1, '--seed', 1, '--lr', 1e-4, '--lr-rampup', 0, '--workers', 0,
                     '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert not edm_release['marker'].exists()
    run_dir, = glob.glob(str(tmp_path / '*-gdd-*'))
    snapshot = snapshots.read_snapshot(os.path.join(run_dir, 'network-snapshot-000001.pkl'))
    assert type(snapshot.net) is GDDPrecond and type(snapshot.process) is OneStepProcess
    assert snapshot.data['loss']['name'] == 'gdd' and snapshot.data['loss']['options']['freeze'] == 1
    frozen = [n for n, _ in snapshot.net.named_parameters() if gdd.frozen_parameter(n, 1)]
    pretrained = dict(edm_release['net'].named_parameters())
    assert frozen and all(torch.equal(dict(snapshot.net.named_parameters())[n], pretrained[n]) for n in frozen)
    out = tmp_path / 'images'
    result = CliRunner().invoke(generate.main, ['--network', os.path.join(run_dir, 'network-snapshot-000001.pkl'),
                                                '--outdir', str(out), '--seeds', '0-3', '--device', 'cpu'])
    assert result.exit_code == 0 and '1 NFE per image' in result.output, result.output
    state = torch.load(os.path.join(run_dir, 'training-state-000001.pt'), weights_only=True)
    assert set(state['networks']) == {'net', 'D'} and set(state['optimizers']) == {'G', 'D', 'R1'}


def test_presets_are_valid_train_py_options():
    import losses
    import train
    from training import presets

    names = {p.name for p in train.main.params}
    for name, preset in presets.TRAIN_PRESETS.items():
        assert set(preset) <= names, name
    for preset in presets.GDD_PRESETS.values():
        gdd.GDDLoss(**losses.parse_loss_options('gdd', preset['loss_opt']))  # the options parse and build
    assert presets.GDD_PRESETS['gdd-i-imagenet']['ema'] == 50 and presets.GDD_PRESETS['gdd-imagenet']['batch'] == 512
    assert 'freeze=1' in presets.GDD_PRESETS['gdd-i-ffhq']['loss_opt']
    assert 'gdd-i-cifar10-cond' in train.main.epilog and '--init=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/' \
        'edm-cifar10-32x32-cond-ve.pkl' in train.main.epilog
