"""Backbone architectures: layers, SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM).

Module, parameter and constructor-argument names follow NVlabs/edm so that EDM's state dicts copy in key for key,
and the order in which modules are created (hence the order of random draws at initialisation, of parameters and
of optimizer state) is EDM's as well.

Persistence constraint: snapshots embed this file's source and EDM's own generate.py executes it when unpickling.
This module therefore imports only numpy, torch and `torch_utils.persistence` (its `persistent_class` decorator
alone), keeps Python 3.8 / torch 1.12 syntax and APIs working, and stores Python floats, never numpy scalars.
"""

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import persistence

# torch >= 2.0 has a fused attention kernel; older torch (EDM's environment) falls back to the explicit formula.
_sdpa = getattr(F, 'scaled_dot_product_attention', None)


def weight_init(shape, mode, fan_in, fan_out):
    """Random initial weights; the modes and the draws are EDM's (uniform draws mapped to [-1, 1))."""
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'weight_init: unknown init mode {mode!r}; expected xavier_uniform, xavier_normal, '
                     f'kaiming_uniform or kaiming_normal')


def attention(q, k, v):
    """Attention over flattened pixels: q, k, v are [..., channels, pixels] -> [..., channels, pixels].

    out[..., :, i] = sum_j softmax_j(q_i . k_j / sqrt(channels)) v[..., :, j], the softmax evaluated in fp32 (EDM's
    AttentionOp does so explicitly; the fused kernels accumulate in fp32 for half inputs). Pass 4-D tensors
    [batch, heads, channels, pixels]: the fused CUDA kernels accept nothing else.
    """
    # On CUDA the fused kernels are much faster (and accumulate in fp32); elsewhere the explicit formula, written
    # exactly as EDM's AttentionOp, keeps CPU forward results bit-identical to EDM's. Gradients are autograd's, not
    # AttentionOp's hand-written backward: about one ulp apart (an audit against NVlabs/edm, 2026-12-02).
    if _sdpa is not None and q.is_cuda:
        # Contiguous [..., pixels, channels]: the fused kernels need a unit stride in the last dimension (a transposed
        # view would send SDPA to its math fallback).
        q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
        return _sdpa(q, k, v).transpose(-1, -2)
    weights = torch.einsum('...cq,...ck->...qk', q.to(torch.float32), (k / np.sqrt(k.shape[-2])).to(torch.float32))
    weights = weights.softmax(dim=-1).to(q.dtype)
    return torch.einsum('...qk,...ck->...cq', weights, v)


# ----------------------------------------------------------------------------------------------------------------------
# Layers.

