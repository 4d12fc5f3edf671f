"""LPIPS(vgg) v0.1 (Zhang et al., CVPR 2018) as a differentiable per-sample distance, for LD3's objective.

The network is written out here (torchvision's VGG16 feature stack and the LPIPS linear heads), so neither torchvision
nor the lpips package is needed; the weights are read from their canonical files with persistence.safe_torch_load
(the format checked, then torch.load(weights_only=True)), downloaded once into the dnnlib cache or given as local
paths.
"""


import torch
import torch.nn.functional as F

from dnnlib import util
from torch_utils import persistence

# LPIPS(vgg) v0.1 (Zhang et al. 2018), the distance LD3 uses: torchvision's ImageNet VGG16 and the LPIPS linear
# heads. 397923af is the start of the sha256 of torchvision's file (its naming convention).
LPIPS_VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_VGG16_SHA256_PREFIX = "397923af"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
VGG16_LAYERS = (  # torchvision vgg16().features: (index, in, out) of each conv; 'M' = 2x2 max pool
    (0, 3, 64), (2, 64, 64), "M", (5, 64, 128), (7, 128, 128), "M", (10, 128, 256), (12, 256, 256), (14, 256, 256),
    "M", (17, 256, 512), (19, 512, 512), (21, 512, 512), "M", (24, 512, 512), (26, 512, 512), (28, 512, 512))
_LPIPS_TAPS = (2, 7, 14, 21, 28)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (after these convs)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPSUnavailableError(RuntimeError):
    """The LPIPS weights could not be fetched or read."""


class LPIPS(torch.nn.Module):
    """LPIPS(vgg) distance per sample, differentiable, for images in [-1, 1] with 1 or 3 channels.

    d(x, y) = sum_l mean_hw w_l . (n(f_l(x)) - n(f_l(y)))^2, n = unit norm over channels (as the lpips package,
    version 0.1). resize: bilinear resize to resize x resize first (LD3 compares CIFAR images at 32 x 32; the five
    VGG stages need at least 16 x 16).
    """

    def __init__(self, vgg_state: dict, lin_state: dict, resize: int | None = None):
        super().__init__()
        self.convs = torch.nn.ModuleList()
        for layer in VGG16_LAYERS:
            if layer == "M":
                continue
            index, c_in, c_out = layer
            conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
            conv.weight.data.copy_(_state_tensor(vgg_state, f"features.{index}.weight", (c_out, c_in, 3, 3)))
            conv.bias.data.copy_(_state_tensor(vgg_state, f"features.{index}.bias", (c_out,)))
            self.convs.append(conv)
        self.lins = torch.nn.ParameterList()
        for k, channels in enumerate((64, 128, 256, 512, 512)):
            self.lins.append(torch.nn.Parameter(_state_tensor(lin_state, f"lin{k}.model.1.weight",
                                                              (1, channels, 1, 1)).clone()))
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))
        self.resize = resize
        self.requires_grad_(False).eval()

    def _features(self, x):
        taps, conv_iter = [], iter(self.convs)
        for layer in VGG16_LAYERS:
            if layer == "M":
                x = F.max_pool2d(x, 2)
                continue
            x = F.relu(next(conv_iter)(x))
            if layer[0] in _LPIPS_TAPS:
                taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS compares NCHW images with 1 or 3 channels, got shape {tuple(x.shape)}")
        images = torch.cat([x, y]).to(torch.float32)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        if self.resize is not None and tuple(images.shape[2:]) != (self.resize, self.resize):
            images = F.interpolate(images, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        if min(images.shape[2:]) < 16:
            raise ValueError(f"LPIPS(vgg) needs images of at least 16 x 16 pixels, got {tuple(images.shape[2:])}: "
                             f"set lpips_resize (--lpips-resize), e.g. 32")
        images = (images - self.shift) / self.scale
        distance = 0
        for taps, lin in zip(self._features(images), self.lins):
            norm = taps.square().sum(1, keepdim=True).add(1e-20).sqrt()  # lpips: f / (|f| + 1e-10); finite grads
            f_x, f_y = (taps / (norm + 1e-10)).chunk(2)
            distance = distance + F.conv2d((f_x - f_y).square(), lin).mean([1, 2, 3])
        return distance


def _state_tensor(state: dict, key: str, shape: tuple) -> torch.Tensor:
    if key not in state:
        raise LPIPSUnavailableError(f"the LPIPS weights lack {key!r}")
    tensor = state[key]
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(shape):
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise LPIPSUnavailableError(f"LPIPS weight {key!r} should have shape {shape}, got {got}")
    return tensor.to(torch.float32)


def _lpips_hint() -> str:
    # The cache finds a file only under its URL's exact cache name: a file merely put into the cache folder is not used.
    return (f"LPIPS needs torchvision's VGG16 weights ({LPIPS_VGG16_URL}) and the LPIPS v0.1 linear weights "
            f"({LPIPS_LIN_URL}; the lpips pip package ships them as lpips/weights/v0.1/vgg.pth). Offline, fetch both "
            f"elsewhere and pass --lpips-vgg PATH --lpips-lin PATH to ld3.py train (library: load_lpips(vgg, lin)), "
            f"or save them as {util.url_cache_path(LPIPS_VGG16_URL)} and {util.url_cache_path(LPIPS_LIN_URL)} (the "
            f"files the download cache looks for; $DNNLIB_CACHE_DIR moves it); or train LD3 with --loss l2 or l1.")


def load_lpips(vgg: str | None = None, lin: str | None = None, *, resize: int | None = None,
               device=None, verbose: bool = True) -> LPIPS:
    """LPIPS(vgg) from local paths or URLs (None: the canonical URLs, downloaded once into the dnnlib cache).
    Weights are read with persistence.safe_torch_load: no code runs."""
    states = []
    for what, source, default in (("VGG16", vgg, LPIPS_VGG16_URL), ("linear", lin, LPIPS_LIN_URL)):
        url = source or default
        # The canonical VGG16 file is verified by open_url before it enters the cache (verified after, a bad download
        # stayed cached and failed every later run). The linear weights have no published checksum: not checked.
        checksum = f"sha256:{LPIPS_VGG16_SHA256_PREFIX}" if source is None and default == LPIPS_VGG16_URL else None
        try:
            # offline_hint='': _lpips_hint() below gives the advice; open_url's generic one would repeat it
            path = util.open_url(url, return_filename=True, checksum=checksum, verbose=verbose, offline_hint="")
        except (OSError, ValueError) as err:
            raise LPIPSUnavailableError(f"could not fetch the LPIPS {what} weights from {url}: {err}\n"
                                        f"{_lpips_hint()}") from err
        try:
            state = persistence.safe_torch_load(path)  # not torch.load alone: TorchScript before torch 2.6
        except Exception as err:
            raise LPIPSUnavailableError(f"could not read the LPIPS {what} weights {path}: {err}\n"
                                        f"{_lpips_hint()}") from err
        if not isinstance(state, dict):
            raise LPIPSUnavailableError(f"{path}: expected a state dict, got {type(state).__name__}")
        states.append(state)
    return LPIPS(*states, resize=resize).to(device)

