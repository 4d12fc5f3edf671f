"""Backbones and layers: EDM parameter counts and key names, init, forward shapes, resampling, attention, embeddings."""

import ast
import os
from unittest import mock

import numpy as np
import pytest
import torch

from training import networks, preconditioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# EDM train.py presets (edm.md section 2).
DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
NCSNPP = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
ADM = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])


def build_on_meta(precond_class, **kwargs):
    """Build without allocating weights: shapes only. Random initialisation is skipped too (it only costs time on
    the meta device, and counts and key names depend on shapes alone)."""
    with torch.device('meta'), mock.patch.object(networks, 'weight_init', lambda shape, **_: torch.empty(shape)):
        return precond_class(**kwargs)


def num_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('precond, kwargs, expected', [
    ('EDMPrecond', dict(img_resolution=32, augment_dim=9, **DDPMPP), 55_733_891),
    ('VPPrecond', dict(img_resolution=32, augment_dim=9, **DDPMPP), 55_733_891),
    ('EDMPrecond', dict(img_resolution=32, augment_dim=9, **NCSNPP), 56_397_827),
    ('EDMPrecond', dict(img_resolution=32, augment_dim=9, label_dim=10, **DDPMPP), 55_735_299),
    ('EDMPrecond', dict(img_resolution=32, augment_dim=9, label_dim=10, **NCSNPP), 56_400_643),
    ('EDMPrecond', dict(img_resolution=32, **DDPMPP), 55_732_739),
    ('EDMPrecond', dict(img_resolution=64, augment_dim=9, **dict(DDPMPP, channel_mult=[1, 2, 2, 2])), 61_805_571),
    ('EDMPrecond', dict(img_resolution=64, augment_dim=9, **dict(NCSNPP, channel_mult=[1, 2, 2, 2])), 62_761_091),
    ('EDMPrecond', dict(img_resolution=64, label_dim=1000, **ADM), 295_899_267),
    ('iDDPMPrecond', dict(img_resolution=64, label_dim=1000, **ADM), 295_904_454),
])
def test_parameter_counts_match_edm(precond, kwargs, expected):
    net = build_on_meta(getattr(preconditioning, precond), img_channels=3, dropout=0.13, **kwargs)
    assert num_params(net) == expected


