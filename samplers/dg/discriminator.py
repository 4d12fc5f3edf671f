"""DG's discriminator: a frozen noise-conditional feature encoder and a small trainable head that tells real images
from the score model's samples at every noise level (Kim et al., "Refining Generative Process with Discriminator
Guidance in Score-based Diffusion Models", ICML 2023; alsdudrla10/DG).

Noise convention. Samplers here speak EDM's VE form (x = y + sigma n). DG's networks speak the VP SDE with
beta_min = 0.1, beta_max = 20 (`VPTime`): a VE level sigma is VP time tau(sigma) = (-b0 + sqrt(b0^2 + 2 (b1 - b0)
ln(1 + sigma^2))) / (b1 - b0) and the VP input is alpha(tau) x with alpha = exp(-int_0^tau beta / 2) = 1 / sqrt(1 +
sigma^2). Every discriminator here takes the VE x and sigma and maps them itself.

Two encoders:
- 'adm': guided-diffusion's noise-conditional 32x32 classifier (the reference's; `load_adm_classifier`), fed
  alpha(tau) x at VP time tau; features = its middle block's output (8x8x512 at 32x32 and at 64x64). Its 64x64
  classifier (the configuration is the one the file's parameters fit) was trained on the cosine schedule: it (and
  the head on its features) is fed the cosine-schedule time of the same alpha, as the reference does at 64 px
  (`Discriminator.cosine_time`).
- 'network': the user's own EDM-format diffusion network (any snapshot), fed x and sigma exactly as it is fed when
  sampling (its own preconditioning); features = the output of its middle blocks (the two lowest-resolution blocks
  EDM's U-Nets list first in their decoder, `{res}x{res}_in1`: the counterpart of ADM's middle block). The network's
  code is not changed: a forward hook takes the features and stops the pass there.
The head is an `ADMEncoderUNet` on the features (DG's: width 128, depth 2, attention pooling, one logit), conditioned
on tau and, when conditional, on the class.

A DG pickle (`save_discriminator` / `load_discriminator`) is EDM's network-pickle format holding
{'encoder': the frozen encoder module, 'head': the head, 'dg': a plain record}; it is read by the safe importer, so
the classes of a 'network' encoder must be registered (training/snapshots.py does it; every CLI imports it).
"""

import dataclasses
import math
import os

import torch

from dnnlib import util
from samplers.dg import networks
from torch_utils import persistence

persistence.register_module(networks)

DG_FORMAT = "dg-discriminator"
DG_VERSION = 1
ENCODER_KINDS = ("network", "adm")
CLIP = 1e-5  # the reference clips d to [1e-5, 1 - 1e-5] before log(d / (1 - d))

# guided-diffusion's 32x32 noise-conditional classifier as DG uses it. It has no direct download URL: the reference
# shares it in a Google Drive folder, so it is passed as a path (or an http(s)/file URL that open_url can fetch).
ADM_CLASSIFIER_SOURCE = "https://drive.google.com/drive/folders/1gb68C13-QOt8yA6ZnnS6G5pVIlPO7j_y"


class DiscriminatorError(ValueError):
    """A discriminator file or encoder that cannot be used (one line naming the file and the problem)."""


