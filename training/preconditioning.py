"""Preconditioned denoisers D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)).

VPPrecond, VEPrecond, iDDPMPrecond and EDMPrecond with EDM's constructor signatures, attributes and formulas
(EDM paper, Table 1). The backbone F is stored as `self.model`, so state-dict keys read `model.enc...` as in EDM.
EpsPrecond is not a denoiser: the epsilon predictor of processes other than x = y + sigma n (SPD, processes/spd.py).

Persistence constraint: snapshots embed this file's source and EDM's own generate.py executes it when unpickling, so
it imports only numpy, torch and `torch_utils.persistence`; `training.networks` is imported inside constructors
only (unpickling never runs a constructor).
"""

import numpy as np
import torch

from torch_utils import persistence

try:  # torch >= 2.4 takes the device type; older torch (EDM's environment) had one query per device.
    torch.is_autocast_enabled('cpu')
    _AUTOCAST_TAKES_DEVICE = True
except TypeError:
    _AUTOCAST_TAKES_DEVICE = False


def _autocast_active(device_type):
    """Whether torch.autocast is on for this device type."""
    if _AUTOCAST_TAKES_DEVICE:
        return torch.is_autocast_enabled(device_type)
    if device_type == 'cuda':
        return torch.is_autocast_enabled()
    return device_type == 'cpu' and torch.is_autocast_cpu_enabled()


def _build_backbone(precond_name, model_type, **kwargs):
    from training import networks
    backbone_class = getattr(networks, model_type, None) if isinstance(model_type, str) else None
    if backbone_class is None or not isinstance(backbone_class, type) or not issubclass(backbone_class,
                                                                                          torch.nn.Module):
        raise ValueError(f'{precond_name}: model_type={model_type!r}; expected the name of a backbone in '
                         f'training/networks.py: SongUNet or DhariwalUNet')
    return backbone_class(**kwargs)


