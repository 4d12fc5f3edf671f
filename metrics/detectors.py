"""Feature detectors for the metrics: NVIDIA's Inception-v3 (FID, IS) and VGG16 (precision/recall).

Each detector is fetched from its canonical URL through `dnnlib.util.open_url` (download cache, optional sha256),
or read from a local path / URL given by the user (`--detector inception=PATH`). Two file formats are accepted,
told apart by their first bytes, not by their names:

- TorchScript archives (a zip; StyleGAN2-ADA's `.pt`): `torch.jit.load`. No Python runs, but TorchScript is a
  program: its code runs when the module is loaded and called, and its ops can read and write files.
- Pickles (StyleGAN3/EDM's `.pkl`): `pickle.load`, exactly as EDM's fid.py. These pickles embed the detector's
  Python source (torch_utils.persistence format) and unpickling executes it.
Either way a detector file is a program, as in EDM and StyleGAN: load only files you trust (the canonical URL, or a
copy of it). Unlike network pickles, reference statistics and schedule files, which are read as data.

Calling convention (both formats): uint8 NCHW images with 3 channels and any H×W in; the detector resizes and
normalises internally. Inception: `net(x, return_features=True)` -> float32 [N, 2048] pool3 features;
`net(x, no_output_bias=True)` -> softmax probabilities [N, 1008] without the output bias (for IS).
VGG16: `net(x, return_features=True)` -> float32 [N, 4096].

`StandinInception` / `StandinVGG16` are small deterministic TorchScript modules with the same call signatures,
for tests and benchmarks only: they give no meaningful metric values.
"""

import contextlib
import dataclasses
import os
import pickle
import warnings

import torch
import torch.nn.functional as F

from dnnlib import util
from torch_utils import distributed


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    url: str  # canonical URL (what EDM / StyleGAN3 download)
    alternate_urls: tuple[str, ...]  # the same network in StyleGAN2-ADA's TorchScript format
    # sha256 of the file at `url`. Not pinned yet (None): it could not be taken offline. The hash of the file actually
    # used is always reported with the results.
    sha256: str | None
    feature_kwargs: dict
    probability_kwargs: dict | None  # None: the detector has no classification head we use
    # Where the classification head's weight W lives in the module, when the probabilities are softmax(f W^T) of the
    # features f: then fid+is (and kid+is) take both from one detector pass. Checked on the loaded file (_probe); a
    # detector that does not match falls back to a second pass.
    head_weight: str | None = None


_NGC = "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics"
_ADA = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics"

DETECTORS: dict[str, DetectorSpec] = {
    "inception": DetectorSpec(
        url=f"{_NGC}/inception-2015-12-05.pkl",
        alternate_urls=(f"{_ADA}/inception-2015-12-05.pt",),
        sha256=None,
        feature_kwargs=dict(return_features=True),
        # Salimans et al.'s IS multiplies pool3 by the softmax weights without the bias; StyleGAN2-ADA matches it.
        probability_kwargs=dict(no_output_bias=True),
        # The TorchScript's own code: logits = linear(features, self.output.weight) when no_output_bias, then softmax.
        head_weight="output.weight",
    ),
    "vgg16": DetectorSpec(
        url=f"{_NGC}/vgg16.pkl",
        alternate_urls=(f"{_ADA}/vgg16.pt",),
        sha256=None,
        feature_kwargs=dict(return_features=True),
        probability_kwargs=None,
    ),
}


class DetectorUnavailableError(RuntimeError):
    """A detector that cannot be fetched, read or called."""


