"""Discriminators for GAN losses (GDD): a registry of classes, one contract.

    D = DISCRIMINATORS[name](img_resolution=, img_channels=, label_dim=, **options)
    D(images, class_labels) -> list of logit tensors [N, P_k]      images in [-1, 1], labels one-hot [N, label_dim]
    D.trainable_parameters() -> the parameters a GAN loss optimises (frozen feature networks are not among them)

A loss reduces each sample's logits as it likes; GDD takes, per sample, the sum over the list of the mean over each
tensor's P_k logits (its discriminator's "sum over heads of means"). `train()` keeps frozen feature networks in eval
mode (their BatchNorm statistics never change).

- `projected`: Projected GAN's multi-scale discriminator as StyleGAN-XL and GDD use it (Sauer et al. 2021, 2022;
  Zyriix/GDD pg_modules): per backbone, a frozen pretrained feature network (4 feature levels), a random frozen
  cross-channel mixing (1x1 convs) and cross-scale fusion (upsample x2 + 1x1 conv, coarse to fine), then 4 trainable
  mini-discriminators (spectral-norm 4x4 stride-2 conv + BatchNorm + LeakyReLU(0.2) down to 8x8, then a 4x4 conv to
  patch logits); class labels by projection onto a pretrained ImageNet class embedding. Backbones (BACKBONES):
  vgg16_bn (torchvision's weights; no package beyond torch), tf_efficientnet_lite0 and deit_base_distilled_patch16_224
  (architectures from the optional package timm). Weights come through dnnlib.util.open_url (download cache, sha256
  check, local-path override, an offline error naming the URL).
- `sn_cnn`: a small spectral-norm CNN patch discriminator with projection conditioning: no download, for CPU tests
  and small data sets.
"""

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from dnnlib import util
from torch_utils import distributed as dist
from torch_utils import persistence

__all__ = ['DISCRIMINATORS', 'BACKBONES', 'BackboneSpec', 'DiscriminatorUnavailableError', 'ProjectedDiscriminator',
           'SpectralNormCNN', 'build_discriminator', 'load_weights_file', 'CLASS_EMBEDDING_URL']


class DiscriminatorUnavailableError(RuntimeError):
    """A discriminator's pretrained weights or the package a backbone needs are missing."""


def _sn_conv(*args, **kwargs) -> nn.Module:
    return spectral_norm(nn.Conv2d(*args, **kwargs))


# ---------------------------------------------------------------------------------------------------------------------
# Weights: open_url with a checksum, a local override and an offline error that names the URL.


def load_weights_file(what: str, url: str, sha256: str | None, path: str | None = None, hint: str = '',
                      loader: Callable[[str], object] | None = None, verbose: bool = True):
    """The contents of `path` (a local file or URL given by the user) or of the canonical `url` (downloaded once into
    the dnnlib cache, checked against `sha256`: a full digest, or the 8-hex-digit prefix that torch.hub file names
    carry). loader(local_path) reads it (default: persistence.safe_torch_load, tensors only). Rank 0 fetches first."""
    source = path or url
    rank = dist.get_rank()
    # The checksum goes to open_url, which verifies the download before it enters the cache: checked only after
    # caching, a bad download stayed there and failed every later run. A user's own file (`path`) is not checked.
    checksum = f'sha256:{sha256}' if path is None and sha256 is not None else None
    if rank != 0:
        dist.barrier()
    try:
        try:
            # offline_hint='': the message below gives this file's own advice; open_url's generic one would repeat it
            local = util.open_url(source, return_filename=True, checksum=checksum, verbose=verbose and rank == 0,
                                  offline_hint='')
        except (OSError, ValueError) as err:
            cache = f', or save {url} as {util.url_cache_path(url)}' if path is None else ''
            raise DiscriminatorUnavailableError(
                f'could not fetch the {what} from {source}: {str(err).rstrip(".")}. For {what}: download {url} '
                f'elsewhere and {hint or "pass its local path"}{cache}') from err
        try:
            return (loader or persistence.safe_torch_load)(local)
        except DiscriminatorUnavailableError:
            raise
        except Exception as err:  # noqa: BLE001 -- a file of the wrong kind fails in many ways: name it.
            raise DiscriminatorUnavailableError(f'could not read the {what} from {local}: {type(err).__name__}: '
                                                f'{err}') from err
    finally:
        if rank == 0:
            dist.barrier()


