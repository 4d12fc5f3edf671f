"""Shortest Path Diffusion (processes/spd.py, losses/spd.py, samplers/fourier.py): the schedule's closed form, the
marginal spectrum, Fisher-Rao path lengths, exact spectra of the samplers under an oracle epsilon, the Sigma0 fit,
the preconditioning choice, and the CLIs end to end (docs: README, SPD)."""

import glob
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from train_worker import assert_tree_equal, loop_kwargs, random_images, write_zip_dataset

import generate
import losses
import samplers.fourier as fourier
from losses.spd import DDPMLoss, SPDLoss
from processes import build_process, process_record
from processes.spd import (
    DDPMProcess,
    SPDProcess,
    fit_power_law,
    mean_power_spectrum,
    power_law_spectrum,
    radial_average,
    radial_frequency,
    reference_tau,
    shortest_path_alpha_bar,
)
from samplers.fourier import ancestral, ddim, dpmpp_2m, heun, time_steps, to_fourier, to_pixels
from training import snapshots
from training import training_loop as tl
from training.preconditioning import EpsPrecond

CIFAR = dict(c1=1.59, c2=0.0086, m=2.0)


def gaussian_images(sigma0, num, channels=1, seed=0):
    """Real Gaussian images whose spectrum E|F x|^2 is sigma0 (even in k, so F^-1 of the filtered noise is real)."""
    z = torch.randn(num, channels, *sigma0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return to_pixels(sigma0.sqrt() * to_fourier(z))


# ---------------------------------------------------------------------------------------------------------------------
# Schedule.

def test_closed_form_grid_betas_and_the_sigma0_guard():
    process = SPDProcess(T=4000, **CIFAR)
    t = torch.arange(4000)
    tau = reference_tau(t, 4000)
    # The reference's grid: t' = linspace(1, T-1, T), tau = (T - t') / T (numpy, independently).
    assert torch.allclose(tau, torch.as_tensor((4000 - np.linspace(1, 3999, 4000)) / 4000), rtol=0, atol=1e-15)
    abar = process.alpha_bar(t, 32, 32)  # [T, 1, 32, 32]
    sigma0 = power_law_spectrum(**CIFAR, height=32, width=32)
    # The defining property of the geodesic: abar Sigma0 + 1 - abar = Sigma0^tau.
    residual = (abar * sigma0 + 1 - abar).log() - tau.reshape(-1, 1, 1, 1) * sigma0.log()
    assert residual.abs().max() < 1e-12
    # The reference's formula evaluated directly (numpy, no expm1).
    s, x = sigma0.numpy(), tau.numpy()[:, None, None]
    assert np.allclose(abar[:, 0].numpy(), (1 - s ** x) / (1 - s), rtol=1e-9, atol=0)
    # betas from consecutive abar (clamp 0.999 never binds; largest at the last step, ~0.5) and back through cumprod.
    abar_prev = torch.cat([torch.ones_like(abar[:1]), abar[:-1]])
    beta = (1 - abar / abar_prev).clamp(max=0.999)
    assert 0 < beta.min() and 0.49 < beta.max() < 0.51 and beta[-1].min() > 0.49
    assert torch.allclose(torch.cumprod(1 - beta, dim=0), abar, rtol=1e-12, atol=0)
    assert abar[0].min() > 0.9974 and abar[-1].max() < 0.00146  # losses.md 4.2
    # Sigma0 = 1: the limit tau, and continuity next to it.
    tau_t = torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64).reshape(-1, 1)
    log_s = torch.tensor([0.0, 1e-12, -1e-12, 1e-6], dtype=torch.float64)
    guarded = shortest_path_alpha_bar(log_s, tau_t)
    assert torch.isfinite(guarded).all() and torch.allclose(guarded, tau_t.expand(-1, 4), rtol=0, atol=1e-6)
    assert torch.equal(guarded[:, 0], tau_t[:, 0])
    # The DDPM control: guided-diffusion's linear betas scaled by 1000 / T, cumulated.
    ddpm = DDPMProcess(T=4000)
    betas = np.linspace(1e-4 * 0.25, 0.02 * 0.25, 4000)
    assert torch.allclose(ddpm.alpha_bar(t, 32, 32).flatten(), torch.as_tensor(np.cumprod(1 - betas)), rtol=1e-14)
    for bad, message in ((dict(T=1), 'T'), (dict(c2=0), 'c2'), (dict(c1=-1), 'c1'), (dict(m=float('nan')), 'm')):
        with pytest.raises(ValueError, match=message):
            SPDProcess(**bad)


def test_a_snapshots_process_record_cannot_ask_for_unbounded_steps():
    """A process record is a file's say: T=4e8 from a snapshot built 12 GB of tables, T=inf and 1e13 crashed with a
    traceback; now refused in one line."""
    from processes import build_process
    for T in (400_000_000, 10 ** 13, float('inf'), float('nan'), 2.5, '1000', True):
        for name in ('ddpm', 'spd'):
            with pytest.raises(ValueError, match=r'T \(the number of diffusion steps\) must be an integer from 2 to '
                                                 r'1,000,000, got'):
                build_process({'name': name, 'options': {'T': T}})
    assert build_process({'name': 'ddpm', 'options': {'T': 1_000_000.0}}).num_steps == 1_000_000


def test_marginal_spectrum_is_sigma0_to_the_tau():
    """S1: Gaussian images with spectrum Sigma0 (16x16): radially averaged E|F x_t|^2 = Sigma0^tau within 3 %."""
    process = SPDProcess(T=1000, **CIFAR)
    sigma0 = process.sigma0(16, 16)
    y = gaussian_images(sigma0, 20000, seed=1)
    eps = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for target_tau in (0.9, 0.5, 0.1):
        t = int(round((1000 * (1 - target_tau) - 1) * 999 / 998))
        tau = float(reference_tau(torch.tensor(t), 1000))
        assert abs(tau - target_tau) < 1e-3
        x = process.corrupt(y, torch.full([len(y)], t), eps)
        _, measured, _ = radial_average(mean_power_spectrum(x))
        _, expected, _ = radial_average(sigma0 ** tau)
        assert np.abs(measured / expected - 1).max() < 0.03, (target_tau, measured / expected)
    # corrupt is the per-frequency formula, and its inverse DFT is real up to rounding.
    abar = process.alpha_bar(torch.tensor([t]), 16, 16)
    u = abar.sqrt() * to_fourier(y[:4]) + (1 - abar).sqrt() * to_fourier(eps[:4])
    assert torch.fft.ifft2(u, norm='ortho').imag.abs().max() < 1e-12
    assert torch.allclose(process.corrupt(y[:4], torch.full([4], t), eps[:4]), to_pixels(u), rtol=0, atol=1e-12)
    assert torch.allclose(process.target(y[:4], process.corrupt(y[:4], torch.full([4], t), eps[:4]),
                                         torch.full([4], t)), eps[:4], atol=1e-9)
    # A scalar schedule (the DDPM control) takes the pixel-space shortcut, which is the same formula.
    ddpm = DDPMProcess(T=1000)
    a = ddpm.alpha_bar(torch.tensor([300]), 16, 16)
    expected = to_pixels(a.sqrt() * to_fourier(y[:4]) + (1 - a).sqrt() * to_fourier(eps[:4]))
    assert torch.allclose(ddpm.corrupt(y[:4], torch.full([4], 300), eps[:4]), expected, atol=1e-12)