class _Precond(torch.nn.Module):
    """Shared input handling and backbone call of the preconditioners (not persistent itself: no instances)."""

    _half_dtype = torch.float16  # What use_fp16 runs the backbone in on CUDA (EDM: fp16; GDDPrecond: bf16).
    # c_noise is a time-step index (0 to ~1000) rather than a log sigma: NCSN++'s random Fourier embedding (scale 16)
    # maps neighbouring indices to unrelated embeddings (train.py warns about the pair).
    time_index_noise_labels = False

    def _prepare(self, x, sigma, class_labels):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels

    def _run_model(self, x_in, c_noise, class_labels, force_fp32, augment_labels, model_kwargs):
        """F(x_in; c_noise) in the precision asked for; returns whatever dtype the backbone produced."""
        if augment_labels is not None:
            model_kwargs = dict(model_kwargs, augment_labels=augment_labels)
        if _autocast_active(x_in.device.type):
            # Mixed precision via torch.autocast (our --precision): autocast picks the dtype of every op. It never
            # casts float64, so GDDPrecond's float64 input (kept for its skip term) enters as float32: else every
            # layer would run in float64 (layers cast their weights to the input's dtype).
            return self.model(x_in.to(torch.float32), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        # EDM's use_fp16: the whole backbone in fp16 on CUDA (each layer casts its fp32 weights).
        use_half = self.use_fp16 and not force_fp32 and x_in.device.type == 'cuda'
        dtype = self._half_dtype if use_half else torch.float32
        F_x = self.model(x_in.to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f'{type(self).__name__}: backbone returned {F_x.dtype}, expected {dtype}')
        return F_x

    def round_sigma(self, sigma, return_index=False):
        """Continuous-time preconditioners accept any sigma: identity."""
        if return_index:
            raise ValueError(f'{type(self).__name__}.round_sigma: return_index=True needs a discrete sigma table '
                             f'(iDDPMPrecond)')
        return torch.as_tensor(sigma)


@persistence.persistent_class
class VPPrecond(_Precond):
    """Variance-preserving formulation (Song et al.): c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1),
    c_noise (M-1) t(sigma), with sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""

    time_index_noise_labels = True

    def __init__(self,
                 img_resolution,                # Image resolution.
                 img_channels,                  # Number of colour channels.
                 label_dim=0,                   # Number of class labels, 0 = unconditional.
                 use_fp16=False,                # Run the backbone in fp16 on CUDA (EDM's --fp16)?
                 beta_d=19.9,                   # Extent of the noise level schedule.
                 beta_min=0.1,                  # Initial slope of the noise level schedule.
                 M=1000,                        # Original number of timesteps of the DDPM formulation.
                 epsilon_t=1e-5,                # Minimum t used during training.
                 model_type='SongUNet',         # Class name of the backbone in training/networks.py.
                 **model_kwargs,                # Keyword arguments of the backbone.
                 ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # Evaluated in float32 on the CPU as EDM does: sigma_min = 0.0009765625 (float32 cancellation in
        # exp(.) - 1; the float64 value is 0.0010000005), sigma_max = 152.17...
        self.sigma_min = float(self.sigma(torch.as_tensor(epsilon_t, device='cpu')))
        self.sigma_max = float(self.sigma(torch.as_tensor(1, device='cpu')))
        self.model = _build_backbone('VPPrecond', model_type, img_resolution=img_resolution, in_channels=img_channels,
                                     out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        F_x = self._run_model(c_in * x, c_noise, class_labels, force_fp32, augment_labels, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def sigma(self, t):
        t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


@persistence.persistent_class
class VEPrecond(_Precond):
    """Variance-exploding formulation (Song et al.): c_skip 1, c_out sigma, c_in 1, c_noise ln(sigma / 2)."""

    def __init__(self,
                 img_resolution,                # Image resolution.
                 img_channels,                  # Number of colour channels.
                 label_dim=0,                   # Number of class labels, 0 = unconditional.
                 use_fp16=False,                # Run the backbone in fp16 on CUDA (EDM's --fp16)?
                 sigma_min=0.02,                # Minimum supported noise level.
                 sigma_max=100,                 # Maximum supported noise level.
                 model_type='SongUNet',         # Class name of the backbone in training/networks.py.
                 **model_kwargs,                # Keyword arguments of the backbone.
                 ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _build_backbone('VEPrecond', model_type, img_resolution=img_resolution, in_channels=img_channels,
                                     out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        F_x = self._run_model(c_in * x, c_noise, class_labels, force_fp32, augment_labels, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)


@persistence.persistent_class
class iDDPMPrecond(_Precond):
    """Improved DDPM (Nichol & Dhariwal): c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise M-1-j for the
    nearest u_j of the discrete cosine schedule. The backbone predicts 2C channels (mean and variance); D uses the
    first C."""

    time_index_noise_labels = True

    def __init__(self,
                 img_resolution,                # Image resolution.
                 img_channels,                  # Number of colour channels.
                 label_dim=0,                   # Number of class labels, 0 = unconditional.
                 use_fp16=False,                # Run the backbone in fp16 on CUDA (EDM's --fp16)?
                 C_1=0.001,                     # Timestep adjustment at low noise levels.
                 C_2=0.008,                     # Timestep adjustment at high noise levels.
                 M=1000,                        # Original number of timesteps of the DDPM formulation.
                 model_type='DhariwalUNet',     # Class name of the backbone in training/networks.py.
                 **model_kwargs,                # Keyword arguments of the backbone.
                 ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.model = _build_backbone('iDDPMPrecond', model_type, img_resolution=img_resolution,
                                     in_channels=img_channels, out_channels=img_channels * 2, label_dim=label_dim,
                                     **model_kwargs)

        # u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1), evaluated in float32
        # on the CPU exactly as EDM does (the recursion is sequential; it runs once). The explicit device keeps
        # the table real when the module is built under torch.device('meta').
        u = torch.zeros(M + 1, device='cpu')
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        F_x = self._run_model(c_in * x, c_noise, class_labels, force_fp32, augment_labels, model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def alpha_bar(self, j):
        j = j if isinstance(j, torch.Tensor) else torch.as_tensor(j, device='cpu')
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        """Snap sigma to the nearest u_j (or return j). Uses torch.cdist like EDM, so ties resolve identically."""
        sigma = torch.as_tensor(sigma)
        distance = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        index = distance.argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


@persistence.persistent_class
class EDMPrecond(_Precond):
    """EDM (Karras et al. 2022): c_skip = s_d^2/(sigma^2+s_d^2), c_out = sigma s_d/sqrt(sigma^2+s_d^2),
    c_in = 1/sqrt(s_d^2+sigma^2), c_noise = ln(sigma)/4, with s_d = sigma_data."""

    def __init__(self,
                 img_resolution,                # Image resolution.
                 img_channels,                  # Number of colour channels.
                 label_dim=0,                   # Number of class labels, 0 = unconditional.
                 use_fp16=False,                # Run the backbone in fp16 on CUDA (EDM's --fp16)?
                 sigma_min=0,                   # Minimum supported noise level.
                 sigma_max=float('inf'),        # Maximum supported noise level.
                 sigma_data=0.5,                # Expected standard deviation of the training data.
                 model_type='DhariwalUNet',     # Class name of the backbone in training/networks.py.
                 **model_kwargs,                # Keyword arguments of the backbone.
                 ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _build_backbone('EDMPrecond', model_type, img_resolution=img_resolution,
                                     in_channels=img_channels, out_channels=img_channels, label_dim=label_dim,
                                     **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        x, sigma, class_labels = self._prepare(x, sigma, class_labels)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self._run_model(c_in * x, c_noise, class_labels, force_fp32, augment_labels, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)


@persistence.persistent_class
class GDDPrecond(_Precond):
    """GDD's generator (Zheng & Yang 2024, "Diffusion Models Are Innate One-Step Generators"; Zyriix/GDD): EDM's
    preconditioning with the skip and output scalings shifted by epsilon, c_skip = s_d^2/((sigma - eps)^2 + s_d^2),
    c_out = (sigma - eps) s_d/sqrt(sigma^2 + s_d^2), so that D(x; eps) = x (the consistency-model boundary
    condition); c_in and c_noise are EDM's. At sigma = 80 it differs from EDMPrecond by about 5e-5 relative, and
    epsilon = 0 is EDMPrecond exactly. It takes EDMPrecond's weights (the same backbone under `model`).

    As GDD's class (so that its released pickles behave the same here): use_fp16 runs the backbone in bfloat16 on
    CUDA, and x keeps a float64 dtype, so a float64 input (GDD's one-step sampler) gives a float64 output; other
    inputs are computed in float32. Pickles of this class that record no process are sampled in one step at
    sigma = 80 (`pickled_process`), as GDD's generate.py does.
    """

    _half_dtype = torch.bfloat16
    # The process of GDD's released pickles, which record none (training.snapshots.read_snapshot).
    pickled_process = {'name': 'one_step', 'options': {'sigma': 80.0}}

    def __init__(self,
                 img_resolution,                # Image resolution.
                 img_channels,                  # Number of colour channels.
                 label_dim=0,                   # Number of class labels, 0 = unconditional.
                 use_fp16=False,                # Run the backbone in bfloat16 on CUDA (GDD's --fp16)?
                 sigma_min=0,                   # Minimum supported noise level.
                 sigma_max=float('inf'),        # Maximum supported noise level.
                 sigma_data=0.5,                # Expected standard deviation of the training data.
                 model_type='DhariwalUNet',     # Class name of the backbone in training/networks.py.
                 epsilon=2e-3,                  # The shift: D(x; epsilon) = x. GDD: 2e-3 (not a constructor option).
                 **model_kwargs,                # Keyword arguments of the backbone.
                 ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.epsilon = epsilon
        self.model = _build_backbone('GDDPrecond', model_type, img_resolution=img_resolution,
                                     in_channels=img_channels, out_channels=img_channels, label_dim=label_dim,
                                     **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        x_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        _, sigma, class_labels = self._prepare(x, sigma, class_labels)
        x = x.to(x_dtype)
        eps = self.epsilon
        c_skip = self.sigma_data ** 2 / ((sigma - eps) ** 2 + self.sigma_data ** 2)
        c_out = (sigma - eps) * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self._run_model(c_in * x, c_noise, class_labels, force_fp32, augment_labels, model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)


@persistence.persistent_class
class EpsPrecond(_Precond):
    """Epsilon prediction (DDPM, Ho et al. 2020, as guided-diffusion): eps_hat = F(x; c_noise) with c_in = 1, no skip,
    the raw output, and c_noise the process's time label (SPD and its DDPM control: t * 1000 / T, guided-diffusion's
    rescale_timesteps; processes/spd.py computes it). For processes that are not x = y + sigma n with white n, such
    as SPD's per-frequency schedule: EDMPrecond's c_skip/c_out assume one sigma of white noise. Not a denoiser
    D(x; sigma): the sigma-grid solvers do not apply (the process's own samplers do). Nothing in it is
    epsilon-specific: an added process whose network regresses another quantity from a time label (a flow's
    velocity) can train it as it is (its loss declares `preconditionings = ('eps',)`)."""

    time_index_noise_labels = True

    # Its schedule (SPD's T and Sigma0, or DDPM's betas) lives only in the snapshot's process record: a pickle without
    # one cannot default to EDM's process as older denoiser pickles do (training/snapshots.py).
    process_required = True

    def __init__(self,
                 img_resolution,                # Image resolution.
                 img_channels,                  # Number of colour channels.
                 label_dim=0,                   # Number of class labels, 0 = unconditional.
                 use_fp16=False,                # Run the backbone in fp16 on CUDA (EDM's --fp16)?
                 model_type='DhariwalUNet',     # Class name of the backbone in training/networks.py.
                 **model_kwargs,                # Keyword arguments of the backbone.
                 ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = _build_backbone('EpsPrecond', model_type, img_resolution=img_resolution,
                                     in_channels=img_channels, out_channels=img_channels, label_dim=label_dim,
                                     **model_kwargs)

    def forward(self, x, noise_labels, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        x, c_noise, class_labels = self._prepare(x, noise_labels, class_labels)
        F_x = self._run_model(x, c_noise, class_labels, force_fp32, augment_labels, model_kwargs)
        return F_x.to(torch.float32)