class Detector:
    """A loaded detector module plus where it came from (for result provenance)."""

    def __init__(self, name: str, module: torch.nn.Module, source: str, sha256: str, spec: DetectorSpec):
        self.name = name
        self.module = module
        self.source = source
        self.sha256 = sha256
        self.spec = spec
        self.feature_dim: int | None = None
        self.num_classes: int | None = None
        # Set by _probe when the probabilities are the head applied to the features (one pass serves both).
        self.head_weight: torch.Tensor | None = None
        self.probability_route = "separate pass" if spec.probability_kwargs is not None else None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> features [N, D]."""
        return self.module(images, **self.spec.feature_kwargs)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> class probabilities [N, C] (Inception without output bias)."""
        if self.spec.probability_kwargs is None:
            raise DetectorUnavailableError(f"detector {self.name!r} has no classification head")
        return self.module(images, **self.spec.probability_kwargs)

    @torch.no_grad()
    def features_and_probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one pass when the head was verified on this file (`_probe`), else from two."""
        features = self.features(images)
        if self.head_weight is None:
            return features, self.probabilities(images)
        # The detector's own ops on its own features (linear without bias, softmax over classes), so the same bits.
        return features, torch.softmax(F.linear(features, self.head_weight), dim=1)

    def describe(self) -> dict:
        info = dict(source=self.source, sha256=self.sha256, feature_dim=self.feature_dim)
        if self.probability_route is not None:
            info["probabilities"] = self.probability_route
        return info


_loaded: dict[tuple, tuple] = {}  # (name, source, device) -> (_file_identity(source), Detector)


def _file_identity(source: str) -> tuple | None:
    """A local detector file's identity: one replaced at the same path (another --detector file, a repaired copy) is
    read again. Cached by path alone, a process that goes on (a notebook) measured with the file it read first and
    recorded that file's sha256 for the new one. None for a URL (its cache copy is checked on download)."""
    if util.is_url(source, allow_file_urls=True):
        return None
    try:
        stat = os.stat(source)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _offline_hint(name: str, spec: DetectorSpec, source: str) -> str:
    """How to run offline: a local copy via --detector, or the exact file that open_url looks for in its cache."""
    url = source if util.is_url(source) else spec.url
    alternates = "".join(f" or {alt}" for alt in spec.alternate_urls) if url == spec.url else ""
    return (f"If this machine is offline, download {url}{alternates} elsewhere and pass "
            f"--detector {name}=PATH (library: detector_paths={{'{name}': PATH}}), or save {url} as "
            f"{util.url_cache_path(url)} (the file the download cache looks for; set $DNNLIB_CACHE_DIR to move the "
            f"cache).")


@contextlib.contextmanager
def _torchscript_is_the_format():
    """torch deprecates torch.jit (2.14.1 and 2.15.0: a FutureWarning on every script, save and load), but the
    published detector files (StyleGAN2-ADA's and EDM's Inception, VGG16) are TorchScript archives, and torch.jit is
    the one reader of them: the warning would tell users of fid.py to change what they cannot, so it is silenced here
    only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _read_module(path: str, device: torch.device) -> torch.nn.Module:
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        with _torchscript_is_the_format():  # a pickle may hold TorchScript too (it loads through torch.jit)
            if magic == b"PK\x03\x04":
                module = torch.jit.load(f, map_location=device)
            elif magic[:1] == b"\x80":
                module = pickle.load(f)  # embedded source runs here, as in EDM: trusted files only (see module doc)
            else:
                raise DetectorUnavailableError(f"{path} is neither a TorchScript archive nor a pickle")
    if not isinstance(module, torch.nn.Module):
        raise DetectorUnavailableError(f"{path} holds a {type(module).__name__}, not a torch module")
    module = module.eval().to(device)
    for param in module.parameters():  # ScriptModules have no requires_grad_()
        param.requires_grad_(False)
    return module


class _NonFiniteOutput(Exception):
    """The probe's outputs hold NaN or inf."""


def _probe(detector: Detector, device: torch.device) -> None:
    """Call the detector once on a blank image: checks the call signature early and learns the output sizes."""
    blank = torch.zeros([1, 3, 32, 32], dtype=torch.uint8, device=device)
    try:
        features = detector.features(blank)
        if features.ndim != 2 or features.shape[0] != 1:
            raise ValueError(f"features of shape {list(features.shape)}; expected [1, D]")
        detector.feature_dim = int(features.shape[1])
        outputs = [features]
        if detector.spec.probability_kwargs is not None:
            probs = detector.probabilities(blank)
            if probs.ndim != 2 or probs.shape[0] != 1:
                raise ValueError(f"probabilities of shape {list(probs.shape)}; expected [1, C]")
            outputs.append(probs)
            if not bool(torch.isfinite(probs).all()):  # NaN passes the sum check below (its comparisons are False)
                raise _NonFiniteOutput()
            if abs(float(probs.double().sum()) - 1) > 1e-3:  # logits instead of softmax would give a wrong IS
                raise ValueError(f"{detector.spec.probability_kwargs} output does not sum to 1 "
                                 f"(sum {float(probs.double().sum()):.4g}): expected softmax probabilities")
            detector.num_classes = int(probs.shape[1])
            _verify_head(detector, device)
        if not all(bool(torch.isfinite(output).all()) for output in outputs):
            raise _NonFiniteOutput()
    except _NonFiniteOutput:
        # A file whose weights hold NaN: its features made fid.py ref write a NaN reference (which calc then refused,
        # saying to rebuild it with fid.py ref), and calc stop in scipy's sqrtm ("Internal error ... -102").
        raise DetectorUnavailableError(f"detector {detector.name!r} from {detector.source} gives NaN or inf for a "
                                       f"blank image: its weights are damaged (fetch the file again)") from None
    except Exception as err:  # a detector of the wrong kind fails in many ways; name the file and the convention
        raise DetectorUnavailableError(
            f"detector {detector.name!r} from {detector.source} does not follow the expected calling convention "
            f"(uint8 NCHW in; {detector.spec.feature_kwargs} -> [N, D]): {err}") from err