@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully-connected layer; the weight is cast to the input dtype (fp16 backbones keep fp32 master weights)."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        # The bias draw happens even when init_bias is 0, as in EDM, so that seeded initialisation matches.
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """2-D convolution with optional 2x up- or down-sampling by a separable FIR filter.

    kernel=0 gives a pure resampling layer without parameters. Unfused: resample, then convolve. Fused (EDM's
    `fused_resample`): up = filter with less padding, then a convolution with less padding; down = convolution
    at full resolution, then the strided filter. Output size is always 2x / 0.5x the input.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        if up and down:
            raise ValueError('Conv2d: up and down are mutually exclusive')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(
            weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        filter_2d = torch.outer(taps, taps).unsqueeze(0).unsqueeze(1) / taps.sum().square()  # [1, 1, k, k], sum 1
        self.register_buffer('resample_filter', filter_2d if up or down else None)
        # A [1, 1] box filter is nearest-neighbour upsampling / 2x2 average pooling; those kernels are much faster
        # than depthwise (transposed) convolutions on GPUs and give the same values.
        self._box_filter = tuple(resample_filter) == (1, 1)

    def _upsample(self, x, f, padding):
        if self._box_filter and padding == 0:
            return F.interpolate(x, scale_factor=2, mode='nearest')
        channels = x.shape[1]
        return F.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)

    def _downsample(self, x, f, padding):
        if self._box_filter and padding == 0:
            return F.avg_pool2d(x, 2)
        channels = x.shape[1]
        return F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = self._upsample(x, f, padding=max(f_pad - w_pad, 0))
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = self._downsample(x, f, padding=0)
            return x.add_(b.reshape(1, -1, 1, 1)) if b is not None else x
        if self.up:
            x = self._upsample(x, f, padding=f_pad)
        if self.down:
            x = self._downsample(x, f, padding=f_pad)
        if w is not None:
            # The bias inside the convolution (one kernel on GPUs); EDM adds it after: the same forward values, bias
            # gradients about one ulp apart.
            x = F.conv2d(x, w, b, padding=w_pad)
        return x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation with min(num_groups, channels // min_channels_per_group) groups."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual block with optional up/down-sampling and self-attention: the union of DDPM++, NCSN++ and ADM blocks.

    norm0 -> silu -> conv0 -> noise embedding (additive, or scale/shift when adaptive_scale) -> silu -> dropout ->
    conv1, plus the (possibly projected/resampled) input, times skip_scale; then optionally
    x + proj(attention(qkv(norm2(x)))), times skip_scale.
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1),
                 resample_proj=False, adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        init = dict(init) if init is not None else dict()
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection when channels change (or when asked), otherwise a parameter-free resample.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x.add_(params)))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            batch, channels, height, width = x.shape
            # EDM's qkv channel layout: [head, channel_in_head, (q, k, v)], the q/k/v index varying fastest.
            qkv = self.qkv(self.norm2(x)).reshape(batch, self.num_heads, channels // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(3)
            a = attention(q, k, v)  # [batch, heads, channels_in_head, pixels]
            x = self.proj(a.reshape(batch, channels, height, width)).add_(x)
            x = x * self.skip_scale
        return x


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding [cos(x f_i), sin(x f_i)] with f_i = max_positions^(-i / (C/2 - endpoint)) (DDPM++, ADM)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi f x), sin(2 pi f x)], f ~ N(0, scale^2) fixed at construction (NCSN++)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Backbones.

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. ("Score-Based Generative Modeling through SDEs") as configured by EDM.

    DDPM++: embedding_type='positional', encoder_type='standard', channel_mult_noise=1, resample_filter=[1,1].
    NCSN++: embedding_type='fourier', encoder_type='residual', channel_mult_noise=2, resample_filter=[1,3,3,1].
    """

    def __init__(self,
                 img_resolution,                    # Image resolution at input/output.
                 in_channels,                       # Number of colour channels at input.
                 out_channels,                      # Number of colour channels at output.
                 label_dim=0,                       # Number of class labels, 0 = unconditional.
                 augment_dim=0,                     # Augmentation label dimensionality, 0 = no augmentation.
                 model_channels=128,                # Base multiplier for the number of channels.
                 channel_mult=(1, 2, 2, 2),         # Per-resolution multipliers for the number of channels.
                 channel_mult_emb=4,                # Multiplier for the dimensionality of the embedding vector.
                 num_blocks=4,                      # Number of residual blocks per resolution.
                 attn_resolutions=(16,),            # Resolutions with self-attention.
                 dropout=0.10,                      # Dropout probability of intermediate activations.
                 label_dropout=0,                   # Dropout probability of class labels (classifier-free guidance).
                 embedding_type='positional',       # Noise embedding: 'positional' (DDPM++) or 'fourier' (NCSN++).
                 channel_mult_noise=1,              # Noise embedding size multiplier: 1 (DDPM++), 2 (NCSN++).
                 encoder_type='standard',           # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
                 decoder_type='standard',           # 'standard' (both) or 'skip'.
                 resample_filter=(1, 1),            # [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
                 ):
        for name, value, allowed in [('embedding_type', embedding_type, ('fourier', 'positional')),
                                     ('encoder_type', encoder_type, ('standard', 'skip', 'residual')),
                                     ('decoder_type', decoder_type, ('standard', 'skip'))]:
            if value not in allowed:
                raise ValueError(f'SongUNet: {name}={value!r}; expected one of {", ".join(allowed)}')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=float(np.sqrt(0.2)))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=float(np.sqrt(0.5)), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping network: noise embedding (+ class label, + augment label) -> two layers.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        # No bias, so that augment_labels=None (sampling) equals all-zero labels.
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False,
                                  **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True,
                                                          **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0,
                                                               down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(
                        in_channels=caux, out_channels=cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True,
                                                         **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn,
                                                                **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels,
                                                             kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3,
                                                           **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping. Song et al.'s embedding is [sin, cos]; the shared layers produce [cos, sin], hence the swap.
        emb = self.map_noise(noise_labels)
        half = emb.shape[1] // 2
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * float(np.sqrt(self.map_label.in_features)))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder. `aux` accumulates the image-space output (every level for decoder_type='skip').
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM U-Net of Dhariwal & Nichol ("Diffusion Models Beat GANs on Image Synthesis") as configured by EDM."""

    def __init__(self,
                 img_resolution,                    # Image resolution at input/output.
                 in_channels,                       # Number of colour channels at input.
                 out_channels,                      # Number of colour channels at output.
                 label_dim=0,                       # Number of class labels, 0 = unconditional.
                 augment_dim=0,                     # Augmentation label dimensionality, 0 = no augmentation.
                 model_channels=192,                # Base multiplier for the number of channels.
                 channel_mult=(1, 2, 3, 4),         # Per-resolution multipliers for the number of channels.
                 channel_mult_emb=4,                # Multiplier for the dimensionality of the embedding vector.
                 num_blocks=3,                      # Number of residual blocks per resolution.
                 attn_resolutions=(32, 16, 8),      # Resolutions with self-attention.
                 dropout=0.10,                      # Dropout probability of intermediate activations.
                 label_dropout=0,                   # Dropout probability of class labels (classifier-free guidance).
                 ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=float(np.sqrt(1 / 3)), init_bias=float(np.sqrt(1 / 3)))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False,
                                  **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(
            in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal',
            init_weight=float(np.sqrt(label_dim))) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True,
                                                          **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True,
                                                         **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping; ADM adds the class embedding after the second layer.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