def fisher_rao_length(variances: np.ndarray, channels: int) -> float:
    """Length of a path of diagonal Gaussians [points, frequencies] under ds^2 = 1/2 sum (d ln v)^2 (polyline in ln v:
    exact on the straight lines of the geodesic, converging elsewhere)."""
    steps = np.diff(np.log(variances), axis=0)
    return float(np.sum(np.sqrt(0.5 * channels * np.sum(steps ** 2, axis=1))))


def test_path_lengths_spd_is_the_geodesic_and_shorter_than_ddpm_and_blurring():
    """S3 (32x32, 3 channels, CIFAR-10's Sigma0): SPD 175.4 = sqrt(C/2 sum ln^2 Sigma0) < any DDPM schedule 184.7 <
    blurring (Hoogeboom & Salimans' heat dissipation, sigma_B = 20)."""
    sigma0 = power_law_spectrum(**CIFAR, height=32, width=32).numpy().flatten()
    geodesic = math.sqrt(3 / 2 * np.sum(np.log(sigma0) ** 2))
    assert abs(geodesic - 175.45) < 0.01
    process = SPDProcess(T=4000, **CIFAR)
    abar = process.alpha_bar(torch.arange(4000), 32, 32).reshape(4000, -1).numpy()
    path = np.concatenate([[sigma0], abar * sigma0 + 1 - abar, [np.ones_like(sigma0)]])  # data -> noise
    assert abs(fisher_rao_length(path, 3) - geodesic) < 1e-6 * geodesic
    a = np.concatenate([[0.0], np.exp(np.linspace(-40, 0, 20001))])[:, None]  # DDPM: any schedule, one path
    ddpm = fisher_rao_length(a * sigma0 + 1 - a, 3)
    assert abs(ddpm - 184.70) < 0.02  # the polyline converges from below (184.696 at 40001 points)
    ddpm_schedule = DDPMProcess(T=4000).alpha_bar(torch.arange(4000), 1, 1).numpy().reshape(-1, 1)
    coarse = fisher_rao_length(np.concatenate([[sigma0], ddpm_schedule * sigma0 + 1 - ddpm_schedule]), 3)
    assert abs(coarse - ddpm) < 0.01 * ddpm  # the same path, however it is traversed
    t = np.concatenate([[0.0], np.exp(np.linspace(-30, 0, 10001))])[:, None]
    dissipation = 4 * math.pi ** 2 * radial_frequency(32, 32).numpy().flatten() ** 2 / 32 ** 2
    blur = np.cos(np.pi * t / 2) ** 2 * np.exp(-dissipation * 20 ** 2 * t ** 2) * sigma0 + np.sin(np.pi * t / 2) ** 2
    blur[-1] = 1.0
    assert geodesic < ddpm < fisher_rao_length(blur, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Samplers under the exact Gaussian E[eps | x_t].

def oracle(process, sigma0):
    height, width = sigma0.shape

    def eps_model(x, t):
        abar = process.alpha_bar(t.reshape(1), height, width)
        return to_pixels((1 - abar).sqrt() * to_fourier(x) / (abar * sigma0 + 1 - abar))
    return eps_model


def sampled_spectrum(solver, process, sigma0, num_steps=None, **options):
    """The exact expected spectrum E|F x|^2 of a sampler's output: the oracle makes every step linear and diagonal in
    frequency, so one unit impulse as latents gives the signal path's gain, and one impulse per noise injection
    (randn_like) gives each injection's; unit white inputs add their squared gains."""
    height, width = sigma0.shape
    injections = len(time_steps(process, num_steps, options.get('spacing', 'uniform'), height, width)) - 1 \
        if solver is ancestral else 0
    x = torch.zeros(1 + injections, 1, height, width, dtype=torch.float64)
    x[0, 0, 0, 0] = 1
    calls = []

    def randn_like(like):
        impulse = torch.zeros_like(like)
        impulse[1 + len(calls), 0, 0, 0] = 1
        calls.append(1)
        return impulse

    extra = dict(randn_like=randn_like) if solver is ancestral else {}
    out = solver(oracle(process, sigma0), x, process, num_steps, **options, **extra)
    assert len(calls) == injections
    return height * width * to_fourier(out).abs().square().sum(dim=0)[0]


def ratio_summary(spectrum, sigma0):
    ratio = (spectrum / sigma0).flatten()
    return ratio[0].item(), ratio[1:].min().item(), ratio[1:].max().item()


def test_oracle_ancestral_and_ddim_reproduce_the_spectrum():
    """S4: the reference's ancestral sampler over all T = 250 steps keeps every non-DC frequency within 0.98-1.03;
    the DC (Sigma0 = 21 498, abar falling by Sigma0^(-1/T) = 4 % per step) is 4 % low at T = 250, 1 % at T = 1000
    (slow test), 0.25 % at T = 4000. DDIM: the same at T = 1000."""
    process = SPDProcess(T=250, **CIFAR)
    sigma0 = process.sigma0(16, 16)
    dc, low, high = ratio_summary(sampled_spectrum(ancestral, process, sigma0), sigma0)
    assert 0.98 <= low and high <= 1.03 and 0.955 < dc < 0.97
    process = SPDProcess(T=1000, **CIFAR)
    dc, low, high = ratio_summary(sampled_spectrum(ddim, process, sigma0), sigma0)
    assert 0.98 <= low and high <= 1.03 and 0.975 < dc < 0.985


@pytest.mark.slow
def test_oracle_ancestral_at_t1000():
    process = SPDProcess(T=1000, **CIFAR)
    sigma0 = process.sigma0(8, 8)
    dc, low, high = ratio_summary(sampled_spectrum(ancestral, process, sigma0), sigma0)
    assert 0.98 <= low and high <= 1.03 and 0.985 < dc < 0.995


def test_oracle_few_step_samplers_at_35_nfe():
    """dpmpp_2m on the logsnr spacing: 35 NFE within 5 % (measured 1.006-1.036); EDM's Heun at 35 NFE (18 levels)
    overshoots by 5-11 %, as EDM's own Heun does on a Gaussian of this spectrum; time-uniform levels are far worse."""
    process = SPDProcess(T=4000, **CIFAR)
    sigma0 = process.sigma0(16, 16)
    dc, low, high = ratio_summary(sampled_spectrum(dpmpp_2m, process, sigma0, 35), sigma0)
    assert 0.99 < min(dc, low) and max(dc, high) < 1.05
    dc, low, high = ratio_summary(sampled_spectrum(heun, process, sigma0, 18), sigma0)
    assert 1.0 < min(dc, low) and max(dc, high) < 1.12
    dc, low, high = ratio_summary(sampled_spectrum(dpmpp_2m, process, sigma0, 35, spacing='uniform'), sigma0)
    assert max(dc, high) > 1.2


def test_samplers_equal_the_reference_formulas_and_stay_real(monkeypatch):
    """Over all T steps, ancestral and DDIM equal the reference's p_sample / ddim_sample written out with its own
    coefficients (numpy, float64: k1 = 1/sqrt(alpha), k2 = beta/sqrt(1 - abar), noise exp(0.5 log beta), none at
    t = 0; DDIM k3 = sqrt(1 - abar_prev)), for a fixed non-oracle eps model; every inverse DFT is real to 1e-12."""
    process = SPDProcess(T=30, **CIFAR)
    generator = torch.Generator().manual_seed(0)
    x_start = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=generator)
    noises = torch.randn(30, 3, 2, 8, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(2, 8, 8, dtype=torch.float64, generator=generator)

    def eps_model(x, t):  # Any fixed function of (x, t): a pixel-space product, then a time factor.
        return torch.tanh(x * weight) * (1 + t.to(torch.float64) / 30)

    calls = []

    def randn_like(like):
        calls.append(1)
        return noises[len(calls) - 1]

    imaginary = []
    real_to_pixels = fourier.to_pixels

    def checked_to_pixels(u):
        imaginary.append(torch.fft.ifft2(u, norm='ortho').imag.abs().max().item())
        return real_to_pixels(u)

    monkeypatch.setattr(fourier, 'to_pixels', checked_to_pixels)
    ours = ancestral(eps_model, x_start, process, randn_like=randn_like)
    ours_ddim = ddim(eps_model, x_start, process)
    assert max(imaginary) < 1e-12

    abar = process.alpha_bar(torch.arange(30), 8, 8).numpy()  # [T, 1, 8, 8]
    betas = np.clip(1 - abar / np.concatenate([np.ones_like(abar[:1]), abar[:-1]]), None, 0.999)
    alphas, abar_prev = 1 - betas, np.concatenate([np.ones_like(abar[:1]), abar[:-1]])
    fft = lambda v: np.fft.fft2(v, norm='ortho')  # noqa: E731
    ifft = lambda v: np.fft.ifft2(v, norm='ortho').real  # noqa: E731
    x = x_start.numpy()
    y = x_start.numpy()
    for i, t in enumerate(range(29, -1, -1)):
        eps = fft(eps_model(torch.as_tensor(x), torch.tensor(t)).numpy())
        mean = np.sqrt(1 / alphas[t]) * (fft(x) - betas[t] / np.sqrt(1 - abar[t]) * eps)
        x = ifft(mean + (t != 0) * np.exp(0.5 * np.log(betas[t])) * fft(noises[i].numpy()))
        eps = fft(eps_model(torch.as_tensor(y), torch.tensor(t)).numpy())
        y = ifft(np.sqrt(1 / alphas[t]) * (fft(y) - np.sqrt(1 - abar[t]) * eps) + np.sqrt(1 - abar_prev[t]) * eps)
    assert np.allclose(ours.numpy(), x, rtol=0, atol=1e-9) and np.allclose(ours_ddim.numpy(), y, rtol=0, atol=1e-9)
    assert len(calls) == 29



@pytest.mark.parametrize('num_steps, spacing', [(6, 'logsnr'), (7, 'uniform')])
def test_heun_and_dpmpp_2m_equal_edm_and_lu_et_al_written_per_frequency_in_ve_form(num_steps, spacing):
    """Heun (EDM's Algorithm 1 without churn) and DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) written out in numpy
    on v = u / sqrt(abar) with sigma_k = sqrt((1 - abar_k) / abar_k) per frequency, for a fixed non-oracle eps model;
    the last step goes to the clean end (sigma = 0) by Euler / first order."""
    process = SPDProcess(T=30, **CIFAR)
    generator = torch.Generator().manual_seed(1)
    x_start = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(2, 8, 8, dtype=torch.float64, generator=generator)

    def eps_model(x, t):
        return torch.tanh(x * weight) * (1 + t.to(torch.float64) / 30)

    steps = time_steps(process, num_steps, spacing, 8, 8).tolist()
    abar = [process.alpha_bar(torch.tensor([t]), 8, 8).numpy()[0] for t in steps] + [np.ones((1, 8, 8))]
    sig = [np.sqrt((1 - a) / a) for a in abar]
    fft = lambda v: np.fft.fft2(v, norm='ortho')  # noqa: E731
    ifft = lambda v: np.fft.ifft2(v, norm='ortho').real  # noqa: E731
    eps = lambda v, i: fft(eps_model(torch.as_tensor(ifft(np.sqrt(abar[i]) * v)), torch.tensor(steps[i])).numpy())  # noqa: E731

    v = fft(x_start.numpy()) / np.sqrt(abar[0])  # Heun
    for i in range(num_steps):
        d = eps(v, i)
        v_euler = v + (sig[i + 1] - sig[i]) * d
        v = v_euler if i == num_steps - 1 else v + (sig[i + 1] - sig[i]) * (d + eps(v_euler, i + 1)) / 2
    torch.testing.assert_close(heun(eps_model, x_start, process, num_steps, spacing=spacing),
                               torch.from_numpy(ifft(v)), rtol=0, atol=1e-9)

    v, previous = fft(x_start.numpy()) / np.sqrt(abar[0]), None  # DPM-Solver++(2M)
    for i in range(num_steps):
        x0 = v - sig[i] * eps(v, i)
        if i == num_steps - 1:
            v = x0
            break
        h = np.log(sig[i] / sig[i + 1])
        denoised = x0 if previous is None else x0 + (x0 - previous[0]) * h / (2 * previous[1])
        v = sig[i + 1] / sig[i] * v + (1 - sig[i + 1] / sig[i]) * denoised
        previous = (x0, h)
    torch.testing.assert_close(dpmpp_2m(eps_model, x_start, process, num_steps, spacing=spacing),
                               torch.from_numpy(ifft(v)), rtol=0, atol=1e-9)


def test_ddim_and_ancestral_with_clip_x0_equal_guided_diffusions_clip_denoised_written_out():
    """clip_x0 (the DDPM control's default): the pixel x0 estimate is clipped to [-1, 1] and eps recomputed from it,
    eps = (u - sqrt(abar) F x0) / sqrt(1 - abar), before the DDIM / ancestral update (numpy, per frequency)."""
    for process in (DDPMProcess(T=20, beta_end=0.01), SPDProcess(T=20, **CIFAR)):
        generator = torch.Generator().manual_seed(2)
        x_start = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=generator)
        noises = torch.randn(20, 2, 3, 8, 8, dtype=torch.float64, generator=generator)

        def eps_model(x, t):  # an eps whose x0 estimate leaves [-1, 1] by far
            return -2 * torch.tanh(3 * x)

        def randn_like(like, draws=iter(noises)):
            return next(draws)

        fft = lambda v: np.fft.fft2(v, norm='ortho')  # noqa: E731
        ifft = lambda v: np.fft.ifft2(v, norm='ortho').real  # noqa: E731
        abar = process.alpha_bar(torch.arange(20), 8, 8).numpy()
        x, y, clipped = x_start.numpy(), x_start.numpy(), 0
        for i, t in enumerate(range(19, -1, -1)):
            a, a_prev = abar[t], (abar[t - 1] if t > 0 else np.ones_like(abar[t]))
            for which in ('ddim', 'ancestral'):
                z = y if which == 'ddim' else x
                u = fft(z)
                x0_pixels = ifft((u - np.sqrt(1 - a) * fft(eps_model(torch.as_tensor(z), t).numpy())) / np.sqrt(a))
                clipped += int(np.abs(x0_pixels).max() > 1.5)
                x0 = fft(np.clip(x0_pixels, -1, 1))
                e = (u - np.sqrt(a) * x0) / np.sqrt(1 - a)
                if which == 'ddim':
                    y = ifft(np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e)
                else:
                    beta = np.minimum(1 - a / a_prev, 0.999)
                    u = (u - beta / np.sqrt(1 - a) * e) / np.sqrt(1 - beta)
                    x = ifft(u + (t != 0) * np.sqrt(beta) * fft(noises[i].numpy()))
        assert clipped > 10  # the clip acts
        torch.testing.assert_close(ddim(eps_model, x_start, process, clip_x0=True), torch.from_numpy(y), rtol=0,
                                   atol=1e-9)
        torch.testing.assert_close(ancestral(eps_model, x_start, process, clip_x0=True, randn_like=randn_like),
                                   torch.from_numpy(x), rtol=0, atol=1e-9)