def _verify_head(detector: Detector, device: torch.device, tolerance: float = 1e-6) -> None:
    """Use the one-pass route only if, on this very file, the head applied to the features gives the probabilities
    that the detector's own probability call gives (seeded random images); else keep two passes and say why."""
    if detector.spec.head_weight is None:
        return
    weight = detector.module
    try:
        for part in detector.spec.head_weight.split("."):
            weight = getattr(weight, part)
    except Exception:  # noqa: BLE001 -- AttributeError, or whatever a foreign module raises: keep two passes
        detector.probability_route = f"separate pass (the detector has no {detector.spec.head_weight})"
        return
    if (not isinstance(weight, torch.Tensor) or weight.ndim != 2
            or list(weight.shape) != [detector.num_classes, detector.feature_dim]):
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        detector.probability_route = (f"separate pass ({detector.spec.head_weight} is {shape}, not "
                                      f"[{detector.num_classes}, {detector.feature_dim}])")
        return
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, [4, 3, 32, 32], dtype=torch.uint8, generator=generator).to(device)
    detector.head_weight = weight.detach()
    try:
        _features, from_head = detector.features_and_probabilities(images)
        difference = float((from_head.double() - detector.probabilities(images).double()).abs().max())
    except Exception as err:  # noqa: BLE001 -- e.g. features of another dtype: the detector still works, in two passes
        detector.head_weight = None
        detector.probability_route = f"separate pass (the head route failed: {type(err).__name__}: {err})"
        return
    if difference <= tolerance:
        detector.probability_route = (f"from the features (one pass: softmax of features x "
                                      f"{detector.spec.head_weight}^T; max difference {difference:.1e} from the "
                                      f"separate pass on the check images)")
    else:
        detector.head_weight = None
        detector.probability_route = (f"separate pass (softmax of features x {detector.spec.head_weight}^T differs "
                                      f"by {difference:.1e} from the detector's probabilities)")


def load_detector(name: str, path: str | None = None, device: torch.device | str | None = None,
                  verbose: bool = True) -> Detector:
    """Load detector `name` ('inception' or 'vgg16') from `path` (local file or URL) or its canonical URL.

    Rank 0 loads (downloads) first while the other ranks wait, so a download happens once. Results are cached
    per (source, device) within the process, as long as a local file stays the same one.
    """
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    spec = DETECTORS[name]
    device = torch.device(device) if device is not None else distributed.device()
    source = path if path is not None else spec.url
    key, identity = (name, source, str(device)), _file_identity(source)
    if key in _loaded and _loaded[key][0] == identity:
        return _loaded[key][1]

    rank = distributed.get_rank()
    if rank != 0:
        distributed.barrier()  # rank 0 goes first
    try:
        # The canonical file, else the same network in StyleGAN2-ADA's format (another host; also found in the
        # download cache): one host down or a cached alternate does not stop an evaluation.
        candidates = [source] if path is not None else [spec.url, *spec.alternate_urls]
        failures = []
        for candidate in candidates:
            checksum = f"sha256:{spec.sha256}" if (candidate == spec.url and path is None and spec.sha256) else None
            try:
                # offline_hint='': the detector's own hint below replaces open_url's generic one (else both were given)
                local_path = util.open_url(candidate, return_filename=True, checksum=checksum,
                                           verbose=verbose and rank == 0, offline_hint="")
            except FileNotFoundError as err:
                raise DetectorUnavailableError(f"{name} detector: {err}") from err
            except (OSError, ValueError) as err:
                failures.append((candidate, err))
                continue
            if failures and verbose and rank == 0:
                print(f"{name} detector: {failures[0][0]} could not be fetched; using {candidate}")
            source = candidate
            break
        else:
            also = "".join(f"; from {url}: {str(err).rstrip('.')}" for url, err in failures[1:])
            raise DetectorUnavailableError(f"could not fetch the {name} detector from {source}: "
                                           f"{str(failures[0][1]).rstrip('.')}{also}. "
                                           f"{_offline_hint(name, spec, source)}") from failures[0][1]
        # A URL is read from its cache copy: if that copy is broken (e.g. truncated by hand), every later run would
        # fail the same way until it is deleted, so the message says so.
        from_cache = util.is_url(source, allow_file_urls=True)
        cache_note = (f" (its cache copy {local_path}: delete that file so that it is fetched again)"
                      if from_cache else "")
        try:
            module = _read_module(local_path, device)
        except DetectorUnavailableError as err:
            if not from_cache:
                raise
            raise DetectorUnavailableError(f"could not load the {name} detector from {source}{cache_note}: "
                                           f"{err}") from err
        except Exception as err:
            raise DetectorUnavailableError(f"could not load the {name} detector from {source}{cache_note}: "
                                           f"{err}") from err
        detector = Detector(name, module, source, util.file_sha256(local_path), spec)
        _probe(detector, device)
    finally:
        if rank == 0:
            distributed.barrier()  # the others follow
    _loaded[key] = (identity, detector)
    return detector