@dataclasses.dataclass(frozen=True)
class VPTime:
    """The VP SDE of DG (and of Song et al.'s VP): beta(t) = b0 + t (b1 - b0), t in [0, 1]."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def integral(self, t):
        """int_0^t beta = b0 t + (b1 - b0) t^2 / 2."""
        return 0.5 * t ** 2 * (self.beta_max - self.beta_min) + t * self.beta_min

    def tau(self, sigma):
        """VP time of the VE level sigma (the inverse of `sigma`)."""
        b0, d = self.beta_min, self.beta_max - self.beta_min
        return (torch.sqrt(b0 ** 2 + 2 * d * torch.log1p(sigma ** 2)) - b0) / d

    def alpha(self, t):
        """Mean coefficient of the VP marginal, exp(-int_0^t beta / 2) (= 1 / sqrt(1 + sigma(t)^2))."""
        return torch.exp(-0.5 * self.integral(t))

    def std(self, t):
        """Standard deviation of the VP marginal, sqrt(1 - alpha^2)."""
        return torch.sqrt(-torch.expm1(-self.integral(t)))

    def sigma(self, t):
        """The VE level of VP time t: std / alpha = sqrt(exp(int_0^t beta) - 1)."""
        return torch.sqrt(torch.expm1(self.integral(t)))

    def cosine_time(self, t, s: float = 0.008):
        """The time of the cosine schedule (Nichol & Dhariwal, offset s) with the same mean coefficient alpha(t):
        alpha_cos(t')^2 = cos^2((t' + s) / (1 + s) pi / 2) / cos^2(s / (1 + s) pi / 2) = alpha(t)^2. guided-diffusion's
        64x64 classifier was trained on that schedule; the reference feeds it this time (`compute_t_cos_from_t_lin`)."""
        cos_0 = math.cos(s / (1 + s) * math.pi / 2)
        return (1 + s) * 2 / math.pi * torch.arccos(cos_0 * self.alpha(t)) - s

    def sample_time(self, u, t_min: float = 1e-5):
        """DG's importance-sampled training times (the reference's likelihood-weighting sampler, `get_diffusion_time`)
        from uniforms u in [0, 1): log(exp(int beta) - 1) = log sigma(t)^2 is uniform between its values at t_min and
        1, i.e. sigma(t) is log-uniform on [sigma(t_min), sigma(1)] (about 0.001 ... 152)."""
        u = torch.as_tensor(u, dtype=torch.float64)
        lo = math.log(math.expm1(float(self.integral(torch.tensor(t_min, dtype=torch.float64)))))
        hi = math.log(math.expm1(float(self.integral(torch.tensor(1.0, dtype=torch.float64)))))
        log_sigma2 = lo + u * (hi - lo)
        return self.tau(torch.exp(0.5 * log_sigma2))


def _per_sample(sigma, batch_size, device):
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
    return sigma.expand(batch_size) if sigma.numel() == 1 else sigma


class _FeaturesReady(Exception):
    """Raised by the feature hook to stop a network's forward pass once the features are taken."""


def middle_block(net) -> torch.nn.Module:
    """The block of an EDM-format network (SongUNet / DhariwalUNet backbone under any preconditioning) whose output
    is the 'network' encoder's features: the decoder's `{res}x{res}_in1`, the last of its two lowest-resolution
    blocks (EDM lists the U-Net's middle there)."""
    decoder = getattr(getattr(net, "model", None), "dec", None)
    names = [name for name in (decoder or {}) if name.endswith("_in1")]
    if not names:
        raise DiscriminatorError(f"{type(net).__name__} is not an EDM-format network with a U-Net backbone "
                                 f"(net.model.dec['<res>x<res>_in1']): it cannot serve as DG's 'network' encoder")
    return decoder[names[0]]


def network_features(net, x, sigma, class_labels=None):
    """The 'network' encoder's features of x at noise level sigma: `net(x, sigma, class_labels)` run up to the output
    of its middle blocks (see `middle_block`), differentiable with respect to x. Nothing after them runs."""
    block = middle_block(net)
    captured = []

    def hook(module, inputs, output):
        captured.append(output)
        raise _FeaturesReady

    handle = block.register_forward_hook(hook)
    try:
        net(x, sigma, class_labels)
    except _FeaturesReady:
        pass
    finally:
        handle.remove()
    if not captured:
        raise DiscriminatorError(f"{type(net).__name__}'s forward pass never reached its middle block")
    return captured[0]