def test_sampling_feeds_the_network_t_times_1000_over_t_and_picks_its_default_solver():
    """FourierSampling.sample: the network sees t * 1000 / T (guided-diffusion's rescale_timesteps) at every visited
    t, as in training; without --solver: ancestral unless --steps asks for fewer than T."""
    from samplers.fourier import FourierPlan
    from samplers.generation import SeedInputs

    process = SPDProcess(T=40, **CIFAR)
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x, noise_labels, class_labels=None):
            assert x.dtype == torch.float32 and noise_labels.shape == (x.shape[0],)
            seen.append(noise_labels[0].item())
            return torch.zeros_like(x)

    inputs = SeedInputs(latents=torch.randn(2, 1, 4, 4), class_labels=None, randn_like=torch.randn_like)
    for solver in ('ddim', 'dpmpp_2m', 'ancestral', 'heun'):
        seen.clear()
        process.sampling.sample(Net(), FourierPlan(solver=solver, options={}, num_steps=5), inputs, None)
        visited = time_steps(process, 5, 'logsnr' if solver in ('dpmpp_2m', 'heun') else 'uniform', 4, 4).tolist()
        expected = [t * 1000 / 40 for t in visited]
        if solver == 'heun':  # predictor and corrector
            expected = [v for i, t in enumerate(expected) for v in ([t, expected[i + 1]] if i + 1 < 5 else [t])]
        assert seen == pytest.approx(expected, rel=1e-6), solver
    sampling = process.sampling
    assert sampling.solver_for(None, None) == 'ancestral' and sampling.solver_for(None, 40) == 'ancestral'
    assert sampling.solver_for(None, 39) == 'dpmpp_2m' and sampling.solver_for('ddim', 5) == 'ddim'


