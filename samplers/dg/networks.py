"""The networks of discriminator guidance: ADM's noise-conditional encoder U-Net (Dhariwal & Nichol 2021), used both
as DG's frozen feature extractor (guided-diffusion's 32x32 classifier) and as DG's trainable discriminator head.

One class, `ADMEncoderUNet`, in the configuration family DG uses (Kim et al. 2023, alsdudrla10/DG): residual blocks
with scale-shift normalisation, down-sampling by residual blocks, self-attention with the "legacy" head order in the
blocks, attention pooling at the output, an optional class embedding. Module and parameter names are
guided-diffusion's (`time_embed.0`, `input_blocks.1.0.in_layers.2`, `middle_block.1.qkv`, `out.2.c_proj`, ...), so the
published state dicts (`32x32_classifier.pt`, `discriminator_60.pt`) copy in key for key.

Time input: VP time t in [0, 1]; the network embeds 999 t (ADM's discrete step index scale) sinusoidally.

Persistence constraint: DG pickles embed this file's source, so it imports only torch and
`torch_utils.persistence`. Layers are persistent classes built from plain numbers, inside plain torch containers.
"""

import math

import torch
import torch.nn.functional as F

from torch_utils import persistence

ADM_TIME_SCALE = 999.0  # ADM embeds the discrete step index; DG feeds VP time t in [0, 1] scaled by 999.
GROUPS = 32  # guided-diffusion's normalization(): GroupNorm(32, channels)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / (dim // 2)), k < dim // 2 (ADM's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].to(torch.float32) * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _group_norm(channels):
    return torch.nn.GroupNorm(GROUPS, channels)


@persistence.persistent_class
class Conv1x1(torch.nn.Module):
    """A 1-D convolution with kernel 1 over [N, C, L] (a per-position linear map), stored as torch's Conv1d stores
    it (weight [out, in, 1], bias [out]) so guided-diffusion's state dicts load; torch's Conv1d is not on the safe
    importer's list of plain layers."""

    def __init__(self, in_channels, out_channels, zero_init=False):
        super().__init__()
        reference = torch.nn.Conv1d(in_channels, out_channels, 1)  # torch's default initialisation
        self.weight = torch.nn.Parameter(reference.weight.detach().clone())
        self.bias = torch.nn.Parameter(reference.bias.detach().clone())
        if zero_init:
            with torch.no_grad():
                self.weight.zero_()
                self.bias.zero_()

    def forward(self, x):
        return F.conv1d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