def parse_detector_overrides(values) -> dict[str, str]:
    """['inception=PATH', 'vgg16=URL'] -> {'inception': PATH, 'vgg16': URL}, with a clear error otherwise."""
    overrides = {}
    for value in values or ():
        name, sep, path = str(value).partition("=")
        if not sep or name not in DETECTORS or not path:
            raise ValueError(f"--detector expects NAME=PATH with NAME one of {', '.join(DETECTORS)}; got {value!r}")
        overrides[name] = path
    return overrides


# ---------------------------------------------------------------------------------------------------------------------
# Stand-in detectors (tests and benchmarks). Same call signatures as NVIDIA's, random but seeded weights.


class _Trunk(torch.nn.Module):
    """Bilinear resize to `resolution`, (x - 128) / 128, 3x3 conv + ReLU stages, 1x1 conv to `feature_dim`, mean."""

    def __init__(self, resolution: int, channels: tuple[int, ...], strides: tuple[int, ...], feature_dim: int):
        super().__init__()
        layers = []
        in_channels = 3
        for out_channels, stride in zip(channels, strides):
            layers += [torch.nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), torch.nn.ReLU()]
            in_channels = out_channels
        layers += [torch.nn.Conv2d(in_channels, feature_dim, 1)]
        self.layers = torch.nn.Sequential(*layers)
        self.resolution = resolution

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        return self.layers(x).mean(dim=[2, 3])


def _seeded_init_(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) * (2 / fan_in) ** 0.5)


class StandinInception(torch.nn.Module):
    """Inception's call signature on a small random network (not a metric: for tests and benchmarks)."""

    def __init__(self, feature_dim: int = 16, num_classes: int = 10, resolution: int = 16,
                 channels: tuple[int, ...] = (8,), strides: tuple[int, ...] = (2,), seed: int = 0):
        super().__init__()
        self.trunk = _Trunk(resolution, tuple(channels), tuple(strides), feature_dim)
        self.output = torch.nn.Linear(feature_dim, num_classes)
        _seeded_init_(self, seed)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        features = self.trunk(img)
        if return_features:
            return features
        logits = features @ self.output.weight.t()
        if not no_output_bias:
            logits = logits + self.output.bias
        return torch.softmax(logits, dim=1)


class StandinVGG16(torch.nn.Module):
    """VGG16's call signature on a small random network (not a metric: for tests and benchmarks)."""

    def __init__(self, feature_dim: int = 16, resolution: int = 16, channels: tuple[int, ...] = (8,),
                 strides: tuple[int, ...] = (2,), seed: int = 1):
        super().__init__()
        self.trunk = _Trunk(resolution, tuple(channels), tuple(strides), feature_dim)
        _seeded_init_(self, seed)

    def forward(self, img: torch.Tensor, resize_images: bool = True, return_features: bool = False,
                return_lpips: bool = False) -> torch.Tensor:
        return self.trunk(img)


# Roughly Inception-v3's cost (~6-7 GFLOPs per 299x299 image), for throughput and memory benchmarks.
INCEPTION_SIZED = dict(feature_dim=2048, num_classes=1008, resolution=299, channels=(32, 64, 192, 384, 768),
                       strides=(2, 1, 2, 2, 2))


def save_standin(module: torch.nn.Module, path: str) -> str:
    """Script `module` and save it as a TorchScript archive at `path` (atomically): usable as --detector NAME=PATH."""
    with _torchscript_is_the_format(), util.atomic_output(path, "wb") as f:
        torch.jit.save(torch.jit.script(module.eval()), f)
    return path