def _state_dict(obj, what: str) -> dict:
    """A checkpoint's tensors: the dict itself, or its 'model' / 'state_dict' entry (DeiT's files)."""
    for key in ('model', 'state_dict'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DiscriminatorUnavailableError(f'the {what} file does not hold a state dict of tensors')
    return obj


def _load_strict(module: nn.Module, state: dict, what: str, ignore=()) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore))}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DiscriminatorUnavailableError(f'the {what} weights do not fit the architecture: missing '
                                            f'{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}')


def _import_timm(backbone: str):
    try:
        import timm
    except ImportError as err:
        raise DiscriminatorUnavailableError(
            f'the projected discriminator\'s backbone {backbone!r} needs the optional package timm (pip install '
            f'timm), which is not installed; or choose backbones that need none (vgg16_bn), or the sn_cnn '
            f'discriminator') from err
    return timm


def check_packages(backbones) -> None:
    """Raises DiscriminatorUnavailableError if a backbone needs an optional package that is not installed. train.py
    asks before the run starts (and before --dry-run says the options are fine): the discriminator itself is built
    only after the run directory exists."""
    for name in backbones:
        if BACKBONES[name].package is not None:
            _import_timm(name)


# ---------------------------------------------------------------------------------------------------------------------
# Backbones: frozen pretrained feature networks with 4 feature levels (Projected GAN's splits).

IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's tf_* models (Projected GAN's grouping)

# torchvision's vgg16_bn().features: 3x3 conv + BatchNorm + ReLU per number, 'M' = 2x2 max pool.
_VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')


class VGG16BNFeatures(nn.Module):
    """torchvision's vgg16_bn feature stack, split at layers 13, 23, 33, 43 (Projected GAN): 128, 256, 512, 512
    channels at strides 2, 4, 8, 16. Written out here, so its state-dict keys are torchvision's `features.N.*`."""

    splits = (0, 13, 23, 33, 43)
    channels = (128, 256, 512, 512)

    def __init__(self, state: dict | None = None):
        super().__init__()
        layers, c_in = [], 3
        for v in _VGG16_CFG:
            if v == 'M':
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers[:self.splits[-1]])
        if state is not None:
            _load_strict(self, state, 'vgg16_bn', ignore=('classifier.', 'features.43'))

    def forward(self, x):
        outputs = []
        for start, stop in zip(self.splits[:-1], self.splits[1:]):
            for index in range(start, stop):
                x = self.features[index](x)
            outputs.append(x)
        return outputs


class EfficientNetFeatures(nn.Module):
    """timm's EfficientNet split as Projected GAN's _make_efficientnet: stem + blocks 0-1, block 2, blocks 3-4,
    blocks 5-6 (tf_efficientnet_lite0: 24, 40, 112, 320 channels at strides 4, 8, 16, 32)."""

    def __init__(self, name: str, state: dict | None = None):
        super().__init__()
        model = _import_timm(name).create_model(name, pretrained=False)
        if state is not None:
            _load_strict(model, state, name)
        stem = [model.conv_stem, model.bn1] + ([model.act1] if hasattr(model, 'act1') else [])  # timm < 0.9
        self.layers = nn.ModuleList([nn.Sequential(*stem, *model.blocks[0:2]), nn.Sequential(*model.blocks[2:3]),
                                     nn.Sequential(*model.blocks[3:5]), nn.Sequential(*model.blocks[5:9])])
        with torch.no_grad():
            self.channels = tuple(int(f.shape[1]) for f in self.eval()(torch.zeros(1, 3, 32, 32)))

    def forward(self, x):
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return outputs