def test_respaced_ancestral_clamps_beta_at_the_references_0_999():
    """Ancestral over 3 of 4000 steps (guided-diffusion's respacing: beta = min(1 - abar_t / abar_s, 0.999)): the long
    first step's beta reaches the clamp at most frequencies; numpy written out."""
    process = SPDProcess(T=4000, **CIFAR)
    generator = torch.Generator().manual_seed(3)
    x_start = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=generator)
    noises = torch.randn(3, 2, 2, 8, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(2, 8, 8, dtype=torch.float64, generator=generator)

    def eps_model(x, t):
        return torch.tanh(x * weight)

    calls = []

    def randn_like(like):
        calls.append(1)
        return noises[len(calls) - 1]

    steps = time_steps(process, 3).tolist()
    assert steps == [3999, 2000, 0]
    abar = [process.alpha_bar(torch.tensor([t]), 8, 8).numpy()[0] for t in steps] + [np.ones((1, 8, 8))]
    fft = lambda v: np.fft.fft2(v, norm='ortho')  # noqa: E731
    ifft = lambda v: np.fft.ifft2(v, norm='ortho').real  # noqa: E731
    x, bound = x_start.numpy(), 0
    for i in range(3):
        e = fft(eps_model(torch.as_tensor(x), None).numpy())
        raw = 1 - abar[i] / abar[i + 1]
        bound += int((raw > 0.999).sum())
        beta = np.minimum(raw, 0.999)
        u = (fft(x) - beta / np.sqrt(1 - abar[i]) * e) / np.sqrt(1 - beta)
        x = ifft(u + (i < 2) * np.sqrt(beta) * fft(noises[i].numpy()))
    assert bound > 0
    torch.testing.assert_close(ancestral(eps_model, x_start, process, 3, randn_like=randn_like), torch.from_numpy(x),
                               rtol=0, atol=1e-9)


def test_time_steps_crowded_at_the_noise_end_stay_distinct_and_below_t():
    """A log-SNR curve that falls steeply over its last steps puts most logsnr levels there: after rounding they
    collide and are pushed past T - 1, and the downward pass must keep them distinct and below T."""

    class Steep:
        num_steps = 20

        def alpha_bar(self, t, height, width):
            t = t.to(torch.float64)
            log_snr = 5 - 0.01 * t - 4 * (t - 14).clamp(min=0)
            return torch.sigmoid(log_snr).reshape(-1, 1, 1, 1)

    schedule = Steep()
    for n in range(2, 20):
        levels = time_steps(schedule, n, 'logsnr').tolist()
        assert len(levels) == n and levels[0] == 19 and levels[-1] == 0, (n, levels)
        assert all(a > b for a, b in zip(levels, levels[1:])), (n, levels)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_corrupt_of_half_precision_images_runs_in_float32(dtype):
    """Half-precision images (e.g. from a bf16 autocast upstream) are corrupted in float32 and rounded once: CUDA's
    FFTs take no bf16, and this CPU build takes neither (NotImplementedError before)."""
    process = SPDProcess(T=1000, **CIFAR)
    y = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 500, 999])
    x = process.corrupt(y.to(dtype), t, eps)
    assert x.dtype == dtype
    assert torch.equal(x, process.corrupt(y.to(dtype).float(), t, eps).to(dtype))
    assert torch.equal(DDPMProcess(T=1000).corrupt(y.to(dtype), t, eps),
                       DDPMProcess(T=1000).corrupt(y.to(dtype).float(), t, eps).to(dtype))