@persistence.persistent_class
class ResBlock(torch.nn.Module):
    """ADM's residual block with scale-shift normalisation, optionally down-sampling (2x2 average pooling of both
    paths between the input normalisation and the first convolution)."""

    def __init__(self, channels, emb_channels, out_channels=None, down=False, dropout=0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.channels, self.out_channels, self.down = channels, out_channels, bool(down)
        self.in_layers = torch.nn.Sequential(_group_norm(channels), torch.nn.SiLU(),
                                             torch.nn.Conv2d(channels, out_channels, 3, padding=1))
        pool = torch.nn.AvgPool2d(kernel_size=2, stride=2) if down else torch.nn.Identity()
        self.h_upd, self.x_upd = pool, pool
        self.emb_layers = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(emb_channels, 2 * out_channels))
        last = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        with torch.no_grad():  # ADM zero-initialises the last convolution of every block
            last.weight.zero_()
            last.bias.zero_()
        self.out_layers = torch.nn.Sequential(_group_norm(out_channels), torch.nn.SiLU(), torch.nn.Dropout(dropout),
                                              last)
        self.skip_connection = (torch.nn.Identity() if out_channels == channels
                                else torch.nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        if self.down:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(x) + h


def _attention(q, k, v):
    """softmax_s(q_t . k_s / sqrt(c)) v_s over [B, c, T] tensors, with ADM's split of the scale between q and k and
    its fp32 softmax."""
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


@persistence.persistent_class
class AttentionBlock(torch.nn.Module):
    """Self-attention over pixels; heads of `head_channels` channels; qkv laid out head by head ([q_h k_h v_h] per
    head: guided-diffusion's QKVAttentionLegacy order, its default)."""

    def __init__(self, channels, head_channels=64):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"AttentionBlock: {channels} channels are not a multiple of {head_channels} per head")
        self.num_heads = channels // head_channels
        self.norm = _group_norm(channels)
        self.qkv = Conv1x1(channels, 3 * channels)
        self.proj_out = Conv1x1(channels, channels, zero_init=True)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        q, k, v = qkv.reshape(b * self.num_heads, 3 * c // self.num_heads, -1).chunk(3, dim=1)
        h = self.proj_out(_attention(q, k, v).reshape(b, c, -1))
        return (x + h).reshape(b, c, *spatial)


@persistence.persistent_class
class AttentionPool2d(torch.nn.Module):
    """CLIP's attention pooling: the mean over pixels is prepended as a query token, a learned positional embedding
    is added, and one attention layer (qkv laid out q, k, v for all heads: guided-diffusion's QKVAttention order)
    gives the output at that token."""

    def __init__(self, spatial_dim, embed_dim, head_channels, output_dim):
        super().__init__()
        self.positional_embedding = torch.nn.Parameter(torch.randn(embed_dim, spatial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = Conv1x1(embed_dim, 3 * embed_dim)
        self.c_proj = Conv1x1(embed_dim, output_dim)
        self.num_heads = embed_dim // head_channels

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        q, k, v = self.qkv_proj(x).chunk(3, dim=1)
        heads = b * self.num_heads
        a = _attention(q.reshape(heads, c // self.num_heads, -1), k.reshape(heads, c // self.num_heads, -1),
                       v.reshape(heads, c // self.num_heads, -1))
        return self.c_proj(a.reshape(b, c, -1))[:, :, 0]


@persistence.persistent_class
class ADMEncoderUNet(torch.nn.Module):
    """ADM's encoder U-Net: input convolution, `num_res_blocks` residual blocks per level (with attention where the
    down-sampling factor is in `attention_ds`), a down-sampling residual block between levels, a middle block
    (residual, attention, residual), and an output head (GroupNorm, SiLU, attention pooling to `out_channels`).

    `features(x, t)` returns the middle block's output ([N, C_last, image_size / 2^(levels-1), ...]: DG's features);
    `forward(x, t)` the output head's [N, out_channels]. t: VP time in [0, 1] per sample ([N] or a scalar).
    class_labels: one-hot [N, num_classes] (argmax taken) or indices [N], when `condition` is on.
    """

    def __init__(self,
                 image_size,                # Input resolution.
                 in_channels,               # Input channels (3 for images; the feature channels for a DG head).
                 model_channels,            # Base width.
                 out_channels,              # Outputs of the head (1000 ImageNet classes; 1 logit for a discriminator).
                 num_res_blocks,            # Residual blocks per level.
                 attention_ds=(),           # Down-sampling factors (1, 2, 4, ...) with self-attention.
                 channel_mult=(1, 2, 4),    # Width multipliers per level.
                 head_channels=64,          # Channels per attention head.
                 condition=False,           # Add a class embedding to the time embedding?
                 num_classes=1000,          # Rows of the class embedding (DG's discriminators keep ADM's 1000).
                 dropout=0.0,               # Dropout in the residual blocks.
                 ):
        super().__init__()
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.condition = model_channels, bool(condition)
        emb_channels = 4 * model_channels
        self.time_embed = torch.nn.Sequential(torch.nn.Linear(model_channels, emb_channels), torch.nn.SiLU(),
                                              torch.nn.Linear(emb_channels, emb_channels))
        self.label_emb = torch.nn.Embedding(num_classes, emb_channels) if self.condition else None

        ch = int(channel_mult[0] * model_channels)
        blocks = [torch.nn.Sequential(torch.nn.Conv2d(in_channels, ch, 3, padding=1))]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb_channels, int(mult * model_channels), dropout=dropout)]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, head_channels))
                blocks.append(torch.nn.Sequential(*layers))
            if level != len(channel_mult) - 1:
                blocks.append(torch.nn.Sequential(ResBlock(ch, emb_channels, ch, down=True, dropout=dropout)))
                ds *= 2
        self.input_blocks = torch.nn.ModuleList(blocks)
        self.middle_block = torch.nn.Sequential(ResBlock(ch, emb_channels, dropout=dropout),
                                                AttentionBlock(ch, head_channels),
                                                ResBlock(ch, emb_channels, dropout=dropout))
        self.feature_channels = ch
        self.feature_resolution = image_size // ds
        self.out = torch.nn.Sequential(_group_norm(ch), torch.nn.SiLU(),
                                       AttentionPool2d(image_size // ds, ch, head_channels, out_channels))

    def _embedding(self, t, class_labels, batch_size):
        t = torch.as_tensor(t, dtype=torch.float32, device=self.time_embed[0].weight.device)
        t = t.reshape(-1).expand(batch_size) if t.numel() == 1 else t.reshape(-1)
        emb = self.time_embed(timestep_embedding(t * ADM_TIME_SCALE, self.model_channels))
        if self.condition:
            if class_labels is None:
                raise ValueError("ADMEncoderUNet: this network is class-conditional; pass class_labels")
            index = class_labels if class_labels.ndim == 1 else class_labels.argmax(dim=1)
            emb = emb + self.label_emb(index.to(torch.int64))
        return emb

    @staticmethod
    def _run(blocks, h, emb):
        for layer in blocks:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def features(self, x, t, class_labels=None):
        """The middle block's output for input x [N, C, H, W] at VP time t."""
        emb = self._embedding(t, class_labels, x.shape[0])
        h = x.to(torch.float32)
        for block in self.input_blocks:
            h = self._run(block, h, emb)
        return self._run(self.middle_block, h, emb)

    def head(self, h):
        """The output head on middle-block features."""
        return self.out(h)

    def forward(self, x, t, class_labels=None):
        return self.head(self.features(x, t, class_labels))


# The image sizes of guided-diffusion's classifier configurations (`adm_classifier_kwargs`).
ADM_CLASSIFIER_SIZES = (8, 16, 32, 64, 128)


def adm_classifier_kwargs(image_size=32):
    """guided-diffusion's `create_classifier` configuration of DG's feature extractor (`32x32_classifier.pt`):
    width 128, depth 4 (2 above 64 px), attention at 32, 16, 8 px, attention pooling, 1000 classes."""
    channel_mult = {8: (1,), 16: (1, 2), 32: (1, 2, 4), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4)}.get(image_size)
    if channel_mult is None:
        raise ValueError(f"no ADM classifier configuration for {image_size}x{image_size} images (8, 16, 32, 64, 128)")
    return dict(image_size=image_size, in_channels=3, model_channels=128, out_channels=1000,
                num_res_blocks=4 if image_size in (32, 64) else 2, channel_mult=channel_mult,
                attention_ds=tuple(image_size // res for res in (32, 16, 8)), head_channels=64)


def dg_head_kwargs(feature_resolution, feature_channels, *, width=128, depth=2, head_channels=64, condition=False,
                   num_classes=1000):
    """DG's discriminator head on encoder features (alsdudrla10/DG's `load_discriminator`): an ADM encoder U-Net of
    one level (width 128, depth 2, attention at that level, attention pooling) with one output logit and, when
    conditional, a class embedding. Its attention resolutions "32,16,8" leave, at 8x8 features, attention at the
    first level only; the same rule is kept at any feature resolution."""
    return dict(image_size=int(feature_resolution), in_channels=int(feature_channels), model_channels=int(width),
                out_channels=1, num_res_blocks=int(depth), channel_mult=(1,), attention_ds=(1,),
                head_channels=int(head_channels), condition=bool(condition), num_classes=int(num_classes))