class ViTFeatures(nn.Module):
    """A DeiT/ViT-B/16 read out after blocks 2, 5, 8, 11 (Projected GAN's vit.py, DPT's layout): the prefix tokens
    dropped ('ignore' readout), the 14x14 token grids turned into maps of 96, 192, 384, 768 channels at 4x, 2x, 1x
    and 0.5x the grid (random frozen 1x1 convs, then a 4x4 / 2x2 transposed conv or a 3x3 stride-2 conv)."""

    hooks = (2, 5, 8, 11)
    channels = (96, 192, 384, 768)

    def __init__(self, name: str, state: dict | None = None):
        super().__init__()
        model = _import_timm(name).create_model(name, pretrained=False)
        if state is not None:
            _load_strict(model, state, name)
        width = model.embed_dim
        self.patch_size = 16
        self.patch_embed = model.patch_embed.proj
        self.cls_token = model.cls_token
        self.dist_token = getattr(model, 'dist_token', None)
        self.pos_embed = model.pos_embed
        self.blocks = model.blocks[:self.hooks[-1] + 1]
        self.num_prefix = 1 + (self.dist_token is not None)
        c = self.channels
        self.post = nn.ModuleList([
            nn.Sequential(nn.Conv2d(width, c[0], 1), nn.ConvTranspose2d(c[0], c[0], 4, stride=4)),
            nn.Sequential(nn.Conv2d(width, c[1], 1), nn.ConvTranspose2d(c[1], c[1], 2, stride=2)),
            nn.Sequential(nn.Conv2d(width, c[2], 1)),
            nn.Sequential(nn.Conv2d(width, c[3], 1), nn.Conv2d(c[3], c[3], 3, stride=2, padding=1)),
        ])

    def forward(self, x):
        height, width = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        pos_prefix, pos_grid = self.pos_embed[:, :self.num_prefix], self.pos_embed[0, self.num_prefix:]
        side = int(math.sqrt(pos_grid.shape[0]))
        if (side, side) != (height, width):  # Other input sizes: the position grid resized (bilinear), as DPT.
            pos_grid = pos_grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            pos_grid = F.interpolate(pos_grid, size=(height, width), mode='bilinear', align_corners=False)
            pos_grid = pos_grid.permute(0, 2, 3, 1).reshape(1, height * width, -1)
        else:
            pos_grid = pos_grid[None]
        x = torch.cat([*prefix, tokens], dim=1) + torch.cat([pos_prefix, pos_grid], dim=1)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.hooks:
                grid = x[:, self.num_prefix:].transpose(1, 2).unflatten(2, (height, width))
                outputs.append(self.post[len(outputs)](grid))
        return outputs


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A pretrained feature network: build(state dict or None) -> module whose forward gives 4 feature maps and
    whose `channels` lists their widths; where its weights come from; its input normalisation; whether it always
    sees 224 x 224 inputs (ViTs); the optional package it needs."""

    build: Callable[[dict | None], nn.Module]
    url: str
    sha256: str | None
    normalization: tuple
    fixed_224: bool = False
    package: str | None = None


BACKBONES = {
    'vgg16_bn': BackboneSpec(VGG16BNFeatures, 'https://download.pytorch.org/models/vgg16_bn-6c64b313.pth', '6c64b313',
                             IMAGENET_NORMALIZATION),
    'tf_efficientnet_lite0': BackboneSpec(
        lambda state: EfficientNetFeatures('tf_efficientnet_lite0', state),
        'https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/'
        'tf_efficientnet_lite0-0aa007d2.pth', '0aa007d2', INCEPTION_NORMALIZATION, package='timm'),
    'deit_base_distilled_patch16_224': BackboneSpec(
        lambda state: ViTFeatures('deit_base_distilled_patch16_224', state),
        'https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth', 'df68dfff',
        IMAGENET_NORMALIZATION, fixed_224=True, package='timm'),
}

# StyleGAN-XL's ImageNet class embedding (1000 x 320, from tf_efficientnet_lite0's classifier), which GDD ships as
# in_embeddings/tf_efficientnet_lite0.pkl; CIFAR-10's classes use its rows 0-9.
# Image channels the projected discriminator's ImageNet feature networks read (grey is repeated to RGB).
PROJECTED_CHANNELS = (1, 3)
CLASS_EMBEDDING_URL = 'https://github.com/Zyriix/GDD/raw/main/in_embeddings/tf_efficientnet_lite0.pkl'
CLASS_EMBEDDING_SHA256 = 'c109f9a8a2371b78fbd464adaa51f82a4c0015db131b98ad74d8e63e0edcf2c6'


def _read_class_embedding(path: str) -> torch.Tensor:
    """The weight of the pickled torch.nn.Embedding in {'embed': ...}, read through the safe unpickler."""
    with open(path, 'rb') as f:
        data = persistence.safe_pickle.load(f)
    embed = data.get('embed') if isinstance(data, dict) else None
    weight = getattr(embed, 'weight', None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise DiscriminatorUnavailableError(f"{path}: expected {{'embed': torch.nn.Embedding}}")
    return weight.detach().clone()


# ---------------------------------------------------------------------------------------------------------------------
# The projected discriminator.


class FeatureFusion(nn.Module):
    """Cross-scale mixing (Projected GAN's FeatureFusionBlock): (x + skip), bilinear x2 (align_corners), 1x1 conv."""

    def __init__(self, channels: int, expand: bool):
        super().__init__()
        self.out_conv = nn.Conv2d(channels, channels // 2 if expand else channels, 1)

    def forward(self, x, skip=None):
        if skip is not None:
            x = x + skip
        x = F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)
        return self.out_conv(x)


class FeatureNetwork(nn.Module):
    """A frozen backbone and its random frozen projection (Projected GAN's F_RandomProj, proj_type 2): input
    [-1, 1] -> [0, 1] -> the backbone's normalisation -> (bilinear 224 x 224) -> 4 levels -> cross-channel mixing
    (1x1 convs to cout x 1, 2, 4, 8 channels with expand) -> cross-scale fusion, coarse to fine."""

    def __init__(self, spec: BackboneSpec, state: dict | None, resize_224: bool, cout: int = 64, expand: bool = True):
        super().__init__()
        self.backbone = spec.build(state)
        mean, std = spec.normalization
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1))
        self.resize_224 = resize_224 or spec.fixed_224
        mixed = [cout, cout * 2, cout * 4, cout * 8] if expand else [cout] * 4
        self.mix = nn.ModuleList([nn.Conv2d(c_in, c_out, 1) for c_in, c_out in zip(self.backbone.channels, mixed)])
        self.fuse = nn.ModuleList([None] * 4)  # built coarse to fine, as Projected GAN
        self.fuse[3] = FeatureFusion(mixed[3], expand)
        self.fuse[2] = FeatureFusion(mixed[2], expand)
        self.fuse[1] = FeatureFusion(mixed[1], expand)
        self.fuse[0] = FeatureFusion(mixed[0], False)
        self.channels = (cout, cout, cout * 2, cout * 4) if expand else (cout,) * 4

    def forward(self, images):
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        x = (images.add(1).div(2) - self.mean) / self.std
        if self.resize_224:
            x = F.interpolate(x, size=(224, 224), mode='bilinear', align_corners=False)
        mixed = [mix(f) for mix, f in zip(self.mix, self.backbone(x))]
        out3 = self.fuse[3](mixed[3])
        out2 = self.fuse[2](out3, mixed[2])
        out1 = self.fuse[1](out2, mixed[1])
        out0 = self.fuse[0](out1, mixed[0])
        return [out0, out1, out2, out3]