def test_time_steps():
    process = SPDProcess(T=4000, **CIFAR)
    assert time_steps(process, None).tolist() == list(range(3999, -1, -1))
    uniform = time_steps(process, 5)
    assert uniform.tolist() == [3999, 2999, 2000, 1000, 0]  # guided-diffusion: round(i * 3999 / 4), ties to even
    for spacing in ('uniform', 'quadratic', 'logsnr'):
        levels = time_steps(process, 35, spacing, 16, 16)
        assert len(levels) == 35 and levels[0] == 3999 and levels[-1] == 0 and (levels.diff() < 0).all()
    assert time_steps(SPDProcess(T=10), 9, 'quadratic').tolist() == [9, 7, 6, 5, 4, 3, 2, 1, 0]  # no repeats


def test_quadratic_time_steps_are_round_of_the_squared_fraction():
    """quadratic: t_i = round((T - 1) (i / (N - 1))^2), here without collisions (the smallest gap is 12 steps)."""
    process = SPDProcess(T=1000, **CIFAR)
    expected = [round(999 * (i / 9) ** 2) for i in range(10)][::-1]
    assert time_steps(process, 10, 'quadratic').tolist() == expected == [999, 789, 604, 444, 308, 197, 111, 49, 12, 0]


def test_uniform_time_steps_are_guided_diffusions_space_timesteps():
    def space_timesteps(T, N):  # guided-diffusion's respace.py with one section, written out
        stride, position, taken = (T - 1) / (N - 1), 0.0, []
        for _ in range(N):
            taken.append(round(position))
            position += stride
        return sorted(set(taken), reverse=True)

    for T in (10, 100, 1000):
        process = SPDProcess(T=T, **CIFAR)
        for N in range(2, T):
            assert time_steps(process, N).tolist() == space_timesteps(T, N), (T, N)
    # A half-way tie that the stride summed step by step rounds down: 7 x 99 / 14 = 49.5 exactly, but the sum is
    # 49.4999...; round(i (T-1) / (N-1)) would take 50.
    assert 49 in time_steps(SPDProcess(T=100, **CIFAR), 15).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Fitting Sigma0.

def test_fit_recovers_known_constants():
    """S2: images drawn with a known power law give back (c1, c2, m) within 5 %."""
    truth = dict(c1=2.0, c2=0.5, m=2.5)
    images = gaussian_images(power_law_spectrum(**truth, height=16, width=16), 8000, seed=3)
    fitted = fit_power_law(mean_power_spectrum(images))
    for key, value in truth.items():
        assert abs(fitted[key] / value - 1) < 0.05, (key, fitted)
    assert fitted['rms_log10'] < 0.01


