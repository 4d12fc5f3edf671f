"""Shortest Path Diffusion's loss (`--loss=spd`) and its DDPM control (`--loss=ddpm`): epsilon prediction under a
forward process that is variance-preserving per Fourier frequency (processes/spd.py).

Per image: t uniform on the integers 0 .. T-1, eps ~ N(0, I) white in pixel space, x_t = process.corrupt(y, t, eps),
loss (net(x_t, t * 1000 / T) - eps)^2 per element, unweighted (the reference's L_simple: guided-diffusion's
training_losses with predict_xstart=False, learn_sigma=False, use_kl=False, uniform schedule sampler). The loop sums
over elements where the reference averages; Adam does not see the constant factor.

The network is an epsilon predictor, so these losses train `--precond=eps` (training.preconditioning.EpsPrecond)
and refuse the denoiser preconditionings (`preconditionings` below; train.py reads it through losses/__init__.py).

Sigma0 from the data: `--loss-opt fit=data` (the training set) or `fit=PATH` (another dataset zip or folder) asks
for the power-law constants to be fitted before training (`resolve_options`, called once by train.py through
losses.prepare_loss_kwargs): the fitted c1, c2, m replace the defaults in the run's loss options, so they are
printed, written to training_options.json and recorded with every snapshot (its process options), and `fit_source`
says where they came from. fit fits all three, so c1, c2 or m given beside it is refused.
"""

import os

import numpy as np
import torch

from processes.spd import C2_SEARCH, CIFAR10_RESOLUTION, CIFAR10_SIGMA0, DDPMProcess, SPDProcess, fit_power_law
from samplers.fourier import to_fourier
from torch_utils import distributed as dist


def _process(cls, **options):
    """The loss's process; a refused option is named as the user set it (train.py's --loss-opt, whose errors
    become click's 'Invalid value for --loss-opt: ...')."""
    try:
        return cls(**options)
    except ValueError as err:
        raise ValueError(f'--loss-opt: {err}') from None


class FourierEpsLoss:
    """Shared code: uniform integer t, white eps, unweighted eps-MSE under `self.process` (a FourierVPProcess)."""

    preconditionings = ('eps',)  # --precond values this loss trains; the first is its default.

    def batch_source(self, data, inner):
        return inner

    def check_data(self, *, batch_gpu_total: int, batch_gpu: int, dataset_size: int) -> list[str]:
        return []

    def sample_time(self, batch, num: int, device) -> torch.Tensor:
        """t ~ U{0, ..., T-1}, int64 [num, 1, 1, 1], from float64 uniforms (per image when the loop gives them)."""
        T = self.process.num_steps
        if getattr(batch, 'random', None) is not None:
            uniform = batch.random.rand(1, 1, 1, dtype=torch.float64)
        else:
            uniform = torch.rand([num, 1, 1, 1], dtype=torch.float64, device=device)
        return (uniform * T).floor().to(torch.int64).clamp(max=T - 1)

    @staticmethod
    def augment(batch, augment_pipe):
        """(y, augment_labels), as DenoisingLoss.augment."""
        if getattr(batch, 'augment_labels', None) is not None:
            return batch.images, batch.augment_labels
        if augment_pipe is not None:
            return augment_pipe(batch.images)
        return batch.images, None

    @staticmethod
    def noise(batch, y) -> torch.Tensor:
        """Unit Gaussian eps in pixel space: `batch.noise` when given (AOT's paired noise), else fresh N(0, I)."""
        if getattr(batch, 'noise', None) is not None:
            return batch.noise
        if getattr(batch, 'random', None) is not None:
            return batch.random.randn(*y.shape[1:])
        return torch.randn(y.shape, device=y.device)

    def __call__(self, net, batch, augment_pipe=None) -> torch.Tensor:
        # Draws in EDM's order: time, augmentation, noise.
        t = self.sample_time(batch, batch.images.shape[0], batch.images.device)
        y, augment_labels = self.augment(batch, augment_pipe)
        eps = self.noise(batch, y)
        x = self.process.corrupt(y, t, eps)
        eps_hat = net(x, self.process.noise_label(t).to(torch.float32), batch.labels, augment_labels=augment_labels)
        return (eps_hat - self.process.target(y, x, t, eps)) ** 2