class _FullyConnected(nn.Module):
    """StyleGAN2's FullyConnectedLayer with activation 'lrelu': lrelu(x W^T / sqrt(in) + b, 0.2) * sqrt(2)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        x = F.linear(x, self.weight * (1 / np.sqrt(self.weight.shape[1])), self.bias)
        return F.leaky_relu(x, 0.2) * np.sqrt(2)


# Projected GAN's channel table of the mini-discriminators, by feature resolution.
_MINI_CHANNELS = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}


class MiniDiscriminator(nn.Module):
    """Projected GAN's SingleDisc / SingleDiscCond: 4x4 stride-2 spectral-norm convs + BatchNorm + LeakyReLU(0.2)
    from the (nominal) feature resolution down to `end_res`, then a 4x4 conv to patch logits; conditional: the conv
    gives cmap_dim channels, projected onto FC(class embedding[argmax c])."""

    def __init__(self, in_channels: int, start_res: int, end_res: int, class_embedding: torch.Tensor | None = None,
                 cmap_dim: int = 64):
        super().__init__()
        sizes = np.array(list(_MINI_CHANNELS))
        start_res = int(sizes[np.argmin(np.abs(sizes - start_res))]) if start_res not in _MINI_CHANNELS else start_res
        channels = dict(_MINI_CHANNELS)
        channels[start_res] = in_channels
        layers, res = [], start_res
        while res > end_res:
            layers += [_sn_conv(channels[res], channels[res // 2], 4, 2, 1, bias=True),
                       nn.BatchNorm2d(channels[res // 2]), nn.LeakyReLU(0.2)]
            res //= 2
        kernel = 4 if end_res >= 8 else max(1, end_res // 2)
        self.main = nn.Sequential(*layers)
        self.conditional = class_embedding is not None
        self.cmap_dim = cmap_dim
        self.out = _sn_conv(channels[end_res], cmap_dim if self.conditional else 1, kernel, 1, 0, bias=False)
        if self.conditional:
            self.embed = nn.Embedding(*class_embedding.shape)
            with torch.no_grad():
                self.embed.weight.copy_(class_embedding)
            self.embed_proj = _FullyConnected(class_embedding.shape[1], cmap_dim)

    def forward(self, x, class_labels=None):
        out = self.out(self.main(x))
        if self.conditional:
            cmap = self.embed_proj(self.embed(class_labels.argmax(1)))[:, :, None, None]
            out = (out * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        return out.flatten(1)


class ProjectedDiscriminator(nn.Module):
    """Projected GAN / StyleGAN-XL's discriminator as GDD configures it (see the module doc): per backbone a frozen
    FeatureNetwork and `num_discs` trainable mini-discriminators; returns one [N, P] logit tensor per backbone (its
    mini-discriminators' patch logits side by side).

    weights: {backbone: local path or URL} instead of the canonical files; class_embedding: a local path or URL of
    the class embedding pickle, or 'random' (N(0, 1), StyleGAN-XL's rand_embedding); interp224: resize inputs to
    224 x 224 (GDD: always, below 224). Mini-discriminator depths follow Projected GAN's nominal resolutions: a 256 x
    256 input's (interp224) or the image's, /4 ... /32, doubled by the fusion.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0,
                 backbones=('vgg16_bn', 'tf_efficientnet_lite0'), weights: dict | None = None,
                 class_embedding: str | None = None, cout: int = 64, expand: bool = True, num_discs: int = 4,
                 interp224: bool = True, verbose: bool = True):
        super().__init__()
        backbones = list(backbones)
        unknown = [name for name in backbones if name not in BACKBONES]
        if not backbones or unknown:
            raise ValueError(f'unknown backbone(s) {unknown or backbones}; known: {", ".join(BACKBONES)}')
        if img_channels not in PROJECTED_CHANNELS:
            raise ValueError(f'the projected discriminator reads RGB (or grey) images, not {img_channels} channels')
        if not 1 <= num_discs <= 4:
            raise ValueError(f'num_discs must be 1..4, got {num_discs}')
        weights = dict(weights or {})
        extra = set(weights) - set(backbones)
        if extra:
            raise ValueError(f'weights given for {sorted(extra)}, which are not among the backbones {backbones}')
        resize_224 = interp224 and img_resolution < 224
        nominal = 256 if resize_224 else img_resolution
        # Projected GAN's levels at 1/4 .. 1/32 of the input, floored, then doubled by the cross-scale mixing.
        resolutions = [(nominal // 2 ** k) * 2 for k in (2, 3, 4, 5)][:num_discs]
        end_res = 8 if resolutions[-1] >= 8 else resolutions[-1]
        embedding = None
        if label_dim:
            embedding = self._class_embedding(class_embedding, label_dim, verbose)
        check_packages(backbones)  # Before any download: say first what is missing.
        self.backbones = backbones
        self.features = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for name in backbones:
            spec = BACKBONES[name]
            state = load_weights_file(f'{name} backbone weights', spec.url, spec.sha256, weights.get(name),
                                      hint=f'pass --loss-opt disc_weights={name}=PATH', verbose=verbose)
            features = FeatureNetwork(spec, _state_dict(state, name), resize_224, cout, expand)
            self.features[name] = features.requires_grad_(False).eval()
            self.heads[name] = nn.ModuleDict({
                str(k): MiniDiscriminator(features.channels[k], resolutions[k], end_res, embedding)
                for k in range(num_discs)})

    @staticmethod
    def _class_embedding(source: str | None, label_dim: int, verbose: bool) -> torch.Tensor:
        if source == 'random':
            return torch.randn(max(label_dim, 1000), 320)
        weight = load_weights_file('class embedding', CLASS_EMBEDDING_URL, CLASS_EMBEDDING_SHA256, source,
                                   hint='pass --loss-opt disc_embedding=PATH', loader=_read_class_embedding,
                                   verbose=verbose)
        if label_dim > weight.shape[0]:
            raise ValueError(f'{label_dim} classes, but the class embedding has {weight.shape[0]} rows')
        return weight

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # Frozen feature networks: BatchNorm in inference mode throughout.
        return self

    def trainable_parameters(self) -> list:
        return list(self.heads.parameters())

    def forward(self, images, class_labels=None):
        logits = []
        for name in self.backbones:
            feats = self.features[name](images)
            logits.append(torch.cat([head(feats[int(k)], class_labels) for k, head in self.heads[name].items()], 1))
        return logits


# ---------------------------------------------------------------------------------------------------------------------
# A small discriminator without downloads.


class SpectralNormCNN(nn.Module):
    """A patch discriminator on the pixels: a 3x3 spectral-norm conv, then 4x4 stride-2 spectral-norm convs with
    LeakyReLU(0.2) (channels doubling up to max_channels) down to min_resolution, then a 3x3 conv to patch logits;
    class labels by projection (Miyato & Koyama 2018): + <h, E c> / sqrt(C) per patch. Returns [logits [N, P]]."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, channels: int = 64,
                 max_channels: int = 256, min_resolution: int = 4):
        super().__init__()
        layers, res, c = [_sn_conv(img_channels, channels, 3, 1, 1), nn.LeakyReLU(0.2)], img_resolution, channels
        while res > min_resolution:
            c_next = min(c * 2, max_channels)
            layers += [_sn_conv(c, c_next, 4, 2, 1), nn.LeakyReLU(0.2)]
            c, res = c_next, res // 2
        self.main = nn.Sequential(*layers)
        self.out = _sn_conv(c, 1, 3, 1, 1)
        self.embed = spectral_norm(nn.Linear(label_dim, c, bias=False)) if label_dim else None

    def trainable_parameters(self) -> list:
        return list(self.parameters())

    def forward(self, images, class_labels=None):
        h = self.main(images)
        out = self.out(h)
        if self.embed is not None:
            out = out + (h * self.embed(class_labels.to(h.dtype))[:, :, None, None]).sum(1, keepdim=True) \
                * (1 / np.sqrt(h.shape[1]))
        return [out.flatten(1)]


DISCRIMINATORS = {
    'projected': ProjectedDiscriminator,
    'sn_cnn': SpectralNormCNN,
}


def build_discriminator(name: str, *, img_resolution: int, img_channels: int, label_dim: int, **options):
    """DISCRIMINATORS[name](...), with a one-line error for an unknown name."""
    if name not in DISCRIMINATORS:
        raise ValueError(f'unknown discriminator {name!r}; expected one of {", ".join(DISCRIMINATORS)}')
    return DISCRIMINATORS[name](img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                **options)