def test_spectrum_radii_and_weighted_fit_against_direct_formulas():
    """radial_frequency on a non-square grid, mean_power_spectrum over 3 channels (numpy's FFT per image and channel)
    and fit_power_law's weighted least squares: at its c2, (log c1, m) solve the 2 x 2 normal equations of the radial
    means weighted by their number of frequencies (written out here), and c2 is a minimum of that weighted residual."""
    ky, kx = [0, 1, -2, -1], [0, 1, 2, -3, -2, -1]  # integer DFT frequencies, unshifted layout
    expected = torch.tensor([[math.hypot(a, b) for b in kx] for a in ky], dtype=torch.float64)
    torch.testing.assert_close(radial_frequency(4, 6), expected, rtol=0, atol=1e-12)

    x = torch.randn(5, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    direct = np.mean(np.abs(np.fft.fft2(x.numpy(), norm='ortho')) ** 2, axis=(0, 1))
    torch.testing.assert_close(mean_power_spectrum(x), torch.from_numpy(direct), rtol=1e-12, atol=0)

    size = 12
    k2 = {}
    for a in range(size):
        for b in range(size):
            fa, fb = min(a, size - a), min(b, size - b)
            k2.setdefault(fa * fa + fb * fb, []).append((a, b))
    power = power_law_spectrum(1.3, 0.4, 2.2, size, size) * (1 + 0.4 * torch.sin(3 * radial_frequency(size, size)))
    fitted = fit_power_law(power)
    radii = np.array([math.sqrt(r2) for r2 in sorted(k2) if r2 > 0])
    means = np.array([np.mean([float(power[a, b]) for a, b in k2[r2]]) for r2 in sorted(k2) if r2 > 0])
    counts = np.array([len(k2[r2]) for r2 in sorted(k2) if r2 > 0], dtype=np.float64)

    def weighted_fit(c2):
        u, y = -np.log(c2 + radii), np.log(means)
        sw, su, sy = counts.sum(), (counts * u).sum(), (counts * y).sum()
        suu, suy = (counts * u * u).sum(), (counts * u * y).sum()
        m = (sw * suy - su * sy) / (sw * suu - su * su)
        log_c1 = (sy - m * su) / sw
        return log_c1, m, float((counts * (y - log_c1 - m * u) ** 2).sum() / sw)

    log_c1, m, mse = weighted_fit(fitted['c2'])
    assert fitted['c1'] == pytest.approx(math.exp(log_c1), rel=1e-9) and fitted['m'] == pytest.approx(m, rel=1e-9)
    assert fitted['rms_log10'] == pytest.approx(math.sqrt(mse) / math.log(10), rel=1e-9)
    assert fitted['c2_at_bound'] is None
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert weighted_fit(fitted['c2'] * factor)[2] >= mse


def test_dataset_power_spectrum_is_the_mean_over_images_and_channels_of_numpys_fft(tmp_path):
    """fit=data's spectrum: E|F x|^2 over images and channels with x = uint8 / 127.5 - 1 (numpy, per image)."""
    from losses.spd import dataset_power_spectrum

    rnd = np.random.RandomState(0)
    images = rnd.randint(0, 256, size=(7, 8, 8, 3)).astype(np.uint8)  # NHWC, as stored
    path = write_zip_dataset(str(tmp_path / 'rgb.zip'), images)
    power, num_images, shape = dataset_power_spectrum(path, chunk=3)  # chunks of 3, 3 and 1 images
    assert num_images == 7 and tuple(shape) == (3, 8, 8)
    x = images.transpose(0, 3, 1, 2).astype(np.float64) / 127.5 - 1
    expected = np.mean(np.abs(np.fft.fft2(x, norm='ortho')) ** 2, axis=(0, 1))
    torch.testing.assert_close(power, torch.from_numpy(expected), rtol=1e-10, atol=0)


def test_loss_defaults_are_the_references():
    """SPD: T = 4000 and CIFAR-10's Sigma0 (1.59, 0.0086, 2.0; configs/cifar10_fourier.yml); the DDPM control:
    guided-diffusion's linear betas 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T, T = 4000."""
    assert SPDLoss().process.options() == dict(T=4000, c1=1.59, c2=0.0086, m=2.0)
    assert DDPMLoss().process.options() == dict(T=4000, beta_start=1e-4, beta_end=0.02)
    betas = np.linspace(0.25e-4, 0.25 * 0.02, 4000)
    expected = np.cumprod(1 - betas)[[0, 1999, 3999]]
    got = DDPMLoss().process.alpha_bar(torch.tensor([0, 1999, 3999]), 1, 1).flatten().numpy()
    assert np.allclose(got, expected, rtol=1e-12, atol=0)


def test_fit_option_is_settled_once_before_training(tmp_path):
    rnd = np.random.RandomState(0)
    images = np.clip(128 + 40 * rnd.randn(64, 8, 8).cumsum(axis=2) / 3, 0, 255).astype(np.uint8)
    data = write_zip_dataset(str(tmp_path / 'data.zip'), images)
    kwargs = losses.loss_kwargs('spd', losses.parse_loss_options('spd', ['fit=data', 'T=100']))
    resolved, notes = losses.prepare_loss_kwargs(kwargs, dict(path=data))
    assert resolved.fit == '' and resolved.fit_source.startswith(f'fitted to {data}: 64 images 1x8x8')
    assert (resolved.c1, resolved.c2, resolved.m) != (1.59, 0.0086, 2.0) and 'c1=' in notes[0]
    assert SPDLoss(**{k: v for k, v in resolved.items() if k != 'class_name'}).process.options()['c1'] == resolved.c1
    again, _ = losses.prepare_loss_kwargs(losses.loss_kwargs('spd', dict(fit=data)), dict(path='elsewhere'))
    assert again.c1 == resolved.c1  # fit=PATH: that dataset
    with pytest.raises(ValueError, match='fit=nowhere.zip: no dataset'):
        losses.prepare_loss_kwargs(losses.loss_kwargs('spd', dict(fit='nowhere.zip')), dict(path=data))
    with pytest.raises(ValueError, match='settled before training'):
        SPDLoss(fit='data')
    edm, notes = losses.prepare_loss_kwargs(losses.loss_kwargs('edm'), dict(path=data))
    assert edm == losses.loss_kwargs('edm') and notes == []


def test_fit_skips_empty_radii_and_refuses_another_resolution(tmp_path):
    # Nearest-neighbour 2x upsampling leaves the frequencies at 8 cycles (the box filter's zero) without power:
    # those radii are left out and counted, and the fit stands on the others.
    rnd = np.random.RandomState(1)
    small = np.clip(128 + 40 * rnd.randn(200, 8, 8).cumsum(axis=2) / 3, 0, 255).astype(np.uint8)
    upsampled = small.repeat(2, axis=1).repeat(2, axis=2)
    power = mean_power_spectrum(torch.as_tensor(upsampled[:, None] / 127.5 - 1))
    radii, mean_power, _counts = radial_average(power)
    empty = int(((radii > 0) & (mean_power < 1e-20)).sum())
    assert empty >= 1
    fitted = fit_power_law(torch.where(power < 1e-20, torch.zeros_like(power), power))
    assert fitted['zero_power_radii'] == empty and math.isfinite(fitted['c1']) and fitted['c1'] > 0
    with pytest.raises(ValueError, match='at least 3 distinct non-zero frequencies.*have 0 of'):
        fit_power_law(torch.zeros(8, 8))

    data = write_zip_dataset(str(tmp_path / 'data8.zip'), small)
    kwargs = losses.loss_kwargs('spd', dict(fit=data))
    with pytest.raises(ValueError, match=r'holds 8x8 images but training is at 16x16'):
        losses.prepare_loss_kwargs(kwargs, dict(path='train16.zip', resolution=16))
    resolved, _ = losses.prepare_loss_kwargs(kwargs, dict(path='train8.zip', resolution=8))
    assert resolved.fit_source.startswith(f'fitted to {data}: 200 images 1x8x8')


def test_published_sigma0_at_another_resolution_warns():
    defaults = losses.loss_kwargs('spd')
    with pytest.warns(UserWarning, match=r'fitted at 32x32; at 64x64 .* about 4x that power'):
        losses.prepare_loss_kwargs(defaults, dict(path='data.zip', resolution=64))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        losses.prepare_loss_kwargs(defaults, dict(path='data.zip', resolution=32))  # CIFAR-10's own size
        losses.prepare_loss_kwargs(losses.loss_kwargs('spd', dict(c1=3.0)), dict(path='data.zip', resolution=64))


def test_fit_source_is_recorded_by_the_fit_not_given():
    """fit_source is the fit's provenance: --loss-opt refuses it (it would pass for a fit's record and, before,
    silenced the warning above) and --help does not list it; the constructor still takes the resolved options."""
    with pytest.raises(ValueError, match=r"option 'fit_source' of loss 'spd' is recorded by the loss itself, not "
                                         r"given: .*fit=data"):
        losses.parse_loss_options('spd', ['fit_source=fitted to CIFAR-10'])
    assert 'fit_source' not in losses.user_options('spd') and 'fit_source' in losses.loss_options('spd')
    assert 'fit_source' not in losses.describe_losses() and 'fit=' in losses.describe_losses()
    with pytest.raises(ValueError, match=r"no option 'fit_sourc'; its options are: T, c1, c2, m, fit$"):
        losses.parse_loss_options('spd', ['fit_sourc=x'])
    with pytest.warns(UserWarning, match=r'fitted at 32x32'):
        losses.prepare_loss_kwargs(losses.loss_kwargs('spd', dict(fit_source='x')), dict(resolution=64))


# ---------------------------------------------------------------------------------------------------------------------
# Loss, preconditioning, snapshots, CLIs.

def tiny_eps_net(seed=0, resolution=8):
    torch.manual_seed(seed)
    return EpsPrecond(img_resolution=resolution, img_channels=1, model_type='SongUNet', model_channels=8,
                      channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval().requires_grad_(False)


def test_loss_is_the_eps_mse_and_preconditioning_follows_the_loss():
    seen = {}

    def net(x, labels, class_labels, augment_labels=None):
        seen.update(x=x, labels=labels)
        return torch.zeros_like(x)

    loss_fn = SPDLoss(T=50)
    batch = losses.Batch(images=torch.rand(6, 1, 8, 8) * 2 - 1, labels=torch.zeros(6, 0),
                         noise=torch.randn(6, 1, 8, 8))
    torch.manual_seed(0)
    loss = loss_fn(net, batch)
    t = (seen['labels'].to(torch.float64) * 50 / 1000).round().to(torch.int64)
    assert torch.allclose(seen['labels'].double(), t.double() * 1000 / 50) and (0 <= t).all() and (t < 50).all()
    assert torch.allclose(seen['x'], loss_fn.process.corrupt(batch.images, t, batch.noise), atol=1e-6)
    assert torch.equal(loss, batch.noise ** 2)  # target: the white pixel noise itself, unweighted
    net_out = tiny_eps_net()(torch.randn(2, 1, 8, 8), torch.tensor([3.0, 900.0]))
    assert net_out.shape == (2, 1, 8, 8) and net_out.dtype == torch.float32
    assert losses.preconditioning_for('spd', None) == 'eps' and losses.preconditioning_for('ddpm', 'eps') == 'eps'
    assert losses.preconditioning_for('edm', None) == 'edm' and losses.preconditioning_for('vp', 've') == 've'
    with pytest.raises(ValueError, match='--precond=edm cannot train --loss=spd'):
        losses.preconditioning_for('spd', 'edm')
    with pytest.raises(ValueError, match='--precond=eps is not a denoiser'):
        losses.preconditioning_for('edm', 'eps')
    assert losses.DEFAULT_LOSS_FOR_PRECOND['eps'] == 'spd'


@pytest.fixture(scope='module')
def spd_snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp('spd')
    paths = {}
    for name, loss in (('spd', dict(class_name='losses.spd.SPDLoss', T=20)),
                       ('ddpm', dict(class_name='losses.spd.DDPMLoss', T=50))):
        paths[name] = str(root / f'{name}.pkl')
        process = SPDLoss(T=20).process if name == 'spd' else DDPMLoss(T=50).process
        snapshots.save_snapshot(paths[name], ema=tiny_eps_net(), loss_kwargs=loss, process=process)
    return paths


def test_snapshot_records_the_process_and_imports_safely(spd_snapshots):
    snapshot = snapshots.read_snapshot(spd_snapshots['spd'])
    assert isinstance(snapshot.net, EpsPrecond) and isinstance(snapshot.process, SPDProcess)
    assert snapshot.data['process'] == {'name': 'spd', 'options': dict(T=20, c1=1.59, c2=0.0086, m=2.0)}
    assert process_record(build_process(snapshot.data['process'])) == snapshot.data['process']
    assert snapshot.data['loss']['name'] == 'spd'
    assert isinstance(snapshots.read_snapshot(spd_snapshots['ddpm']).process, DDPMProcess)


@pytest.mark.parametrize(('args', 'expected'), [
    ([], 'solver=ancestral() process=spd steps=20 of T=20 (all), t=19..0; 20 NFE'),
    (['--steps', '6'], 'solver=dpmpp_2m() process=spd steps=6 of T=20 (logsnr)'),
    (['--solver', 'heun', '--steps', '4'], 'steps=4 of T=20 (logsnr), t=19..0; 7 NFE'),
    (['--solver', 'ddim', '--steps', '5', '--solver-opt', 'spacing=quadratic'], 'solver=ddim(spacing=quadratic)'),
])
def test_generate_samples_an_spd_snapshot(spd_snapshots, tmp_path, args, expected):
    result = CliRunner().invoke(generate.main, ['--network', spd_snapshots['spd'], '--outdir', str(tmp_path),
                                                '--seeds', '0-1', '--device', 'cpu', *args])
    assert result.exit_code == 0, result.output
    assert expected in result.output
    assert {'000000.png', '000001.png'} <= set(os.listdir(tmp_path))


def test_generate_ddpm_control_and_refusals(spd_snapshots, tmp_path):
    result = CliRunner().invoke(generate.main, ['--network', spd_snapshots['ddpm'], '--outdir', str(tmp_path / 'a'),
                                                '--seeds', '0', '--device', 'cpu'])
    assert result.exit_code == 0 and 'solver=ancestral(clip_x0=True) process=ddpm' in result.output, result.output
    for args, message in ((['--solver', 'unipc'], "unknown solver 'unipc'"),
                          (['--schedule', 'logsnr'], "--schedule does not apply to the 'spd' process"),
                          (['--sigma_max', '80', '--end', 'zero'], '--sigma_max, --end do not apply'),
                          (['--solver', 'heun', '--solver-opt', 'clip_x0=true'], "'clip_x0' is not an option")):
        result = CliRunner().invoke(generate.main, ['--network', spd_snapshots['spd'], '--outdir', str(tmp_path / 'b'),
                                                    '--seeds', '0', '--device', 'cpu', *args])
        assert result.exit_code != 0 and message in result.output, result.output
        assert not os.path.exists(tmp_path / 'b' / '000000.png')


@pytest.mark.slow
def test_train_cli_spd_and_ddpm_lower_the_loss_and_generate(tmp_path):
    import json

    import train
    images = random_images(256, resolution=8)
    data = write_zip_dataset(str(tmp_path / 'data.zip'), images)
    for loss in ('spd', 'ddpm'):
        outdir = tmp_path / loss
        result = CliRunner().invoke(train.main, [
            '--outdir', str(outdir), '--data', data, '--loss', loss, '--loss-opt', 'T=50', '--batch', '32',
            '--cbase', '8', '--cres', '1', '--blocks', '1', '--attn', '', '--duration', '0.004', '--tick', '1',
            '--snap', '2', '--dump', '4', '--lr', '2e-3', '--lr-rampup', '0', '--augment', '0', '--dropout', '0',
            '--workers', '0', '--device', 'cpu', '--seed', '1'], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        run_dir, = glob.glob(str(outdir / '00000-data-uncond-ddpmpp-eps-*'))
        stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
        losses_by_tick = [s['Loss/loss']['mean'] for s in stats]
        assert losses_by_tick[-1] < 0.8 * losses_by_tick[0], losses_by_tick
        snapshot = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]
        result = CliRunner().invoke(generate.main, ['--network', snapshot, '--outdir', str(tmp_path / f'{loss}-png'),
                                                    '--seeds', '0-3', '--device', 'cpu'])
        pngs = [name for name in os.listdir(tmp_path / f'{loss}-png') if name.endswith('.png')]
        assert result.exit_code == 0 and len(pngs) == 4, result.output
    result = CliRunner().invoke(train.main, ['--outdir', str(tmp_path / 'x'), '--data', data, '--loss', 'spd',
                                             '--precond', 'edm', '--dry-run', '--device', 'cpu'])
    assert result.exit_code != 0 and '--precond=edm cannot train --loss=spd' in result.output


@pytest.mark.slow
def test_spd_training_resumes_exactly(tmp_path):
    data = write_zip_dataset(str(tmp_path / 'data.zip'), random_images(64))
    network = dict(class_name='training.preconditioning.EpsPrecond', model_type='SongUNet', model_channels=8,
                   channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0, use_fp16=False)
    kwargs = dict(network_kwargs=network, loss_kwargs=dict(class_name='losses.spd.SPDLoss', T=50), snapshot_ticks=1)
    runs = {name: str(tmp_path / name) for name in ('straight', 'first', 'resumed')}
    for path in runs.values():
        os.makedirs(path)
    tl.training_loop(**loop_kwargs(runs['straight'], data, total_kimg=0.048, **kwargs))
    tl.training_loop(**loop_kwargs(runs['first'], data, total_kimg=0.024, **kwargs))
    first_state = sorted(glob.glob(os.path.join(runs['first'], 'training-state-*.pt')))[-1]
    tl.training_loop(**loop_kwargs(runs['resumed'], data, total_kimg=0.048, resume_state_dump=first_state, **kwargs))
    a, b = (torch.load(sorted(glob.glob(os.path.join(runs[name], 'training-state-*.pt')))[-1], weights_only=True)
            for name in ('straight', 'resumed'))
    for key in ('networks', 'ema', 'optimizers', 'rng'):
        assert_tree_equal(a[key], b[key], key)
    snapshot = snapshots.read_snapshot(sorted(glob.glob(os.path.join(runs['resumed'], 'network-snapshot-*.pkl')))[-1])
    assert snapshot.data['process'] == {'name': 'spd', 'options': dict(T=50, c1=1.59, c2=0.0086, m=2.0)}


def test_training_time_is_uniform_over_all_t_steps():
    """t ~ U{0, ..., T-1}: every step drawn, in equal proportion (chi-square against uniform); the mean (T - 1) / 2
    (t = T - 1 included)."""
    import scipy.stats
    T, num = 10, 100_000
    loss_fn = SPDLoss(T=T)
    torch.manual_seed(3)
    t = loss_fn.sample_time(None, num, 'cpu').flatten()
    assert t.dtype == torch.int64 and t.shape == (num,)
    counts = torch.bincount(t, minlength=T)
    assert len(counts) == T and counts.min() > 0
    assert scipy.stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert abs(t.double().mean().item() - (T - 1) / 2) < 0.03


def test_fit_says_when_c2_ends_at_its_search_bound(tmp_path):
    # A spectrum that is an exact power law of |k| (c2 = 0) has its best c2 below the search range: the fit ends at
    # the lower bound and says so; one with c2 = 0.5 inside the range does not.
    from processes.spd import C2_SEARCH

    law = power_law_spectrum
    pure = law(c1=2.0, c2=1e-12, m=2.0, height=16, width=16)
    fitted = fit_power_law(pure)
    assert fitted['c2_at_bound'] == C2_SEARCH[0] and abs(fitted['c2'] / C2_SEARCH[0] - 1) < 1e-2
    assert abs(fitted['m'] - 2.0) < 1e-3
    inside = fit_power_law(law(c1=2.0, c2=0.5, m=2.5, height=16, width=16))
    assert inside['c2_at_bound'] is None and abs(inside['c2'] - 0.5) < 1e-4
    flat_at_dc = fit_power_law(law(c1=2.0, c2=30.0, m=2.5, height=16, width=16))
    assert flat_at_dc['c2_at_bound'] == C2_SEARCH[1]
    # ... and the run's fit_source (printed, recorded in training_options.json) says it.
    import losses.spd as spd_loss

    rnd = np.random.RandomState(0)
    data = write_zip_dataset(str(tmp_path / 'data.zip'), rnd.randint(0, 256, [16, 8, 8]).astype(np.uint8))
    for result, said in ((fitted, True), (inside, False)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(spd_loss, 'fit_power_law', lambda power, result=result: result)
            resolved, notes = losses.prepare_loss_kwargs(losses.loss_kwargs('spd', dict(fit='data')), dict(path=data))
        phrase = "c2 at its search bound 1e-06 (the images do not fix it within [1e-06, 1]; to choose it, give c1, c2"
        assert (phrase in resolved.fit_source) == said and (phrase in notes[0]) == said


def test_few_diffusion_steps_are_warned_about_with_the_signal_their_noisiest_step_keeps(recwarn):
    # The reference's grid ends at tau = 1 / T: at T = 50 (32x32, CIFAR-10's Sigma0) the last step keeps abar(k) up
    # to 0.109 of a frequency's power, from the closed form (1 - Sigma0^tau) / (1 - Sigma0) at tau = 1 / T.
    sigma0 = 1.59 / (0.0086 + np.hypot(*np.meshgrid(np.fft.fftfreq(32, 1 / 32), np.fft.fftfreq(32, 1 / 32)))) ** 2
    tau = (50 - 49) / 50  # t' = linspace(1, T - 1, T)[T - 1] = T - 1
    expected = float(np.max((1 - sigma0 ** tau) / (1 - sigma0)))
    SPDLoss.resolve_options({'T': 50}, dict(resolution=32))
    messages = [str(w.message) for w in recwarn if 'noisiest step' in str(w.message)]
    assert messages == [f"SPD with T=50: its noisiest step keeps up to {100 * expected:.1f} % of a frequency's signal "
                        f"power (abar at t = T - 1), yet sampling starts from pure noise; the reference trains with "
                        f"T = 4000 (0.14 % at 32x32)"] and 0.10 < expected < 0.11
    recwarn.clear()
    SPDLoss.resolve_options({'T': 4000}, dict(resolution=32))
    SPDLoss.resolve_options({'T': 1}, dict(resolution=32))  # refused later by the loss itself, not here
    assert not [w for w in recwarn if 'noisiest step' in str(w.message)]