class SPDLoss(FourierEpsLoss):
    """Shortest Path Diffusion: Sigma0 = c1 / |c2 + |k||^m (CIFAR-10's constants by default), T steps."""

    # Written by resolve_options when it fits Sigma0 (the provenance printed and kept in training_options.json); a
    # user-given text would pass for a fit's record.
    recorded_options = {'fit_source': "where c1, c2 and m came from, written by --loss-opt fit=data (or fit=PATH)"}

    def __init__(self, T=4000, c1=CIFAR10_SIGMA0['c1'], c2=CIFAR10_SIGMA0['c2'], m=CIFAR10_SIGMA0['m'], fit='',
                 fit_source=''):
        if fit:
            raise ValueError(f"SPD: fit={fit!r} is settled before training (losses.prepare_loss_kwargs, which "
                             f"train.py calls); build the loss from the options it returns")
        self.fit_source = str(fit_source)
        self.process = _process(SPDProcess, T=T, c1=c1, c2=c2, m=m)

    @classmethod
    def resolve_options(cls, options: dict, dataset_kwargs: dict) -> tuple[dict, list[str]]:
        """Fit Sigma0 when `fit` is set: 'data' is the training set, anything else a dataset path. Returns the
        options with c1, c2, m fitted, fit cleared and fit_source filled in, and a line to print."""
        fit = options.get('fit') or ''
        resolution = dataset_kwargs.get('resolution')
        options, notes = cls._fit(options, dataset_kwargs, fit, resolution)
        if resolution is not None:
            cls._warn_if_signal_left(options, resolution)
        return options, notes

    @staticmethod
    def _warn_if_signal_left(options: dict, resolution: int) -> None:
        """Sampling starts from pure noise, but with few steps the last step keeps part of the signal (the
        reference's grid ends at tau = 1 / T): say how much where it is over 2 % of a frequency's power."""
        try:  # options the loss refuses (T = 1, c1 < 0) are reported by its constructor, naming --loss-opt
            T = int(options.get('T', 4000))
            process = SPDProcess(T=T, **{key: float(options.get(key, value)) for key, value in CIFAR10_SIGMA0.items()})
        except (TypeError, ValueError):
            return
        left = float(process.alpha_bar(torch.tensor([T - 1]), resolution, resolution).max())
        if left > SIGNAL_LEFT_WARNING:
            dist.warn0(f"SPD with T={T}: its noisiest step keeps up to {100 * left:.1f} % of a frequency's signal "
                       f"power (abar at t = T - 1), yet sampling starts from pure noise; the reference trains with "
                       f"T = 4000 (0.14 % at 32x32)", stacklevel=3)

    @classmethod
    def _fit(cls, options: dict, dataset_kwargs: dict, fit: str, resolution) -> tuple[dict, list[str]]:
        # fit settles all three constants together (one log-log fit; the reference has no fit at all, only given
        # constants): a constant given beside it would be dropped without a word, so the two are refused together.
        given = [key for key in CIFAR10_SIGMA0 if key in options]
        if fit and given:
            raise ValueError(f"--loss-opt fit={fit} and --loss-opt {', '.join(given)} exclude each other: fit sets "
                             f"c1, c2 and m from the data; give either fit or the constants")
        if not fit:
            published = all(float(options.get(k, v)) == v for k, v in CIFAR10_SIGMA0.items())
            if published and resolution not in (None, CIFAR10_RESOLUTION):
                # Sigma0 is power per integer frequency under the orthonormal DFT: the same content at N x N pixels
                # has about (N / 32)^2 times CIFAR-10's.
                dist.warn0(f"SPD: CIFAR-10's published Sigma0 constants were fitted at {CIFAR10_RESOLUTION}x"
                              f"{CIFAR10_RESOLUTION}; at {resolution}x{resolution} the same content has about "
                              f"{(resolution / CIFAR10_RESOLUTION) ** 2:.3g}x that power per frequency: fit Sigma0 to "
                              f"the training set with --loss-opt fit=data", stacklevel=3)
            return options, []
        path = dataset_kwargs.get('path') if fit == 'data' else fit
        if not path or not os.path.exists(path):
            raise ValueError(f"--loss-opt fit={fit}: no dataset at {path!r} (fit=data fits the training set, "
                             f"fit=PATH another dataset zip or folder)")
        power, num_images, shape = dataset_power_spectrum(path)
        if resolution is not None and tuple(shape[1:]) != (resolution, resolution):
            raise ValueError(f"--loss-opt fit={fit}: {path} holds {shape[1]}x{shape[2]} images but training is at "
                             f"{resolution}x{resolution}; Sigma0 (power per integer frequency) depends on the "
                             f"resolution: fit to images of the training resolution")
        result = fit_power_law(power)
        empty = (f", {result['zero_power_radii']} radii without power left out" if result['zero_power_radii']
                 else "")
        bound = (f", c2 at its search bound {result['c2_at_bound']:g} (the images do not fix it within "
                 f"[{C2_SEARCH[0]:g}, {C2_SEARCH[1]:g}]; to choose it, give c1, c2 and m instead of fit)"
                 if result['c2_at_bound'] is not None else "")
        source = (f"fitted to {path}: {num_images} images {shape[0]}x{shape[1]}x{shape[2]} in [-1, 1], radially "
                  f"averaged E|F x|^2 over the non-DC frequencies{empty}, rms log10 residual "
                  f"{result['rms_log10']:.3f}{bound}")
        resolved = dict(options, c1=result['c1'], c2=result['c2'], m=result['m'], fit='', fit_source=source)
        note = (f"SPD Sigma0 = c1 / |c2 + |k||^m {source}: c1={result['c1']:.6g}, c2={result['c2']:.6g}, "
                f"m={result['m']:.6g} (CIFAR-10's published constants: 1.59, 0.0086, 2.0)")
        return resolved, [note]