def test_ddpmpp_state_dict_keys_match_edm():
    net = build_on_meta(preconditioning.EDMPrecond, img_resolution=32, img_channels=3, augment_dim=9, **DDPMPP)
    state = net.state_dict()
    assert len(state) == 425
    expected_shapes = {
        'model.map_augment.weight': (128, 9),
        'model.map_layer0.weight': (512, 128),
        'model.map_layer1.bias': (512,),
        'model.enc.32x32_conv.weight': (128, 3, 3, 3),
        'model.enc.32x32_block0.conv0.weight': (256, 128, 3, 3),
        'model.enc.32x32_block0.skip.weight': (256, 128, 1, 1),
        'model.enc.16x16_down.conv0.resample_filter': (1, 1, 2, 2),
        'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
        'model.enc.16x16_block3.proj.bias': (256,),
        'model.dec.8x8_in0.qkv.weight': (768, 256, 1, 1),
        'model.dec.8x8_in1.affine.weight': (256, 512),
        'model.dec.16x16_up.skip.weight': (256, 256, 1, 1),
        'model.dec.16x16_block4.norm2.weight': (256,),
        'model.dec.32x32_block0.conv0.weight': (256, 512, 3, 3),
        'model.dec.32x32_aux_norm.weight': (256,),
        'model.dec.32x32_aux_conv.weight': (3, 256, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    # Attention only where EDM puts it: every encoder block at 16x16, the last decoder block of a level, in0.
    attention_blocks = sorted(key.split('.')[2] for key in state if key.endswith('.qkv.weight'))
    assert attention_blocks == sorted(['16x16_block0', '16x16_block1', '16x16_block2', '16x16_block3',
                                       '8x8_in0', '16x16_block4'])
    assert not any('map_label' in key or 'aux_residual' in key for key in state)


def test_ncsnpp_and_adm_specific_keys():
    ncsn = build_on_meta(preconditioning.VEPrecond, img_resolution=32, img_channels=3, **NCSNPP).state_dict()
    assert tuple(ncsn['model.map_noise.freqs'].shape) == (128,)  # Fourier features, channel_mult_noise 2.
    assert tuple(ncsn['model.enc.16x16_aux_residual.weight'].shape) == (256, 3, 3, 3)
    assert tuple(ncsn['model.enc.8x8_aux_residual.weight'].shape) == (256, 256, 3, 3)
    assert tuple(ncsn['model.enc.16x16_down.conv0.resample_filter'].shape) == (1, 1, 4, 4)
    adm = build_on_meta(preconditioning.iDDPMPrecond, img_resolution=64, img_channels=3, label_dim=1000,
                        **ADM).state_dict()
    assert tuple(adm['model.map_label.weight'].shape) == (768, 1000) and 'model.map_label.bias' not in adm
    assert tuple(adm['model.out_conv.weight'].shape) == (6, 192, 3, 3)  # iDDPM predicts mean and variance.
    assert tuple(adm['model.enc.64x64_block0.affine.weight'].shape) == (384, 768)  # adaptive scale and shift
    assert tuple(adm['u'].shape) == (1001,)
    assert 'model.enc.32x32_down.skip.weight' not in adm  # Parameter-free resampling skip (resample_proj False).


def test_resample_filter_buffer_values():
    conv = networks.Conv2d(4, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1])
    taps = np.array([1, 3, 3, 1], dtype=np.float64)
    expected = np.outer(taps, taps) / taps.sum() ** 2
    np.testing.assert_allclose(conv.resample_filter[0, 0].numpy(), expected, rtol=1e-7)
    assert networks.Conv2d(4, 4, kernel=3).resample_filter is None


def test_weight_init_ranges():
    torch.manual_seed(0)
    fan_in, fan_out = 40, 24
    w = networks.weight_init([2000], 'xavier_uniform', fan_in, fan_out)
    bound = np.sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    w = networks.weight_init([20000], 'kaiming_normal', fan_in, fan_out)
    assert abs(w.std().item() - np.sqrt(1 / fan_in)) < 0.01 * np.sqrt(1 / fan_in) * 3
    with pytest.raises(ValueError, match='unknown init mode'):
        networks.weight_init([3], 'orthogonal', 1, 1)
    net = networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
                            num_blocks=1)
    block = net.enc['8x8_block0']
    zero_bound = 1e-5 * np.sqrt(6 / (16 * 9 + 16 * 9))
    assert 0 < block.conv1.weight.abs().max() <= zero_bound  # init_zero = xavier_uniform * 1e-5
    attn = net.dec['4x4_in0'].qkv.weight
    assert attn.abs().max() <= np.sqrt(0.2) * np.sqrt(6 / (32 + 96))
    assert net.enc['4x4_down'].skip_scale == pytest.approx(np.sqrt(0.5)) and type(block.skip_scale) is float
    assert block.norm0.eps == 1e-6 and block.norm0.num_groups == 4  # min(32, 16 // 4)
    adm = networks.DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=64,
                                channel_mult=[1], num_blocks=1, attn_resolutions=[8])
    assert adm.enc['8x8_block0'].norm0.eps == 1e-5 and adm.enc['8x8_block0'].norm0.num_groups == 16
    assert adm.enc['8x8_block0'].num_heads == 1 and torch.all(adm.out_conv.weight == 0)


TINY_SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)