class Discriminator(torch.nn.Module):
    """encoder (frozen) + head (trainable): `logit(x, sigma, class_labels)` for VE inputs x at noise levels sigma.

    For guidance, `encoder_input` gives the tensor the encoder differentiates against and its scale with respect to
    x (alpha for 'adm', 1 for 'network'), and `logit_from_input` the logit from that tensor: the gradient of the log
    ratio with respect to x is scale * the gradient with respect to the encoder input, as in the reference.
    """

    def __init__(self, encoder: torch.nn.Module, head: networks.ADMEncoderUNet, encoder_kind: str, *,
                 img_resolution: int, img_channels: int, label_dim: int = 0, vp: VPTime = VPTime(),
                 record: dict | None = None):
        super().__init__()
        if encoder_kind not in ENCODER_KINDS:
            raise DiscriminatorError(f"unknown encoder kind {encoder_kind!r}: expected one of {ENCODER_KINDS}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.head = head
        self.encoder_kind = encoder_kind
        self.img_resolution, self.img_channels, self.label_dim = int(img_resolution), int(img_channels), int(label_dim)
        self.vp = vp
        self.record = dict(record or {})

    @property
    def conditional(self) -> bool:
        return bool(self.head.condition)

    @property
    def needs_labels(self) -> bool:
        """Whether the discriminator reads class labels (a conditional head, or a conditional encoder network)."""
        encoder_labels = self.encoder_kind == "network" and int(getattr(self.encoder, "label_dim", 0) or 0) > 0
        return self.conditional or encoder_labels

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: always in evaluation mode
        return self

    def encoder_input(self, x, sigma):
        """(encoder input in float32, its scale with respect to x [N] float64, VP time tau [N] float64)."""
        sigma = _per_sample(sigma, x.shape[0], x.device)
        tau = self.vp.tau(sigma)
        scale = self.vp.alpha(tau) if self.encoder_kind == "adm" else torch.ones_like(sigma)
        return (scale.reshape(-1, 1, 1, 1) * x).to(torch.float32), scale, tau

    @property
    def cosine_time(self) -> bool:
        """Whether the networks are fed cosine-schedule time: with guided-diffusion's 64x64 classifier as encoder,
        the one ADM classifier trained on the cosine schedule (the reference converts its time at 64 px when it
        samples; its train.py feeds linear time at any size, which would train the head on times its sampler never
        feeds. Here training and sampling share this one rule)."""
        return self.encoder_kind == "adm" and int(getattr(self.encoder, "image_size", 0)) == 64

    def logit_from_input(self, x_in, sigma, tau, class_labels=None):
        """The logit [N] from the encoder input (see `encoder_input`; tau is the linear VP time)."""
        sigma = _per_sample(sigma, x_in.shape[0], x_in.device)
        time = (self.vp.cosine_time(tau) if self.cosine_time else tau).to(torch.float32)
        with torch.set_grad_enabled(torch.is_grad_enabled() and x_in.requires_grad):
            if self.encoder_kind == "adm":
                features = self.encoder.features(x_in, time)
            else:
                features = network_features(self.encoder, x_in, sigma.to(torch.float32), class_labels)
        labels = class_labels if self.conditional else None
        return self.head(features.to(torch.float32), time, labels).reshape(-1)

    def logit(self, x, sigma, class_labels=None):
        x_in, _scale, tau = self.encoder_input(x, sigma)
        return self.logit_from_input(x_in, sigma, tau, class_labels)

    def forward(self, x, sigma, class_labels=None):
        return self.logit(x, sigma, class_labels)


def clipped_log_ratio(logit):
    """log(d / (1 - d)) with d = sigmoid(logit) clipped to [1e-5, 1 - 1e-5], as the reference evaluates it (the clip
    also stops the gradient where the discriminator is saturated)."""
    d = torch.sigmoid(logit).clamp(CLIP, 1 - CLIP)
    return torch.log(d / (1 - d))


# ---------------------------------------------------------------------------------------------------------------------
# Building and files.


def feature_shape(encoder, encoder_kind, img_resolution, img_channels, label_dim=0):
    """(channels, resolution) of the encoder's features, from one probe at sigma = 1."""
    x = torch.zeros([1, img_channels, img_resolution, img_resolution])
    labels = torch.zeros([1, label_dim]) if label_dim else None
    if label_dim:
        labels[:, 0] = 1
    device = next(encoder.parameters()).device
    with torch.no_grad():
        if encoder_kind == "adm":
            features = encoder.features(x.to(device), torch.tensor([0.5], device=device))
        else:
            features = network_features(encoder, x.to(device), torch.ones([1], device=device),
                                        None if labels is None else labels.to(device))
    if features.ndim != 4 or features.shape[2] != features.shape[3]:
        raise DiscriminatorError(f"the encoder's features have shape {list(features.shape)}; expected square maps")
    return int(features.shape[1]), int(features.shape[2])


def build_discriminator(encoder, encoder_kind, *, img_resolution, img_channels, label_dim=0, conditional=False,
                        width=128, depth=2, head_channels=64, num_classes=None, record=None) -> Discriminator:
    """A discriminator with a freshly initialised DG head on `encoder`'s features (their shape is probed)."""
    if conditional and not label_dim:
        raise DiscriminatorError("a conditional discriminator needs class labels (label_dim > 0)")
    channels, resolution = feature_shape(encoder, encoder_kind, img_resolution, img_channels,
                                         label_dim if encoder_kind == "network" else 0)
    if width % networks.GROUPS or width % head_channels:
        raise DiscriminatorError(f"head width {width} must be a multiple of {networks.GROUPS} (group norm) and of "
                                 f"{head_channels} channels per attention head")
    head = networks.ADMEncoderUNet(**networks.dg_head_kwargs(
        resolution, channels, width=width, depth=depth, head_channels=head_channels, condition=conditional,
        num_classes=num_classes or max(int(label_dim), 1)))
    return Discriminator(encoder, head, encoder_kind, img_resolution=img_resolution, img_channels=img_channels,
                         label_dim=label_dim, record=record)


def discriminator_record(disc: Discriminator, **extra) -> dict:
    """The plain record stored beside the networks in a DG pickle."""
    return dict(format=DG_FORMAT, version=DG_VERSION, encoder_kind=disc.encoder_kind,
                img_resolution=disc.img_resolution, img_channels=disc.img_channels, label_dim=disc.label_dim,
                conditional=disc.conditional, vp=dict(beta_min=disc.vp.beta_min, beta_max=disc.vp.beta_max),
                **{**disc.record, **extra})


def save_discriminator(path: str, disc: Discriminator, **extra) -> None:
    """Write a DG pickle atomically (EDM's network-pickle format; see the module docstring)."""
    persistence.save_network_pickle(path, dict(encoder=disc.encoder, head=disc.head,
                                               dg=discriminator_record(disc, **extra)))


def load_discriminator(path_or_url: str, option: str = "--dg") -> Discriminator:
    """Read a DG pickle without running anything it embeds; the networks stay on the CPU."""
    try:
        data = persistence.load_network_pickle(path_or_url)
    except FileNotFoundError as err:
        raise DiscriminatorError(f"{option}: {err}") from None
    except (persistence.NetworkPickleError, OSError) as err:
        hint = ""
        if "has no counterpart here" in str(err):
            hint = (" (a 'network' encoder's classes are registered by training.snapshots: import it before "
                    "loading)")
        raise DiscriminatorError(f"{option}: cannot read {path_or_url}: {err}{hint}") from None
    record = data.get("dg")
    if not isinstance(record, dict) or record.get("format") != DG_FORMAT:
        what = "a network snapshot" if "ema" in data else "not a DG discriminator pickle"
        raise DiscriminatorError(f"{option}: {path_or_url} is {what} (no 'dg' record); train one with train_dg.py")
    if record.get("version") != DG_VERSION:
        raise DiscriminatorError(f"{option}: {path_or_url} has DG pickle version {record.get('version')!r}; this "
                                 f"version reads {DG_VERSION}")
    encoder, head = data.get("encoder"), data.get("head")
    if not isinstance(head, networks.ADMEncoderUNet) or not isinstance(encoder, torch.nn.Module):
        raise DiscriminatorError(f"{option}: {path_or_url} lacks its encoder or head network")
    vp = VPTime(**record.get("vp", {}))
    extra = {k: v for k, v in record.items() if k not in ("format", "version", "encoder_kind", "img_resolution",
                                                          "img_channels", "label_dim", "conditional", "vp")}
    try:
        return Discriminator(encoder, head, record["encoder_kind"], img_resolution=record["img_resolution"],
                             img_channels=record["img_channels"], label_dim=record.get("label_dim", 0), vp=vp,
                             record=extra)
    except KeyError as err:
        raise DiscriminatorError(f"{option}: {path_or_url}: the 'dg' record lacks {err}") from None


def _load_state_dict(path_or_url: str, what: str, option: str, checksum: str | None = None,
                     offline_hint: str | None = None) -> dict:
    """A torch.save'd state dict through open_url (cache, checksum, local paths) and the safe torch loader.
    offline_hint: open_url's advice for a failed download ('': the caller gives its own)."""
    try:
        local = util.open_url(path_or_url, return_filename=True, checksum=checksum, offline_hint=offline_hint)
    except FileNotFoundError as err:
        raise DiscriminatorError(f"{option}: {err}") from None
    except (OSError, ValueError) as err:
        raise DiscriminatorError(f"{option}: could not fetch {what} from {path_or_url}: {err}") from None
    try:
        state = persistence.safe_torch_load(local, source=path_or_url)
    except Exception as err:  # torch raises many types for a file of the wrong kind; name the file
        raise DiscriminatorError(f"{option}: {path_or_url} is not a readable torch state dict: {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DiscriminatorError(f"{option}: {path_or_url} does not hold a state dict of tensors")
    return state


def _strict_load(module: torch.nn.Module, state: dict, what: str, source: str, option: str) -> None:
    ours = module.state_dict()
    missing, unexpected = sorted(ours.keys() - state.keys()), sorted(state.keys() - ours.keys())
    shapes = sorted(k for k in ours.keys() & state.keys() if ours[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        details = "; ".join(f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                            for name, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("different shapes", shapes)) if keys)
        raise DiscriminatorError(f"{option}: {source} does not match {what} ({details})")
    module.load_state_dict(state)


def adm_classifier_size(state: dict) -> int | None:
    """The image size of the guided-diffusion classifier configuration (`networks.adm_classifier_kwargs`) whose
    parameter names and shapes are those of `state`, or None. The configurations are built on the meta device
    (no memory), so every size is tried cheaply."""
    shapes = {name: tuple(value.shape) for name, value in state.items()}
    for size in networks.ADM_CLASSIFIER_SIZES:
        with torch.device("meta"):
            candidate = networks.ADMEncoderUNet(**networks.adm_classifier_kwargs(size))
        if {name: tuple(value.shape) for name, value in candidate.state_dict().items()} == shapes:
            return size
    return None


def load_adm_classifier(path_or_url: str | None, image_size: int | None = None, option: str = "--adm-classifier",
                        checksum: str | None = None) -> networks.ADMEncoderUNet:
    """guided-diffusion's noise-conditional classifier in DG's configuration (width 128, depth 4 at 32 and 64 px,
    attention at 32/16/8 px, 1000 classes: `32x32_classifier.pt`, and guided-diffusion's `64x64_classifier.pt`, which
    DG uses at 64 px), from a local path or a URL (dnnlib's download cache, optional checksum). image_size: the
    configuration to load; None: the one whose parameter shapes the file holds. There is no canonical direct URL;
    offline, pass a local copy."""
    where = (f"download 32x32_classifier.pt from DG's folder {ADM_CLASSIFIER_SOURCE} (alsdudrla10/DG, step 4; at 64 "
             f"px guided-diffusion's 64x64_classifier.pt) and pass {option}=PATH")
    if path_or_url is None:
        raise DiscriminatorError(f"{option} is required for the 'adm' encoder: {where}")
    if not util.is_url(path_or_url, allow_file_urls=True) and not os.path.isfile(os.path.expanduser(path_or_url)):
        raise DiscriminatorError(f"{option}: no such file: {path_or_url}; {where}")
    try:  # open_url's generic offline advice left out: this one names the file to fetch
        state = _load_state_dict(path_or_url, "the ADM classifier", option, checksum, offline_hint="")
    except DiscriminatorError as err:
        raise DiscriminatorError(f"{str(err).rstrip('.')}. If this machine is offline, {where}") from None
    if image_size is None:
        # A file of no known configuration is compared with the 32x32 one, DG's own, to name what differs.
        image_size = adm_classifier_size(state) or 32
    classifier = networks.ADMEncoderUNet(**networks.adm_classifier_kwargs(image_size))
    _strict_load(classifier, state, f"DG's {image_size}x{image_size} ADM classifier configuration (width 128, depth "
                 f"4, attention at 32/16/8 px, 1000 classes; guided-diffusion's default classifier flags differ)",
                 path_or_url, option)
    return classifier.eval().requires_grad_(False)


def import_reference_discriminator(classifier: networks.ADMEncoderUNet, head_path: str, *, conditional: bool,
                                   label_dim: int = 10, img_resolution: int | None = None,
                                   option: str = "--discriminator") -> Discriminator:
    """A released DG discriminator head (`discriminator_60.pt`, `discriminator_250.pt`: a state dict of the
    reference's `load_discriminator` network, 8x8x512 features, width 128, depth 2, 1000-row class embedding when
    conditional) on the ADM classifier. label_dim: the classes of the score model it guides (CIFAR-10: 10);
    img_resolution: the images it judges (None: the classifier's)."""
    state = _load_state_dict(head_path, "the discriminator", option)
    channels, resolution = classifier.feature_channels, classifier.feature_resolution
    head = networks.ADMEncoderUNet(**networks.dg_head_kwargs(resolution, channels, condition=conditional))
    _strict_load(head, state, f"DG's {'conditional' if conditional else 'unconditional'} discriminator head",
                 head_path, option)
    img_resolution = int(img_resolution or classifier.image_size)
    return Discriminator(classifier, head, "adm", img_resolution=img_resolution, img_channels=3,
                         label_dim=label_dim if conditional else 0, record=dict(source=f"imported {head_path}"))