SIGNAL_LEFT_WARNING = 0.02  # SPDLoss warns when abar at t = T - 1 exceeds this (T < ~300 at 32x32)


class DDPMLoss(FourierEpsLoss):
    """SPD's DDPM control: the same loss and samplers with guided-diffusion's linear beta (scaled by 1000 / T)."""

    def __init__(self, T=4000, beta_start=1e-4, beta_end=0.02):
        self.process = _process(DDPMProcess, T=T, beta_start=beta_start, beta_end=beta_end)


def dataset_power_spectrum(path: str, chunk: int = 1024) -> tuple[torch.Tensor, int, tuple]:
    """(E|F x|^2 over images and channels as float64 [H, W], number of images, (C, H, W)) of a dataset zip or folder,
    with images as the network sees them: uint8 / 127.5 - 1."""
    from training.dataset import ImageFolderDataset

    dataset = ImageFolderDataset(path=path, use_labels=False, xflip=False, cache=False)
    total, count = None, 0
    for start in range(0, len(dataset), chunk):
        images = np.stack([dataset[i][0] for i in range(start, min(start + chunk, len(dataset)))])
        x = torch.as_tensor(images, dtype=torch.float64) / 127.5 - 1
        power = to_fourier(x).abs().square().sum(dim=(0, 1))
        total = power if total is None else total + power
        count += x.shape[0] * x.shape[1]
    return total / count, len(dataset), tuple(dataset.image_shape)


__all__ = ['FourierEpsLoss', 'SPDLoss', 'DDPMLoss', 'dataset_power_spectrum']