@pytest.mark.parametrize('resolution', [8, 16])
@pytest.mark.parametrize('config', [
    dict(embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
         resample_filter=[1, 1]),
    dict(embedding_type='fourier', encoder_type='residual', decoder_type='standard', channel_mult_noise=2,
         resample_filter=[1, 3, 3, 1]),
    dict(embedding_type='fourier', encoder_type='skip', decoder_type='skip', channel_mult_noise=2,
         resample_filter=[1, 3, 3, 1]),
])
def test_song_unet_forward_shapes(resolution, config):
    torch.manual_seed(0)
    net = networks.SongUNet(img_resolution=resolution, in_channels=3, out_channels=5, label_dim=4, augment_dim=9,
                            **dict(TINY_SONG, channel_mult=[1, 2, 2]), **config)
    x = torch.randn(2, 3, resolution, resolution)
    out = net(x, torch.randn(2), torch.eye(4)[:2], augment_labels=torch.randn(2, 9))
    assert out.shape == (2, 5, resolution, resolution) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # A single noise label broadcasts over the batch (0-dim sigma in the preconditioner).
    assert net(x, torch.randn(1), torch.eye(4)[:2]).shape == (2, 5, resolution, resolution)
    if config['decoder_type'] == 'skip':  # An image-space output at every level, upsampled and summed.
        lowest = resolution // 4
        assert f'{lowest}x{lowest}_aux_up' not in net.dec and f'{lowest}x{lowest}_aux_conv' in net.dec
        assert {f'{r}x{r}_aux_up' for r in (resolution, resolution // 2)} <= set(net.dec)
    else:
        assert [name for name in net.dec if 'aux' in name] == [f'{resolution}x{resolution}_aux_norm',
                                                               f'{resolution}x{resolution}_aux_conv']


@pytest.mark.parametrize('resolution', [8, 16])
def test_dhariwal_unet_forward_shapes(resolution):
    torch.manual_seed(0)
    net = networks.DhariwalUNet(img_resolution=resolution, in_channels=3, out_channels=6, label_dim=10,
                                augment_dim=9, model_channels=64, channel_mult=[1, 2], num_blocks=1,
                                attn_resolutions=[resolution // 2], dropout=0)
    torch.nn.init.normal_(net.out_conv.weight)  # init_zero would make the output identically 0
    out = net(torch.randn(3, 3, resolution, resolution), torch.randn(3), torch.eye(10)[:3],
              augment_labels=torch.zeros(3, 9))
    assert out.shape == (3, 6, resolution, resolution) and out.abs().sum() > 0


@pytest.mark.parametrize('taps', [[1, 1], [1, 3, 3, 1]])
@pytest.mark.parametrize('fused', [False, True])
@pytest.mark.parametrize('size', [8, 16])
def test_conv2d_resample_shapes(taps, fused, size):
    x = torch.randn(2, 4, size, size)
    up = networks.Conv2d(4, 6, kernel=3, up=True, resample_filter=taps, fused_resample=fused)
    down = networks.Conv2d(4, 6, kernel=3, down=True, resample_filter=taps, fused_resample=fused)
    assert up(x).shape == (2, 6, size * 2, size * 2)
    assert down(x).shape == (2, 6, size // 2, size // 2)
    assert networks.Conv2d(4, 4, kernel=0, up=True, resample_filter=taps)(x).shape == (2, 4, size * 2, size * 2)
    assert networks.Conv2d(4, 4, kernel=0, down=True, resample_filter=taps)(x).shape == (2, 4, size // 2, size // 2)


def _depthwise_resample(x, taps, up):
    """Reference resampling by the generic depthwise (transposed) convolution with the normalised 2-D filter."""
    taps = torch.tensor(taps, dtype=torch.float64)
    f = torch.outer(taps, taps) / taps.sum() ** 2
    channels, pad = x.shape[1], (len(taps) - 1) // 2
    weight = f.expand(channels, 1, *f.shape).to(x.dtype)
    if up:
        return torch.nn.functional.conv_transpose2d(x, weight * 4, stride=2, padding=pad, groups=channels)
    return torch.nn.functional.conv2d(x, weight, stride=2, padding=pad, groups=channels)


@pytest.mark.parametrize('taps', [[1, 1], [1, 3, 3, 1]])
def test_pure_resampling_values(taps):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    up = networks.Conv2d(3, 3, kernel=0, up=True, resample_filter=taps).double()
    down = networks.Conv2d(3, 3, kernel=0, down=True, resample_filter=taps).double()
    torch.testing.assert_close(up(x), _depthwise_resample(x, taps, up=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(down(x), _depthwise_resample(x, taps, up=False), rtol=1e-12, atol=1e-12)
    if taps == [1, 1]:  # The box filter is nearest-neighbour upsampling and 2x2 averaging.
        torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
        torch.testing.assert_close(down(x), x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5)))
    else:  # The normalised filter keeps a constant image constant away from the zero-padded border.
        const = torch.full((1, 3, 8, 8), 2.5, dtype=torch.float64)
        torch.testing.assert_close(up(const)[..., 2:-2, 2:-2], torch.full((1, 3, 12, 12), 2.5, dtype=torch.float64))


def test_fused_down_is_conv_then_filter():
    torch.manual_seed(0)
    conv = networks.Conv2d(3, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True,
                           init_bias=1).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    full = torch.nn.functional.conv2d(x, conv.weight, padding=2)  # full resolution, padded by w_pad + f_pad
    taps = torch.tensor([1, 3, 3, 1], dtype=torch.float64)
    f = (torch.outer(taps, taps) / 64).expand(4, 1, 4, 4)
    expected = torch.nn.functional.conv2d(full, f, stride=2, groups=4) + conv.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), expected)


def test_attention_matches_explicit_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 16, 20).unbind(0)  # [batch, heads, channels, pixels]
    weights = torch.softmax(torch.einsum('bhcq,bhck->bhqk', q.double(), k.double()) / np.sqrt(16), dim=3)
    expected = torch.einsum('bhqk,bhck->bhcq', weights, v.double()).float()
    torch.testing.assert_close(networks.attention(q, k, v), expected, rtol=0, atol=1e-6)
    # The fused kernel used on CUDA, called here on CPU in the same layout, agrees with the formula too.
    fused = networks._sdpa(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)


def test_unet_block_attention_uses_edm_qkv_layout():
    torch.manual_seed(0)
    block = networks.UNetBlock(in_channels=8, out_channels=16, emb_channels=12, attention=True, num_heads=2,
                               skip_scale=float(np.sqrt(0.5)), eps=1e-6, init_zero=dict(init_weight=1))
    block.eval()
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    out = block(x, emb)
    block.num_heads = 0  # The residual part alone.
    h = block(x, emb)
    qkv = block.qkv(block.norm2(h)).reshape(2 * 2, 8, 3, 16)  # [batch * head, channel, (q, k, v), pixel]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = torch.softmax(torch.einsum('ncq,nck->nqk', q.double(), k.double()) / np.sqrt(8), dim=2)
    a = torch.einsum('nqk,nck->ncq', weights, v.double()).float().reshape(2, 16, 4, 4)
    expected = (block.proj(a) + h) * np.sqrt(0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_embeddings_match_formulas():
    x = torch.tensor([0.0, 0.3, -2.0, 7.5])
    emb = networks.PositionalEmbedding(num_channels=8, endpoint=True)(x)
    freqs = (1 / 10000) ** (np.arange(4) / 3)
    angles = x.numpy()[:, None].astype(np.float64) * freqs[None]
    np.testing.assert_allclose(emb.numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-6)
    emb = networks.PositionalEmbedding(num_channels=8)(x)  # endpoint False: exponents i / 4
    angles = x.numpy()[:, None].astype(np.float64) * ((1 / 10000) ** (np.arange(4) / 4))[None]
    np.testing.assert_allclose(emb.numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-6)
    torch.manual_seed(0)
    fourier = networks.FourierEmbedding(num_channels=8)
    assert fourier.freqs.shape == (4,) and fourier.freqs.abs().max() > 4  # N(0, 16^2)
    angles = 2 * np.pi * x.numpy()[:, None].astype(np.float64) * fourier.freqs.numpy()[None].astype(np.float64)
    np.testing.assert_allclose(fourier(x).numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=2e-4)


def test_song_unet_mapping_swaps_sin_cos_and_scales_labels():
    torch.manual_seed(0)
    net = networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, augment_dim=2, **TINY_SONG)
    captured = {}
    net.map_label.register_forward_pre_hook(lambda m, inputs: captured.__setitem__('label', inputs[0]))
    net.map_layer0.register_forward_pre_hook(lambda m, inputs: captured.__setitem__('layer0', inputs[0]))
    noise, labels = torch.tensor([0.25, -1.0]), torch.eye(4)[[1, 3]]
    net(torch.randn(2, 3, 8, 8), noise, labels)
    torch.testing.assert_close(captured['label'], labels * 2.0)  # one-hot * sqrt(label_dim)
    angles = noise[:, None].double() * (1 / 10000) ** (torch.arange(8, dtype=torch.float64) / 7)
    expected = torch.cat([angles.sin(), angles.cos()], 1).float() + net.map_label(labels * 2.0)
    torch.testing.assert_close(captured['layer0'], expected, rtol=0, atol=1e-5)
    # map_augment has no bias, so missing augment labels are the same as zero labels.
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(net(x, noise, labels), net(x, noise, labels, augment_labels=torch.zeros(2, 2)),
                               rtol=0, atol=0)


def test_invalid_configuration_errors():
    with pytest.raises(ValueError, match="encoder_type='unet'"):
        networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, encoder_type='unet')
    with pytest.raises(ValueError, match='mutually exclusive'):
        networks.Conv2d(3, 3, kernel=3, up=True, down=True)


ALLOWED_IMPORTS = {
    'training/networks.py': {'numpy', 'torch', 'torch.nn.functional', 'torch_utils.persistence'},
    'training/preconditioning.py': {'numpy', 'torch', 'torch_utils.persistence', 'training.networks'},
    'training/augment.py': {'numpy', 'torch', 'torch.nn.functional', 'torch_utils.persistence', 'torch_utils.misc'},
}


@pytest.mark.parametrize('path', sorted(ALLOWED_IMPORTS))
def test_persistent_modules_import_only_what_edm_provides(path):
    """EDM's generate.py executes these sources inside EDM's environment (edm.md section 7)."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f'{node.module}.{alias.name}' for alias in node.names}
    assert imported <= ALLOWED_IMPORTS[path], imported - ALLOWED_IMPORTS[path]
    # Persistence helpers beyond EDM's: only `persistence.persistent_class` and `misc.constant` are used.
    attributes = {(node.value.id, node.attr) for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
    assert {attr for name, attr in attributes if name == 'persistence'} <= {'persistent_class'}
    assert {attr for name, attr in attributes if name == 'misc'} <= {'constant', 'assert_shape'}


def _contains_numpy_scalar(value):
    if isinstance(value, np.generic):
        return True
    if isinstance(value, dict):
        return any(_contains_numpy_scalar(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_numpy_scalar(v) for v in value)
    return False


def test_no_numpy_scalars_stored_on_modules():
    """numpy-2 scalars in a pickle do not load under numpy < 1.26.1 (edm.md section 7)."""
    for precond, config in [('VPPrecond', dict(DDPMPP, model_channels=16, channel_mult=[1, 2])),
                            ('EDMPrecond', dict(NCSNPP, model_channels=16, channel_mult=[1, 2])),
                            ('iDDPMPrecond', dict(ADM, model_channels=64, channel_mult=[1, 2], label_dim=3))]:
        net = getattr(preconditioning, precond)(img_resolution=8, img_channels=3, **config)
        for name, module in net.named_modules():
            state = {k: v for k, v in vars(module).items() if not k.startswith('_') or k == '_init_kwargs'}
            assert not _contains_numpy_scalar(state), name


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    net = networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, label_dim=4, label_dropout=1.0,
                            **TINY_SONG)
    seen = []
    net.map_label.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    labels = torch.eye(4)[[0, 1]]
    net.train()(torch.randn(2, 3, 8, 8), torch.zeros(2), labels)
    net.eval()(torch.randn(2, 3, 8, 8), torch.zeros(2), labels)
    assert torch.equal(seen[0], torch.zeros(2, 4)) and torch.equal(seen[1], labels * 2)


@pytest.mark.parametrize('backbone', ['SongUNet', 'DhariwalUNet'])
def test_channels_last_input_gives_the_same_output(backbone):
    torch.manual_seed(0)
    kwargs = TINY_SONG if backbone == 'SongUNet' else dict(model_channels=64, channel_mult=[1, 2], num_blocks=1,
                                                           attn_resolutions=[4], dropout=0)
    net = getattr(networks, backbone)(img_resolution=8, in_channels=3, out_channels=3, **kwargs).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, noise = torch.randn(2, 3, 8, 8), torch.tensor([0.1, -0.4])
    out = net(x, noise, None)
    torch.testing.assert_close(net(x.to(memory_format=torch.channels_last), noise, None), out, rtol=1e-5, atol=1e-5)
