"""Discriminator guidance: the correction against autograd and the reference's algorithm, the VE -> VP mapping, the
clip, the tau window, boosting, AOT-paired training, files and command lines, and two toys where the score model is
deliberately wrong (a shifted Gaussian mixture): with the closed-form optimal discriminator and with a trained one,
guided sampling moves the samples to the true distribution."""

import dataclasses
import hashlib
import json
import math
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import train_dg
import training.snapshots  # noqa: F401  (registers the network classes a DG pickle may hold)
from losses.aot import AOTLoss, pool_seed
from losses.base import Batch
from samplers import generation, guidance, make_grid, sample
from samplers.dg import discriminator as dgd
from samplers.dg import networks as dgn
from torch_utils import persistence
from training import dg
from training.preconditioning import EDMPrecond

B0, B1 = 0.1, 20.0


def tiny_edm_net(resolution=8, channels=3, label_dim=0, seed=1, mult=(1,)):
    """A small EDMPrecond(SongUNet) with random (not near-zero) weights: its middle features depend on the input."""
    net = EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=label_dim, model_type="SongUNet",
                     model_channels=8, channel_mult=list(mult), num_blocks=1, attn_resolutions=[], dropout=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return net.eval().requires_grad_(False)


def tiny_head(resolution, channels, condition=False, num_classes=1000, seed=3):
    torch.manual_seed(seed)
    head = dgn.ADMEncoderUNet(**dgn.dg_head_kwargs(resolution, channels, width=32, depth=1, head_channels=32,
                                                   condition=condition, num_classes=num_classes))
    with torch.no_grad():  # ADM zero-initialises some layers: make every part of the head matter
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return head


def tiny_adm_encoder(seed=4):
    torch.manual_seed(seed)
    encoder = dgn.ADMEncoderUNet(image_size=8, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
                                 attention_ds=(2,), channel_mult=(1, 2), head_channels=32)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return encoder.eval().requires_grad_(False)


def tiny_discriminator(kind="network", conditional=False, label_dim=0):
    if kind == "network":
        encoder = tiny_edm_net(label_dim=label_dim)
        head = tiny_head(8, 8, conditional, num_classes=max(label_dim, 1))
    else:
        encoder = tiny_adm_encoder()
        head = tiny_head(4, 64, conditional, num_classes=max(label_dim, 1))
    return dgd.Discriminator(encoder, head, kind, img_resolution=8, img_channels=3, label_dim=label_dim)


def prepared(disc, net, grid, solver="heun", **options):
    opts = guidance.DiscriminatorGuidance("in-memory", **options)
    levels, weights = opts._weights(net, grid, solver, {}, False)
    return guidance.PreparedDG(opts, disc, weights, levels)


# ---------------------------------------------------------------------------------------------------------------------
# The noise convention, the clip, the correction.


def test_ve_sigma_to_vp_tau_and_alpha_follow_the_formula():
    vp = dgd.VPTime()
    sigma = torch.tensor([1e-3, 0.002, 0.0447, 0.5, 1.0, 5.0, 80.0, 152.0], dtype=torch.float64)
    s = sigma.numpy()
    tau_ref = (-B0 + np.sqrt(B0 ** 2 + 2 * (B1 - B0) * np.log(1 + s ** 2))) / (B1 - B0)
    tau = vp.tau(sigma)
    np.testing.assert_allclose(tau.numpy(), tau_ref, rtol=1e-9)  # log1p here: cancellation in log(1 + s^2)
    mean_ref = np.exp(-0.25 * tau_ref ** 2 * (B1 - B0) - 0.5 * tau_ref * B0)  # the VP marginal's mean coefficient
    np.testing.assert_allclose(vp.alpha(tau).numpy(), mean_ref, rtol=1e-12)
    np.testing.assert_allclose(vp.alpha(tau).numpy(), 1 / np.sqrt(1 + s ** 2), rtol=1e-12)
    np.testing.assert_allclose(vp.sigma(tau).numpy(), s, rtol=1e-10)
    np.testing.assert_allclose((vp.std(tau) ** 2 + vp.alpha(tau) ** 2).numpy(), 1, rtol=1e-12)
    # tau = 0.01 (the window's lower end) is sigma = 0.0447; EDM's sigma_max = 80 is tau = 0.9335.
    assert vp.sigma(torch.tensor(0.01, dtype=torch.float64)).item() == pytest.approx(0.04468, abs=1e-5)
    assert vp.tau(torch.tensor(80.0, dtype=torch.float64)).item() == pytest.approx(0.9335, abs=1e-4)


def watch_times(encoder, head):
    """A list that receives the time tensor of every encoder.features and head call."""
    seen, features = [], encoder.features
    encoder.features = lambda x, t, class_labels=None: seen.append(t.clone()) or features(x, t, class_labels)
    head.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    return seen


def test_the_64px_classifier_is_fed_the_cosine_schedule_time_of_the_same_noise_level():
    vp = dgd.VPTime()
    sigma = torch.tensor([1e-3, 0.0447, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    tau = vp.tau(sigma)
    t_cos = vp.cosine_time(tau).numpy()
    # The reference's compute_t_cos_from_t_lin, written out; and the cosine schedule's alpha_bar at t_cos (Nichol &
    # Dhariwal, s = 0.008) equals the linear schedule's alpha^2 = 1 / (1 + sigma^2): the same noise level.
    s_off = 0.008
    f_0 = np.cos(s_off / (1 + s_off) * np.pi / 2) ** 2
    t_lin = tau.numpy()
    sqrt_alpha_bar = np.exp(-0.25 * t_lin ** 2 * (B1 - B0) - 0.5 * t_lin * B0)
    t_ref = (1 + s_off) * 2 / np.pi * np.arccos(np.sqrt(f_0) * sqrt_alpha_bar) - s_off
    np.testing.assert_allclose(t_cos, t_ref, rtol=1e-12)
    alpha_bar_cos = np.cos((t_cos + s_off) / (1 + s_off) * np.pi / 2) ** 2 / f_0
    np.testing.assert_allclose(alpha_bar_cos, 1 / (1 + sigma.numpy() ** 2), rtol=1e-9)
    assert t_cos[2] == pytest.approx(0.056, abs=1e-3) and t_cos[4] == pytest.approx(0.936, abs=1e-3)

    # Which times the networks see: cosine for a 64 px ADM encoder (encoder and head alike), linear otherwise.
    for size, expected in ((64, vp.cosine_time(tau)), (8, tau)):
        torch.manual_seed(0)
        encoder = dgn.ADMEncoderUNet(image_size=size, in_channels=3, model_channels=32, out_channels=10,
                                     num_res_blocks=1, attention_ds=(), channel_mult=(1, 2), head_channels=32).eval()
        head = tiny_head(size // 2, 64)
        disc = dgd.Discriminator(encoder, head, "adm", img_resolution=size, img_channels=3)
        assert disc.cosine_time == (size == 64)
        seen = watch_times(encoder, head)
        with torch.no_grad():
            disc.logit(torch.randn(len(sigma), 3, size, size), sigma)
        assert len(seen) == 2
        for t in seen:
            torch.testing.assert_close(t, expected.float(), rtol=0, atol=0)


def test_importance_sampled_times_are_the_references_and_log_uniform_in_sigma():
    vp = dgd.VPTime()
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = vp.sample_time(u, t_min=1e-5).numpy()

    def integral(x):
        return 0.5 * x ** 2 * (B1 - B0) + x * B0

    def antiderivative(x):  # the reference's, written out
        return np.log(1 - np.exp(-integral(x))) + integral(x)

    z = antiderivative(1.0) - antiderivative(1e-5)
    t_ref = (-B0 + np.sqrt(B0 ** 2 + 2 * (B1 - B0) * np.log(1 + np.exp(z * u.numpy() + antiderivative(1e-5))))) \
        / (B1 - B0)
    np.testing.assert_allclose(t, t_ref, rtol=1e-9)
    log_sigma = np.log(vp.sigma(torch.as_tensor(t)).numpy())
    lo = math.log(vp.sigma(torch.tensor(1e-5, dtype=torch.float64)).item())
    hi = math.log(vp.sigma(torch.tensor(1.0, dtype=torch.float64)).item())
    from scipy import stats
    assert stats.kstest((log_sigma - lo) / (hi - lo), stats.uniform(0, 1).cdf).pvalue > 1e-3


def test_training_perturbation_is_y_plus_sigma_of_the_sampled_time_times_the_noise():
    generator = torch.Generator().manual_seed(3)
    y, n = torch.rand([5, 3, 4, 4], generator=generator) * 2 - 1, torch.randn([5, 3, 4, 4], generator=generator)
    u = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    x, sigma = dg.perturb(y, n, u, dgd.VPTime(), 1e-5)
    t = dgd.VPTime().sample_time(u, 1e-5).numpy()  # pinned against the reference by the test above
    sigma_ref = np.sqrt(np.expm1(0.5 * t ** 2 * (B1 - B0) + t * B0))
    np.testing.assert_allclose(sigma.numpy(), sigma_ref, rtol=1e-9)
    expected = y.double().numpy() + sigma_ref[:, None, None, None] * n.double().numpy()
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_a_conditional_discriminator_reads_the_labels_it_is_given():
    disc = tiny_discriminator("adm", conditional=True, label_dim=3)
    x, sigma = torch.randn([3, 3, 8, 8], generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 1.0, 4.0])
    labels = torch.eye(3)[[0, 1, 2]]
    with torch.no_grad():
        logits = disc.logit(x, sigma, labels)
        other = disc.logit(x, sigma, torch.eye(3)[[2, 0, 1]])
        tau = dgd.VPTime().tau(sigma.double())
        alpha = (1 / torch.sqrt(1 + sigma.double() ** 2)).reshape(-1, 1, 1, 1)
        features = disc.encoder.features((alpha * x).float(), tau.float())
        expected = disc.head(features, tau.float(), torch.tensor([0, 1, 2])).reshape(-1)
    torch.testing.assert_close(logits, expected)
    assert (logits - other).abs().min() > 1e-4


class SignDiscriminator(torch.nn.Module):
    """Calls an image real when its mean pixel is positive: a discriminator of known accuracy."""

    def logit(self, x, sigma, class_labels=None):
        return x.mean(dim=(1, 2, 3))


def test_accuracy_by_noise_level_of_a_known_discriminator():
    real = torch.full([4, 1, 4, 4], 230, dtype=torch.uint8)  # all called real: all right
    fake = torch.full([4, 1, 4, 4], 20, dtype=torch.uint8)
    fake[0] = 230  # one of four called real: 3/4 right
    result = dg.accuracy_by_noise_level(SignDiscriminator(), real, fake, [0.01])
    assert result == {0.01: {"real": 1.0, "fake": 0.75, "mean": 0.875}}


def test_clipped_log_ratio():
    logit = torch.tensor([-40.0, -3.0, 0.0, 2.5, 40.0], requires_grad=True)
    ratio = dgd.clipped_log_ratio(logit)
    edge = math.log((1 - 1e-5) / 1e-5)  # 11.5129; the upper clip in float32 (as the reference) is 11.5116
    np.testing.assert_allclose(ratio.detach().numpy(), [-edge, -3.0, 0.0, 2.5, edge], rtol=2e-4, atol=1e-5)
    ratio.sum().backward()
    np.testing.assert_allclose(logit.grad.numpy(), [0, 1, 1, 1, 0], atol=1e-4)  # the clip stops the gradient


@pytest.mark.parametrize("kind", ["network", "adm"])
def test_correction_is_w_sigma_times_grad_log_ratio_by_autograd(kind):
    disc = tiny_discriminator(kind)
    net = tiny_edm_net(seed=7)
    x = torch.randn([3, 3, 8, 8], generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    sigma, weight = torch.tensor(1.7, dtype=torch.float64), 1.5
    grid = make_grid("edm", 4, end="zero")
    denoiser = guidance.GuidedDenoiser(net, prepared(disc, net, grid, weight=weight), [weight])
    guided = denoiser(x, sigma).to(torch.float64)
    plain = net(x, sigma).to(torch.float64)

    # Independent: autograd of log(d / (1 - d)) through the test's own composition of VP map, encoder and head.
    s = float(sigma)
    tau = (-B0 + math.sqrt(B0 ** 2 + 2 * (B1 - B0) * math.log(1 + s * s))) / (B1 - B0)
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        if kind == "adm":
            features = disc.encoder.features((xr / math.sqrt(1 + s * s)).float(), torch.full([3], tau))
        else:
            features = dgd.network_features(disc.encoder, xr.float(), torch.full([3], s))
        d = torch.sigmoid(disc.head(features, torch.full([3], tau)).reshape(-1)).clamp(1e-5, 1 - 1e-5)
        (c,) = torch.autograd.grad(torch.log(d / (1 - d)).sum(), xr)
    assert c.abs().max() > 1e-4  # the toy discriminator has a real gradient
    slope_change = (x - guided) / sigma - (x - plain) / sigma
    torch.testing.assert_close(slope_change, -weight * sigma * c, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(guided - plain, weight * sigma ** 2 * c, rtol=2e-4, atol=1e-7)


def test_correction_is_zero_outside_the_tau_window_and_for_zero_weight():
    disc = tiny_discriminator("adm")
    x = torch.randn([2, 3, 8, 8], dtype=torch.float64)
    for sigma in (0.002, 0.04, 200.0):  # tau < 0.01 below sigma = 0.0447; tau > 1 above sigma = 152
        correction, log_ratio, active, evaluated = guidance.dg_correction(disc, x, sigma)
        assert not active.any() and not correction.any() and (log_ratio == guidance.OUT_OF_WINDOW_LOG_RATIO).all()
        assert not evaluated
    correction, _, active, _ = guidance.dg_correction(disc, x, torch.tensor([0.02, 0.5], dtype=torch.float64))
    assert active.tolist() == [False, True] and not correction[0].any() and correction[1].any()  # per sample


@pytest.fixture(scope="module")
def dg_files(tmp_path_factory):
    """A network snapshot and DG pickles (network and ADM encoders) written to files."""
    folder = tmp_path_factory.mktemp("dg")
    net_path = str(folder / "net.pkl")
    persistence.save_network_pickle(net_path, dict(ema=tiny_edm_net(seed=7)))
    paths = dict(net=net_path)
    for kind in ("network", "adm"):
        paths[kind] = str(folder / f"dg-{kind}.pkl")
        dgd.save_discriminator(paths[kind], tiny_discriminator(kind))
    return paths


def test_zero_weight_and_a_window_outside_the_grid_are_bit_identical_to_unguided_sampling(dg_files):
    net = persistence.load_network_pickle(dg_files["net"])["ema"]
    seeds = [0, 1, 2]
    plain = generation.sample_seeds(net, seeds, generation.SamplerConfig(num_steps=6), device="cpu")
    for options in (dict(weight=0.0), dict(weight=0.0, boost=True), dict(weight=3.0, tau_min=0.99)):
        # (EDM's grid tops out at tau = 0.934)
        config = generation.SamplerConfig(num_steps=6, guidance={"dg": dict(value=dg_files["network"], **options)})
        assert torch.equal(generation.sample_seeds(net, seeds, config, device="cpu"), plain)
    config = generation.SamplerConfig(num_steps=6, guidance={"dg": dict(value=dg_files["network"], weight=3.0)})
    assert not torch.equal(generation.sample_seeds(net, seeds, config, device="cpu"), plain)


def reference_guided_heun(net, disc, latents, sigmas, w1, w2, tau_min=0.01, tau_max=1.0):
    """The reference's EDM-G++ sampler (alsdudrla10/DG generate.py, S_churn = 0), written out independently: the DG
    term -(sigma^2 alpha) grad_{alpha x} log(d / (1 - d)) enters Heun's slopes as w * term / sigma."""

    def term(x, sigma):
        s = float(sigma)
        tau = (-B0 + math.sqrt(B0 ** 2 + 2 * (B1 - B0) * math.log(1 + s * s))) / (B1 - B0)
        if tau < tau_min or tau > tau_max:
            return torch.zeros_like(x)
        mean = math.exp(-0.25 * tau ** 2 * (B1 - B0) - 0.5 * tau * B0)
        inp = (mean * x).float().detach().requires_grad_(True)
        with torch.enable_grad():
            t = torch.full([x.shape[0]], tau)
            d = torch.sigmoid(disc.head(disc.encoder.features(inp, t), t).reshape(-1)).clamp(1e-5, 1 - 1e-5)
            (grad,) = torch.autograd.grad(torch.log(d / (1 - d)).sum(), inp)
        return -(s * s * mean) * grad.to(torch.float64)

    x_next = latents.to(torch.float64) * sigmas[0]
    num_steps = len(sigmas) - 1
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_hat = x_next
        d_cur = (x_hat - net(x_hat, t_cur).to(torch.float64)) / t_cur
        if w1:
            d_cur = d_cur + w1 * term(x_hat, t_cur) / t_cur
        x_next = x_hat + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next).to(torch.float64)) / t_next
            if w2:
                d_prime = d_prime + w2 * term(x_next, t_next) / t_next
            x_next = x_hat + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("w1,w2", [(2.0, 0.0), (1.0, 1.0), (0.0, 1.5)])
def test_guided_heun_is_the_references_edm_g_plus_plus_sampler(w1, w2):
    disc, net = tiny_discriminator("adm"), tiny_edm_net(seed=7)
    latents = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(3))
    grid = make_grid("edm", 8, end="zero", sigma_range=(0.002, 80), round_sigma=net.round_sigma)
    ours = sample(guidance.GuidedDenoiser(net, prepared(disc, net, grid, weight=w1, weight_corrector=w2),
                                          prepared(disc, net, grid, weight=w1, weight_corrector=w2).weights),
                  latents, grid, solver="heun")
    reference = reference_guided_heun(net, disc, latents, grid.sigmas, w1, w2)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    plain = sample(net, latents, grid, solver="heun")
    assert (ours - plain).abs().max() > 1e-3


def test_a_one_step_generator_takes_guidance_on_the_grid_its_sampler_options_give(dg_files):
    """GDD's snapshots sample in one step; with --dg (a sampler option) they are sampled over a sigma grid as any
    EDM denoiser, guided there (it was refused after generation.json was written)."""
    from samplers.onestep import OneStepSampling

    net = persistence.load_network_pickle(dg_files["net"])["ema"]
    one_step = OneStepSampling(sigma=80.0)
    guided = dict(dg=dict(value=dg_files["network"], weight=3.0))
    expected = [imgs for _, imgs in generation.generate_images(net, [0, 1], num_steps=6, guidance=guided,
                                                                device="cpu", progress=False)]
    got = [imgs for _, imgs in generation.generate_images(net, [0, 1], num_steps=6, guidance=guided, device="cpu",
                                                           progress=False, sampling=one_step)]
    assert torch.equal(got[0], expected[0])
    unguided = generation.sample_seeds(net, [0, 1], generation.SamplerConfig(num_steps=6), device="cpu",
                                       sampling=one_step)
    assert not torch.equal(got[0], unguided.to(got[0].dtype))


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"])
def test_every_solver_samples_with_dg_and_the_stated_cost_is_the_calls_made(dg_files, solver):
    net = persistence.load_network_pickle(dg_files["net"])["ema"]
    disc = dgd.load_discriminator(dg_files["network"])
    config = generation.SamplerConfig(solver=solver, num_steps=6, guidance={"dg": dict(value=dg_files["network"])})
    text = generation.GRID_SAMPLING.describe(net, config)
    stated = int(text.split("+")[-1].split(" discriminator gradient evaluations")[0])
    grid, _, solver_kwargs = generation.build_grid(net, config)
    guided = prepared(disc, net, grid, solver)
    denoiser = guidance.GuidedDenoiser(net, guided, guided.weights)
    latents = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(0))
    x = sample(denoiser, latents, grid, solver=solver, round_sigma=net.round_sigma, **solver_kwargs)
    denoiser.check_finished()
    assert torch.isfinite(x).all() and denoiser.discriminator_calls == stated > 0
    nfe = int(text.split(" NFE per image")[0].split("; ")[-1])
    assert denoiser.calls == nfe  # NFE counts the network's calls only


# ---------------------------------------------------------------------------------------------------------------------
# Boosting.


class ControlledDiscriminator:
    """A discriminator whose log ratio is bias[b] (its sign chosen per sample) plus a small linear term: a known,
    non-zero gradient of 1e-3 per pixel of the VP input."""

    vp = dgd.VPTime()
    needs_labels = False

    def __init__(self, bias):
        self.bias = torch.as_tensor(bias, dtype=torch.float32)

    def encoder_input(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        tau = self.vp.tau(sigma)
        scale = self.vp.alpha(tau)
        return (scale.reshape(-1, 1, 1, 1) * x).float(), scale, tau

    def logit_from_input(self, x_in, sigma, tau, class_labels=None):
        return self.bias + 1e-3 * x_in.sum(dim=(1, 2, 3))


class SeededNoise:
    """randn_like with a fixed stream: two samplers given fresh instances draw the same noises."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(11)

    def __call__(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


class SigmaRecorder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.sigmas = net, []

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]).clone())
        return self.net(x, sigma, class_labels)


def reference_boosted_heun(net, disc, latents, sigmas, w1, randn_like):
    """The reference's boosting (generate.py with --boosting 1, S_churn = 0), written out independently."""
    num_steps = len(sigmas) - 1
    batch = latents.shape[0]
    log_ratio = torch.full([batch], math.inf, dtype=torch.float64)
    x_next = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        churn = torch.zeros(batch, dtype=torch.float64)
        if i % 5 == 0:
            churn[log_ratio < 0] = 4.0
        gamma = torch.minimum(churn / num_steps, torch.full_like(churn, math.sqrt(2) - 1))
        t_hat = t_cur + gamma * t_cur
        x_hat = x_next + (t_hat ** 2 - t_cur ** 2).sqrt()[:, None, None, None] * randn_like(x_next)
        d_cur = (x_hat - net(x_hat, t_hat).to(torch.float64)) / t_hat[:, None, None, None]
        s = t_hat
        tau = (-B0 + torch.sqrt(B0 ** 2 + 2 * (B1 - B0) * torch.log(1 + s ** 2))) / (B1 - B0)
        if tau.min() < 0.01 or tau.min() > 1:
            log_ratio = torch.full([batch], 1e7, dtype=torch.float64)
        else:
            mean = torch.exp(-0.25 * tau ** 2 * (B1 - B0) - 0.5 * tau * B0)
            inp = (mean[:, None, None, None] * x_hat).float().requires_grad_(True)
            with torch.enable_grad():
                d = torch.sigmoid(disc.logit_from_input(inp, s, tau)).clamp(1e-5, 1 - 1e-5)
                ratio = torch.log(d / (1 - d))
                (grad,) = torch.autograd.grad(ratio.sum(), inp)
            log_ratio = ratio.detach().to(torch.float64)
            term = -((s ** 2) * mean)[:, None, None, None] * grad.to(torch.float64)
            if i % 2 == 0:
                term[log_ratio < 0] *= 2
            d_cur = d_cur + w1 * term / t_hat[:, None, None, None]
        x_next = x_hat + (t_next - t_hat)[:, None, None, None] * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat)[:, None, None, None] * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def test_boosting_churns_and_doubles_on_the_references_schedule():
    net = tiny_edm_net(seed=7)
    disc = ControlledDiscriminator([-4.0, 4.0])  # sample 0 looks generated, sample 1 real
    latents = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(2))
    grid = make_grid("edm", 10, end="zero", sigma_range=(0.002, 80), round_sigma=net.round_sigma)
    guided = prepared(disc, net, grid, weight=1.0, boost=True)
    recorder = SigmaRecorder(net)
    ours = guidance.boosted_heun(recorder, guided.correction, latents.to(torch.float64) * grid.sigmas[0],
                                 grid.sigmas, weight=1.0, randn_like=SeededNoise(), round_sigma=net.round_sigma)
    reference = reference_boosted_heun(net, disc, latents, grid.sigmas, 1.0, SeededNoise())
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)

    # The predictor levels: step 0 unchurned (no log ratio yet); step 5 churns sample 0 only, by gamma = 4 / 10.
    predictor = [recorder.sigmas[k] for k in range(0, 2 * 10 - 1, 2)]
    levels = grid.sigmas.tolist()
    assert torch.equal(predictor[0], torch.full([2], levels[0], dtype=torch.float64))
    assert predictor[5].tolist() == pytest.approx([levels[5] * 1.4, levels[5]], rel=1e-12)
    assert all(torch.equal(predictor[i], torch.full([2], levels[i], dtype=torch.float64)) for i in (1, 2, 3, 4, 6, 7))



def test_out_of_window_samples_never_count_as_generated_for_boosting():
    """Outside the tau window the log ratio is the reference's 1e7 (positive: "real"), so boosting neither churns nor
    doubles such a sample, while an in-window sample the discriminator calls generated is boosted."""
    disc = ControlledDiscriminator([-4.0, -4.0])
    x = torch.randn([2, 3, 8, 8], dtype=torch.float64)
    _, log_ratio, active, _ = guidance.dg_correction(disc, x, torch.tensor([0.02, 0.5], dtype=torch.float64))
    assert active.tolist() == [False, True] and log_ratio[0].item() == 1e7 and log_ratio[1].item() < 0
    assert guidance.boost_churn_mask(0, log_ratio).tolist() == [False, True]
    assert guidance.boost_weight_factor(0, log_ratio, 1.5).tolist() == [1.5, 3.0]


def test_dg_defaults_are_the_references():
    """alsdudrla10/DG's CIFAR-10 defaults: dg_weight_1st_order 2, dg_weight_2nd_order 0, time_min 0.01, time_max 1,
    no boosting; the CLI's option defaults and the guidance object's agree."""
    expected = dict(weight=2.0, weight_corrector=0.0, tau_min=0.01, tau_max=1.0, boost=False)
    assert guidance.GUIDANCE["dg"].defaults() == expected
    built = guidance.DiscriminatorGuidance("dg.pkl")
    assert {key: getattr(built, key) for key in expected} == expected


def test_boosting_schedule():
    log_ratio = torch.tensor([-1.0, 0.5, -0.1, math.inf, 1e7])
    for step in range(12):
        churned = guidance.boost_churn_mask(step, log_ratio)
        doubled = guidance.boost_weight_factor(step, log_ratio, 1.0)
        negative = [True, False, True, False, False]
        assert churned.tolist() == [n and step % 5 == 0 for n in negative]
        assert doubled.tolist() == [2.0 if n and step % 2 == 0 else 1.0 for n in negative]


def test_boosted_heun_that_never_boosts_is_the_guided_heun():
    net = tiny_edm_net(seed=7)
    disc = ControlledDiscriminator([5.0, 5.0])  # always "real": no churn, no doubling
    latents = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(2))
    grid = make_grid("edm", 7, end="zero", sigma_range=(0.002, 80), round_sigma=net.round_sigma)
    guided = prepared(disc, net, grid, weight=2.0)
    boosted = guidance.boosted_heun(net, guided.correction, latents.to(torch.float64) * grid.sigmas[0],
                                    grid.sigmas, weight=2.0, randn_like=SeededNoise(), round_sigma=net.round_sigma)
    plain = sample(guidance.GuidedDenoiser(net, guided, guided.weights), latents, grid, solver="heun")
    # Equal up to float32 rounding: the boosted sampler feeds the network one noise level per sample.
    torch.testing.assert_close(boosted, plain, rtol=1e-4, atol=1e-5)
    assert (plain - sample(net, latents, grid, solver="heun")).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Toys: a score model of a shifted mixture, guided back to the true one.

TOY_RES, TOY_STD, TOY_SHIFT = 4, 0.15, 0.8


def toy_patterns():
    e = torch.randn(1, TOY_RES, TOY_RES, generator=torch.Generator().manual_seed(0))
    e = e / e.norm() * 1.6  # the two modes at +-e
    f = torch.ones(1, TOY_RES, TOY_RES) / TOY_RES  # the model's error: a shift by 0.8 f (|f| = 1)
    return e, f


def toy_means(shift):
    e, f = toy_patterns()
    return torch.stack([e + shift * f, -e + shift * f]).to(torch.float64)


class MixtureDenoiser(torch.nn.Module):
    """The exact denoiser of an equal-weight mixture of N(mean_k, std^2 I): a score model of that mixture."""

    img_resolution, img_channels, label_dim, sigma_min, sigma_max = TOY_RES, 1, 0, 0.002, 80.0

    def __init__(self, means):
        super().__init__()
        self.means = means

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        var = TOY_STD ** 2 + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2
        diff = x.to(torch.float64).reshape(x.shape[0], 1, -1) - self.means.reshape(1, 2, -1)
        weights = torch.softmax(-(diff ** 2).sum(-1) / (2 * var), dim=1)
        posterior = self.means.reshape(1, 2, -1) + (TOY_STD ** 2 / var)[:, :, None] * diff
        return (weights[:, :, None] * posterior).sum(1).reshape(x.shape).to(torch.float32)


class OptimalDiscriminator(ControlledDiscriminator):
    """d* = p_sigma / (p_sigma + q_sigma) in closed form (log ratio = log p_sigma - log q_sigma), for the true mixture
    p and the model's q, both diffused to the noise level sigma."""

    def __init__(self):
        self.true_means, self.model_means = toy_means(0.0), toy_means(TOY_SHIFT)

    def encoder_input(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        return x.float(), torch.ones_like(sigma), self.vp.tau(sigma)

    def logit_from_input(self, x_in, sigma, tau, class_labels=None):
        def log_density(means):
            var = TOY_STD ** 2 + sigma.to(torch.float64) ** 2
            diff = x_in.to(torch.float64).reshape(x_in.shape[0], 1, -1) - means.reshape(1, 2, -1)
            return torch.logsumexp(-(diff ** 2).sum(-1) / (2 * var[:, None]), dim=1)
        return log_density(self.true_means) - log_density(self.model_means)


def mean_error(x):
    """Distance of the sample mean from the true distribution's mean (0: the modes are at +-e)."""
    return x.to(torch.float64).mean(dim=0).norm().item()


def toy_samples(net, seeds, guidance_spec=None, disc=None, **options):
    grid = make_grid("edm", 18, end="zero", sigma_range=(0.002, 80))
    inputs = generation.seed_inputs(net, seeds, device="cpu")
    if disc is not None:
        return prepared(disc, net, grid, **options).sample(net, grid, "heun", {}, inputs)
    config = generation.SamplerConfig(num_steps=18, guidance=guidance_spec or {})
    return generation.sample_seeds(net, seeds, config, device="cpu", inputs=inputs)


def test_guidance_with_the_optimal_discriminator_recovers_the_true_mixture():
    net, seeds = MixtureDenoiser(toy_means(TOY_SHIFT)), list(range(400))
    unguided = mean_error(toy_samples(net, seeds))
    assert unguided == pytest.approx(TOY_SHIFT, abs=0.05)
    # w = 1 on both Heun evaluations integrates the score of the true mixture (s_q + grad log p/q = s_p): the
    # error falls by more than 80 % (what is left: the clip where d* saturates, the tau window below sigma 0.045).
    consistent = mean_error(toy_samples(net, seeds, disc=OptimalDiscriminator(), weight=1.0, weight_corrector=1.0))
    assert consistent < 0.2 * unguided
    # The reference's setting (corrector unguided) halves the guidance in Heun's average: w = 2 acts like w = 1.
    reference = mean_error(toy_samples(net, seeds, disc=OptimalDiscriminator(), weight=2.0))
    assert reference < 0.6 * unguided
    # Both modes stay populated.
    x = toy_samples(net, seeds, disc=OptimalDiscriminator(), weight=1.0, weight_corrector=1.0)
    e, _ = toy_patterns()
    side = (x.to(torch.float64) * e).flatten(1).sum(1) > 0
    assert 0.35 < side.double().mean().item() < 0.65


def save_png_set(folder, images):
    os.makedirs(folder, exist_ok=True)
    pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()
    for i, image in enumerate(pixels):
        PIL.Image.fromarray(image[0], "L").save(os.path.join(folder, f"{i:06d}.png"))


def mixture_draws(means, count, seed):
    generator = torch.Generator().manual_seed(seed)
    modes = torch.randint(0, 2, [count], generator=generator)
    return (means[modes] + TOY_STD * torch.randn([count, 1, TOY_RES, TOY_RES], generator=generator,
                                                 dtype=torch.float64)).to(torch.float32)


@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    save_png_set(str(folder / "real"), mixture_draws(toy_means(0.0), 1024, 1))
    save_png_set(str(folder / "fake"), mixture_draws(toy_means(TOY_SHIFT), 1024, 2))
    encoder = tiny_edm_net(resolution=TOY_RES, channels=1, seed=2)
    persistence.save_network_pickle(str(folder / "encoder.pkl"), dict(ema=encoder))
    return folder


@pytest.mark.slow
def test_guidance_with_a_trained_discriminator_moves_samples_toward_the_true_mixture(toy_sets, tmp_path):
    opts = dg.DGTrainingOptions(real=str(toy_sets / "real"), fake=str(toy_sets / "fake"),
                                network=str(toy_sets / "encoder.pkl"), epochs=4, lr=2e-3, width=32, depth=1,
                                head_channels=32)
    dg.train_discriminator(opts, str(tmp_path / "run"), device="cpu", log=lambda *_: None)
    stats = [json.loads(line) for line in open(tmp_path / "run" / dg.STATS_FILE)]
    assert stats[-1]["accuracy"] > 0.7 and stats[-1]["accuracy_by_sigma"]["0.01-0.1"] > 0.9
    pkl = str(tmp_path / "run" / "discriminator-000004.pkl")
    net, seeds = MixtureDenoiser(toy_means(TOY_SHIFT)), list(range(400))
    unguided = mean_error(toy_samples(net, seeds))
    consistent = mean_error(toy_samples(net, seeds, {"dg": dict(value=pkl, weight=1.0, weight_corrector=1.0)}))
    reference = mean_error(toy_samples(net, seeds, {"dg": dict(value=pkl, weight=2.0)}))
    # Stated margins: the error falls by at least 30 % with w = 1 on both Heun evaluations and by 15 % with the
    # reference's w = 2 (measured over three seeds: 42-54 % and 30-40 %; the optimal discriminator gets 80+ %).
    assert consistent < 0.7 * unguided and reference < 0.85 * unguided


# ---------------------------------------------------------------------------------------------------------------------
# Training: AOT pairing, resume, labels.


def test_dg_pool_pairing_is_the_aot_losss_for_the_same_pool_and_seed():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand([24, 3, 4, 4], generator=generator) * 2 - 1
    labels = torch.eye(3)[torch.randint(0, 3, [24], generator=generator)]
    for pool_labels, aot_labels in ((None, torch.zeros([24, 0])), (labels, labels)):
        ours = dg.pool_paired_noise(images, pool_labels, seed=5, pool_index=7)
        with torch.random.fork_rng():
            torch.manual_seed(pool_seed(5, 0, 7))  # what losses.aot.PoolSource does for pool 7 of rank 0
            theirs = AOTLoss(pool_size=24).prepare_pool(Batch(images=images, labels=aot_labels)).noise
        assert torch.equal(ours, theirs)


def test_training_pairs_each_pool_with_the_aot_assignment(toy_sets, tmp_path, monkeypatch):
    calls = []
    original = dg.pool_paired_noise

    def record(images, labels, seed, pool_index):
        noise = original(images, labels, seed, pool_index)
        calls.append((images.clone(), pool_index, noise))
        return noise

    monkeypatch.setattr(dg, "pool_paired_noise", record)
    opts = dg.DGTrainingOptions(real=str(toy_sets / "real"), fake=str(toy_sets / "fake"),
                                network=str(toy_sets / "encoder.pkl"), epochs=2, batch=32, aot=64, width=32,
                                depth=1, head_channels=32, max_images=64)
    dg.train_discriminator(opts, str(tmp_path / "aot"), device="cpu", log=lambda *_: None)
    assert [index for _, index, _ in calls] == [0, 1, 2, 3]  # 128 rows in pools of 64; each epoch new pools
    for images, index, noise in calls:
        with torch.random.fork_rng():
            torch.manual_seed(pool_seed(opts.seed, 0, index))
            expected = AOTLoss(pool_size=64).prepare_pool(Batch(images=images, labels=torch.zeros([64, 0]))).noise
        assert torch.equal(noise, expected)
        paired = (images - noise).flatten(1).norm(dim=1).sum()
        with torch.random.fork_rng():
            torch.manual_seed(pool_seed(opts.seed, 0, index))
            unpaired = (images - torch.randn_like(images)).flatten(1).norm(dim=1).sum()
        assert paired < unpaired
    record_json = json.load(open(tmp_path / "aot" / "training_options.json"))
    assert record_json["aot"] == 64
    with pytest.raises(ValueError, match="multiple of --batch"):
        dg.check_options(dataclasses_replace(opts, aot=100))


def dataclasses_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)


def test_training_resumes_bit_for_bit_at_an_epoch_boundary(toy_sets, tmp_path):
    opts = dg.DGTrainingOptions(real=str(toy_sets / "real"), fake=str(toy_sets / "fake"),
                                network=str(toy_sets / "encoder.pkl"), epochs=2, batch=32, width=32, depth=1,
                                head_channels=32, max_images=64)
    straight = dg.train_discriminator(opts, str(tmp_path / "a"), device="cpu", log=lambda *_: None)
    dg.train_discriminator(dataclasses_replace(opts, epochs=1), str(tmp_path / "b"), device="cpu",
                           log=lambda *_: None)
    with pytest.raises(dgd.DiscriminatorError, match="--resume=auto"):
        dg.train_discriminator(opts, str(tmp_path / "b"), device="cpu", log=lambda *_: None)
    with pytest.raises(dgd.DiscriminatorError, match="other lr"):
        dg.train_discriminator(dataclasses_replace(opts, lr=1e-3), str(tmp_path / "b"), resume="auto",
                               device="cpu", log=lambda *_: None)
    resumed = dg.train_discriminator(opts, str(tmp_path / "b"), resume="auto", device="cpu", log=lambda *_: None)
    for (name, a), (_, b) in zip(straight.head.state_dict().items(), resumed.head.state_dict().items()):
        assert torch.equal(a, b), name
    lines = [json.loads(line) for line in open(tmp_path / "b" / dg.STATS_FILE)]
    assert [line["epoch"] for line in lines] == [1, 2]
    loaded = dgd.load_discriminator(str(tmp_path / "b" / "discriminator-000002.pkl"))
    x = torch.randn([3, 1, TOY_RES, TOY_RES])
    torch.testing.assert_close(loaded.logit(x, torch.tensor([0.1, 1.0, 5.0])),
                               resumed.logit(x, torch.tensor([0.1, 1.0, 5.0])).detach())
    assert loaded.record["training"]["epoch"] == 2


def test_training_folders_refuse_leftovers_repair_killed_stats_and_check_the_image_sets(toy_sets, tmp_path):
    """A fresh run into an earlier run's folder (its state gone) is refused unless --overwrite; a resume drops the
    stats lines of a repeated epoch and a torn last line, refuses damage elsewhere, refuses changed image sets, and
    says when there is nothing to train."""
    import shutil
    shutil.copytree(toy_sets / "real", tmp_path / "real")
    opts = dg.DGTrainingOptions(real=str(tmp_path / "real"), fake=str(toy_sets / "fake"),
                                network=str(toy_sets / "encoder.pkl"), epochs=1, batch=32, width=32, depth=1,
                                head_channels=32, max_images=64)
    quiet = dict(device="cpu", log=lambda *_: None)
    run = tmp_path / "run"
    dg.train_discriminator(opts, str(run), **quiet)
    (run / dg.STATE_FILE).unlink()
    for resume in (None, "auto"):
        with pytest.raises(dgd.DiscriminatorError, match="--outdir: .* holds files of an earlier run .*"
                           "discriminator-000001.pkl.* no training state to resume; pass --overwrite"):
            dg.train_discriminator(opts, str(run), resume=resume, **quiet)
    with pytest.raises(dgd.DiscriminatorError, match="--overwrite .* cannot be combined with --resume"):
        dg.train_discriminator(opts, str(run), resume="auto", overwrite=True, **quiet)
    (run / "notes.txt").write_text("kept")
    result = CliRunner().invoke(train_dg.main, [
        "train", "--real", opts.real, "--fake", opts.fake, "--network", opts.network, "--num", "64", "--batch", "32",
        "--width", "32", "--depth", "1", "--head-channels", "32", "--epochs", "1", "--lr", "1e-3", "--device", "cpu",
        "--outdir", str(run), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.load(open(run / "training_options.json"))["lr"] == 1e-3 and (run / "notes.txt").read_text() == "kept"
    assert [json.loads(line)["epoch"] for line in open(run / dg.STATS_FILE)] == [1]
    opts = dataclasses_replace(opts, lr=1e-3)

    # Killed after writing epoch 2's stats line but before its state, then mid-way through a line: both dropped.
    first = (run / dg.STATS_FILE).read_text()
    (run / dg.STATS_FILE).write_text(first + json.dumps(dict(epoch=2, loss=9.0)) + "\n" + '{"loss": 0.69, "accur')
    dg.train_discriminator(dataclasses_replace(opts, epochs=2), str(run), resume="auto", **quiet)
    lines = [json.loads(line) for line in open(run / dg.STATS_FILE)]
    assert [line["epoch"] for line in lines] == [1, 2] and lines[1]["loss"] != 9.0
    good = (run / dg.STATS_FILE).read_text()
    (run / dg.STATS_FILE).write_text('{"epoch": 1, "lo\n' + good)
    with pytest.raises(dgd.DiscriminatorError, match=f"--resume: .*{dg.STATS_FILE}: line 1 is not a stats record"):
        dg.train_discriminator(dataclasses_replace(opts, epochs=3), str(run), resume="auto", **quiet)
    (run / dg.STATS_FILE).write_text(good)

    logs = []
    dg.train_discriminator(dataclasses_replace(opts, epochs=2), str(run), resume="auto", device="cpu",
                           log=logs.append)
    assert any("Nothing to train: 2 epochs are done and --epochs=2" in line for line in logs), logs

    # Another file in the real set (the same first 64 images): not the set the run was trained on.
    shutil.copy(tmp_path / "real" / "000000.png", tmp_path / "real" / "zz-extra.png")
    with pytest.raises(dgd.DiscriminatorError, match="--resume: the images of --real differ from those"):
        dg.train_discriminator(dataclasses_replace(opts, epochs=3), str(run), resume="auto", **quiet)


def test_a_resume_refuses_another_encoder_file_at_the_same_path(toy_sets, tmp_path):
    # The options record the encoder's path; the state records its sha256 too, so an overwritten file is refused.
    import shutil
    encoder = tmp_path / "encoder.pkl"
    shutil.copyfile(toy_sets / "encoder.pkl", encoder)
    opts = dg.DGTrainingOptions(real=str(toy_sets / "real"), fake=str(toy_sets / "fake"), network=str(encoder),
                                epochs=1, batch=32, width=32, depth=1, head_channels=32, max_images=64)
    quiet = dict(device="cpu", log=lambda *_: None)
    run = tmp_path / "run"
    dg.train_discriminator(opts, str(run), **quiet)
    expected = hashlib.sha256(encoder.read_bytes()).hexdigest()
    assert dg._load_state(str(run / dg.STATE_FILE))["data"]["encoder_sha256"] == expected
    persistence.save_network_pickle(str(encoder), dict(ema=tiny_edm_net(resolution=TOY_RES, channels=1, seed=3)))
    with pytest.raises(dgd.DiscriminatorError, match=f"--resume: --network {encoder} is not the file .*"
                       f"{dg.STATE_FILE} was trained with \\(sha256 .* then\\); resume with the same encoder"):
        dg.train_discriminator(dataclasses_replace(opts, epochs=2), str(run), resume="auto", **quiet)
    shutil.copyfile(toy_sets / "encoder.pkl", encoder)  # the same content again: resumes
    dg.train_discriminator(dataclasses_replace(opts, epochs=2), str(run), resume="auto", **quiet)
    assert [json.loads(line)["epoch"] for line in open(run / dg.STATS_FILE)] == [1, 2]


def test_conditional_fake_sets_read_classes_from_per_class_generate_folders(tmp_path):
    for cls in (0, 2):
        folder = tmp_path / "fakes" / str(cls)
        save_png_set(str(folder), torch.zeros([3, 1, 4, 4]) + 0.1 * cls)
        (folder / "generation.json").write_text(json.dumps(dict(class_idx=cls)))
    image_set = dg.load_image_set(str(tmp_path / "fakes"), use_labels=True, option="--fake")
    assert image_set.classes.tolist() == [0, 0, 0, 2, 2, 2]
    assert image_set.images[3:].float().mean() > image_set.images[:3].float().mean()
    # A folder without a class (random classes, or no record) is refused, not dropped with its images.
    (tmp_path / "fakes" / "2" / "generation.json").write_text(json.dumps(dict(class_idx=None)))
    with pytest.raises(dgd.DiscriminatorError, match=r"--fake: .*no class record .* in the folder\(s\) 2, .*"
                       r"generate.py --class=K --outdir=.*fakes/K"):
        dg.load_image_set(str(tmp_path / "fakes"), use_labels=True, option="--fake")
    (tmp_path / "fakes" / "2" / "generation.json").write_text(json.dumps(dict(class_idx=2)))
    save_png_set(str(tmp_path / "fakes"), torch.zeros([2, 1, 4, 4]))  # images beside the class folders
    with pytest.raises(dgd.DiscriminatorError, match="2 images lie outside its class folders"):
        dg.load_image_set(str(tmp_path / "fakes"), use_labels=True, option="--fake")
    for name in ("000000.png", "000001.png"):
        (tmp_path / "fakes" / name).unlink()
    (tmp_path / "fakes" / "0" / "generation.json").unlink()
    with pytest.raises(dgd.DiscriminatorError, match="--fake: .*generate.py --class=K"):
        dg.load_image_set(str(tmp_path / "fakes"), use_labels=True, option="--fake")


def test_conditional_discriminator_reads_labels_end_to_end(tmp_path):
    """A conditional head on a class-conditional encoder network: trained from labelled sets, sampled with labels."""
    net = tiny_edm_net(label_dim=3, seed=9)
    net_path = str(tmp_path / "net.pkl")
    persistence.save_network_pickle(net_path, dict(ema=net))
    for name, shift in (("real", 0.0), ("fake", 0.5)):
        folder = tmp_path / name
        images = torch.rand([96, 3, 8, 8], generator=torch.Generator().manual_seed(len(name))) - 0.5 + shift
        os.makedirs(folder)
        pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        labels = []
        for i, image in enumerate(pixels):
            PIL.Image.fromarray(image, "RGB").save(folder / f"{i:06d}.png")
            labels.append([f"{i:06d}.png", i % 3])
        (folder / "dataset.json").write_text(json.dumps(dict(labels=labels)))
    opts = dg.DGTrainingOptions(real=str(tmp_path / "real"), fake=str(tmp_path / "fake"), network=net_path,
                                cond=True, epochs=1, batch=32, width=32, depth=1, head_channels=32, aot=96)
    disc = dg.train_discriminator(opts, str(tmp_path / "run"), device="cpu", log=lambda *_: None)
    assert disc.conditional and disc.label_dim == 3 and disc.head.label_emb.num_embeddings == 3
    pkl = str(tmp_path / "run" / "discriminator-000001.pkl")
    config = generation.SamplerConfig(num_steps=4, guidance={"dg": dict(value=pkl, weight=5.0)})
    guided = generation.sample_seeds(net, [0, 1], config, device="cpu", class_idx=1)
    plain = generation.sample_seeds(net, [0, 1], generation.SamplerConfig(num_steps=4), device="cpu", class_idx=1)
    assert torch.isfinite(guided).all() and not torch.equal(guided, plain)
    unconditional = tiny_edm_net(seed=9)
    with pytest.raises(ValueError, match="label_dim = 0"):
        generation.GRID_SAMPLING.describe(unconditional, config)

    # A set with classes the discriminator does not read: one line naming the set.
    (tmp_path / "real" / "dataset.json").write_text(json.dumps(dict(labels=[[f"{i:06d}.png", i % 5]
                                                                            for i in range(96)])))
    result = CliRunner().invoke(train_dg.main, ["accuracy", "--dg", pkl, "--real", str(tmp_path / "real"), "--fake",
                                                str(tmp_path / "fake"), "--sigmas", "0.5", "--device", "cpu"])
    assert result.exit_code == 2 and "Invalid value for --real" in result.output and "has class 4; the " \
        "discriminator reads 3 classes" in result.output and "Traceback" not in result.output, result.output
    (tmp_path / "real" / "dataset.json").write_text(json.dumps(dict(labels=[[f"{i:06d}.png", i % 3]
                                                                            for i in range(96)])))

    # A class without generated images (its generate.py --class run missing) is refused before training.
    labels = json.loads((tmp_path / "fake" / "dataset.json").read_text())["labels"]
    (tmp_path / "fake" / "dataset.json").write_text(json.dumps(dict(labels=[[name, k % 2] for name, k in labels])))
    with pytest.raises(dgd.DiscriminatorError, match=r"--fake: .* no generated images of class 2 .*--class=K"):
        dg.train_discriminator(opts, str(tmp_path / "run2"), device="cpu", log=lambda *_: None)
    assert not os.path.exists(tmp_path / "run2")


# ---------------------------------------------------------------------------------------------------------------------
# Encoders and files.


def test_network_features_are_the_middle_blocks_output_and_leave_the_network_unchanged():
    net = tiny_edm_net(mult=(1, 1))
    x, sigma = torch.randn([2, 3, 8, 8]), torch.tensor([0.3, 3.0])
    block = dgd.middle_block(net)
    assert block is net.model.dec["4x4_in1"]
    seen = []
    handle = block.register_forward_hook(lambda module, inputs, output: seen.append(output))
    full = net(x, sigma)
    handle.remove()
    features = dgd.network_features(net, x, sigma)
    assert torch.equal(features, seen[0]) and features.shape == (2, 8, 4, 4)
    assert torch.equal(net(x, sigma), full) and not block._forward_hooks  # no hook left behind
    with pytest.raises(dgd.DiscriminatorError, match="U-Net backbone"):
        dgd.middle_block(torch.nn.Linear(2, 2))


def test_the_64px_classifier_configuration_follows_the_file_and_trains_on_cosine_time(tmp_path, monkeypatch):
    """guided-diffusion's 64x64 classifier (the reference's load_classifier at 64 px: channel_mult 1,2,3,4, depth 4,
    attention at 32/16/8 px) is recognised by its parameter shapes, and train/import use it at 64 px."""
    for size in (32, 64):
        with torch.device("meta"):
            state = dgn.ADMEncoderUNet(**dgn.adm_classifier_kwargs(size)).state_dict()
        assert dgd.adm_classifier_size(state) == size
    assert dgn.adm_classifier_kwargs(64)["channel_mult"] == (1, 2, 3, 4)
    assert dgn.adm_classifier_kwargs(64)["num_res_blocks"] == 4 and dgn.adm_classifier_kwargs(64)["attention_ds"] \
        == (2, 4, 8)
    assert dgd.adm_classifier_size({"x": torch.zeros(1)}) is None

    # The same layouts at width 32 (small files), through the command lines.
    full = dgn.adm_classifier_kwargs
    monkeypatch.setattr(dgn, "adm_classifier_kwargs", lambda size=32: dict(full(size), model_channels=32,
                                                                            head_channels=32))
    torch.manual_seed(0)
    path = tmp_path / "64x64_classifier.pt"
    torch.save(dgn.ADMEncoderUNet(**dgn.adm_classifier_kwargs(64)).state_dict(), path)
    for name, value in (("real", 200), ("fake", 60)):
        os.makedirs(tmp_path / name)
        for i in range(8):
            PIL.Image.fromarray(np.full((64, 64, 3), value + i, np.uint8)).save(tmp_path / name / f"{i}.png")
    result = CliRunner().invoke(train_dg.main, [
        "train", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--encoder", "adm",
        "--adm-classifier", str(path), "--outdir", str(tmp_path / "run"), "--epochs", "1", "--batch", "8",
        "--width", "32", "--depth", "1", "--head-channels", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    disc = dgd.load_discriminator(str(tmp_path / "run" / "discriminator-000001.pkl"))
    assert disc.img_resolution == 64 and disc.encoder.image_size == 64 and disc.cosine_time
    head = dgn.ADMEncoderUNet(**dgn.dg_head_kwargs(8, 128, condition=False))
    torch.save(head.state_dict(), tmp_path / "head.pt")
    result = CliRunner().invoke(train_dg.main, ["import", "--adm-classifier", str(path), "--discriminator",
                                                str(tmp_path / "head.pt"), "--out", str(tmp_path / "dg64.pkl")])
    assert result.exit_code == 0, result.output
    assert dgd.load_discriminator(str(tmp_path / "dg64.pkl")).img_resolution == 64


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    opts = dg.DGTrainingOptions(real="~/real", fake="~/fake", network="~/net.pkl")
    assert (opts.real, opts.fake, opts.network) == tuple(str(tmp_path / name) for name in ("real", "fake", "net.pkl"))
    torch.save(dgn.ADMEncoderUNet(**dgn.adm_classifier_kwargs(8)).state_dict(), tmp_path / "clf.pt")
    assert dgd.load_adm_classifier("~/clf.pt").image_size == 8


def test_dg_pickles_round_trip_and_bad_files_fail_in_one_line(dg_files, tmp_path):
    for kind in ("network", "adm"):
        loaded = dgd.load_discriminator(dg_files[kind])
        original = tiny_discriminator(kind)
        x, sigma = torch.randn([2, 3, 8, 8]), torch.tensor([0.2, 2.0])
        torch.testing.assert_close(loaded.logit(x, sigma), original.logit(x, sigma).detach())
        assert loaded.encoder_kind == kind and not any(p.requires_grad for p in loaded.encoder.parameters())
    with pytest.raises(dgd.DiscriminatorError, match="a network snapshot"):
        dgd.load_discriminator(dg_files["net"])
    with pytest.raises(dgd.DiscriminatorError, match="--dg: no such file"):
        dgd.load_discriminator(str(tmp_path / "missing.pkl"))
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(dgd.DiscriminatorError, match="--dg: cannot read"):
        dgd.load_discriminator(str(garbage))


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_adm_encoder_network_reproduces_guided_diffusions_numbers():
    """tests/fixtures/dg_adm_reference.npz holds guided-diffusion's EncoderUNetModel (alsdudrla10/DG's copy) run on
    fixed int8 x 2^-e weights: DG's classifier options (scale-shift norm, down-sampling residual blocks, legacy-order
    attention with two heads, attention pooling, class embedding) made tiny. Regenerate it with
    `python tests/fixtures/make_dg_adm_reference.py /path/to/DG` (needs the reference checkout)."""
    data = np.load(os.path.join(FIXTURES, "dg_adm_reference.npz"), allow_pickle=False)
    config = json.loads(str(data["config"]))
    assert config["use_scale_shift_norm"] and config["resblock_updown"] and config["pool"] == "attention"
    net = dgn.ADMEncoderUNet(image_size=config["image_size"], in_channels=config["in_channels"],
                             model_channels=config["model_channels"], out_channels=config["out_channels"],
                             num_res_blocks=config["num_res_blocks"],
                             attention_ds=tuple(config["attention_resolutions"]),
                             channel_mult=tuple(config["channel_mult"]), head_channels=config["num_head_channels"],
                             condition=config["condition"], num_classes=config["num_class"]).eval()
    state = {key[2:]: torch.from_numpy(data[key]).to(torch.float32) * 2.0 ** -int(data["e:" + key[2:]])
             for key in data.files if key.startswith("w:")}
    net.load_state_dict(state, strict=True)
    x, t, labels = (torch.from_numpy(data[name]) for name in ("x", "t", "labels"))
    with torch.no_grad():
        features = net.features(x, t, labels)
        logits = net(x, t, torch.eye(config["num_class"])[labels])  # one-hot labels: the argmax is the class
    # float32 through ~20 layers: CPUs with other vector kernels (AMD EPYC here: 1.1e-5 on a feature of 0.08) round
    # differently, so the absolute tolerance scales with each tensor's largest value (8.3 for the features).
    for ours, name in ((features, "features"), (logits, "logits")):
        reference = torch.from_numpy(data[name])
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * max(1.0, float(reference.abs().max())))


def test_adm_classifier_loads_a_state_dict_through_open_url_and_refuses_mismatches(tmp_path):
    classifier = dgn.ADMEncoderUNet(**dgn.adm_classifier_kwargs(8))  # DG's configuration family, 8x8: small
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    path = tmp_path / "8x8_classifier.pt"
    torch.save(state, path)
    loaded = dgd.load_adm_classifier(str(path), image_size=8)
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    from dnnlib import util
    digest = util.file_sha256(str(path))
    assert dgd.load_adm_classifier(path.as_uri(), image_size=8, checksum=f"sha256:{digest}") is not None  # file://
    with pytest.raises(dgd.DiscriminatorError, match="checksum|sha256"):
        dgd.load_adm_classifier(str(path), image_size=8, checksum="sha256:" + "0" * 64)
    state.pop("out.2.c_proj.weight")
    state["input_blocks.1.0.in_layers.2.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(dgd.DiscriminatorError, match="does not match .*missing: out.2.c_proj.weight.*shapes"):
        dgd.load_adm_classifier(str(tmp_path / "other.pt"), image_size=8)
    with pytest.raises(dgd.DiscriminatorError, match="--adm-classifier is required.*drive.google.com"):
        dgd.load_adm_classifier(None)
    with pytest.raises(dgd.DiscriminatorError, match="no such file.*32x32_classifier.pt from DG"):
        dgd.load_adm_classifier(str(tmp_path / "absent.pt"))


@pytest.mark.slow
def test_adm_classifier_32x32_configuration_is_dgs(tmp_path):
    """The configuration `32x32_classifier.pt` needs: 47.8M parameters, 8x8x512 middle-block features."""
    classifier = dgn.ADMEncoderUNet(**dgn.adm_classifier_kwargs(32))
    assert sum(p.numel() for p in classifier.parameters()) == 47_771_112
    path = tmp_path / "32x32_classifier.pt"
    torch.save(classifier.state_dict(), path)
    loaded = dgd.load_adm_classifier(str(path))
    assert loaded.feature_channels == 512 and loaded.feature_resolution == 8
    assert loaded.features(torch.zeros([1, 3, 32, 32]), torch.tensor([0.5])).shape == (1, 512, 8, 8)


def test_adm_classifier_offline_url_error_names_what_to_do(monkeypatch):
    from dnnlib import util

    def offline(url, **kwargs):
        raise OSError(f"could not download {url}: no network")

    monkeypatch.setattr(util, "open_url", offline)
    with pytest.raises(dgd.DiscriminatorError, match="could not fetch the ADM classifier.*offline.*PATH"):
        dgd.load_adm_classifier("https://example.invalid/32x32_classifier.pt")


def test_adm_classifier_unreachable_url_gives_its_advice_once(monkeypatch, tmp_path):
    # Through the real open_url (nothing listens on port 9): the classifier's own advice, not open_url's generic one
    # as well (both were given, joined by "..").
    from dnnlib import util

    monkeypatch.setattr(util.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path))
    with pytest.raises(dgd.DiscriminatorError) as info:
        dgd.load_adm_classifier("http://127.0.0.1:9/32x32_classifier.pt")
    message = str(info.value)
    assert message.startswith("--adm-classifier: could not fetch the ADM classifier from http://127.0.0.1:9/")
    assert message.count("offline") == 1 and ".." not in message, message
    assert message.endswith("and pass --adm-classifier=PATH")


def test_importing_the_references_discriminator_head(tmp_path):
    encoder = tiny_adm_encoder()  # stands in for the 32x32 classifier: 64 x 4 x 4 features
    for conditional in (False, True):
        head = dgn.ADMEncoderUNet(**dgn.dg_head_kwargs(4, 64, condition=conditional))  # the reference's head shape
        path = tmp_path / f"discriminator-{conditional}.pt"
        torch.save(head.state_dict(), path)
        disc = dgd.import_reference_discriminator(encoder, str(path), conditional=conditional, img_resolution=8)
        assert disc.conditional == conditional
        assert (disc.head.label_emb is None) if not conditional else disc.head.label_emb.num_embeddings == 1000
        x, labels = torch.randn([2, 3, 8, 8]), torch.eye(10)[[1, 2]]
        assert torch.isfinite(disc.logit(x, torch.tensor([0.5, 2.0]), labels)).all()
    with pytest.raises(dgd.DiscriminatorError, match="does not match DG's conditional discriminator head"):
        dgd.import_reference_discriminator(encoder, str(tmp_path / "discriminator-False.pt"), conditional=True)


# ---------------------------------------------------------------------------------------------------------------------
# Command lines.


def test_generate_cli_samples_with_dg_and_states_its_cost(dg_files, tmp_path):
    out = str(tmp_path / "out")
    args = ["--network", dg_files["net"], "--outdir", out, "--seeds", "0-1", "--steps", "5", "--device", "cpu"]
    result = CliRunner().invoke(generate.main, [*args, "--dg", dg_files["network"], "--dg-weight", "3"])
    assert result.exit_code == 0, result.output
    assert "9 NFE per image; discriminator guidance dg-network.pkl sha256:" in result.output
    assert "discriminator gradient evaluations per image" in result.output
    assert json.load(open(os.path.join(out, "generation.json")))["options"]["guidance"]["dg"]["weight"] == 3.0
    bad = {"--dg-weight 2": "--dg-weight needs --dg",
           f"--dg {dg_files['network']} --dg-boost --solver euler": "--dg-boost .* needs --solver=heun",
           f"--dg {dg_files['network']} --dg-weight-corrector 1 --solver ipndm": "--dg-weight-corrector applies",
           f"--dg {dg_files['network']} --dg-tau-min 0.5 --dg-tau-max 0.1": "0 <= min <= max <= 1",
           f"--dg {dg_files['net']}": "is a network snapshot"}
    for flags, message in bad.items():
        result = CliRunner().invoke(generate.main, [*args[:3], str(tmp_path / "bad"), *args[4:], *flags.split()])
        assert result.exit_code != 0 and __import__("re").search(message, result.output), (flags, result.output)
        assert "Traceback" not in result.output


def test_generate_records_resolved_dg_settings_and_refuses_negative_weights(dg_files, tmp_path):
    """The same settings spelled otherwise (a default given, the same pickle at another path) resume a folder;
    other settings are refused."""
    import shutil
    out = str(tmp_path / "out")
    args = ["--network", dg_files["net"], "--outdir", out, "--steps", "4", "--device", "cpu"]
    copy = str(tmp_path / "copy.pkl")
    shutil.copy(dg_files["network"], copy)
    for seeds, flags in (("0-1", ["--dg", dg_files["network"], "--dg-weight", "2"]),
                         ("0-2", ["--dg", dg_files["network"]]),
                         ("0-3", ["--dg", dg_files["network"], "--dg-tau-max", "1", "--dg-weight-corrector", "0"]),
                         ("0-4", ["--dg", copy])):
        result = CliRunner().invoke(generate.main, [*args, "--seeds", seeds, *flags])
        assert result.exit_code == 0, (flags, result.output)
    record = json.load(open(os.path.join(out, "generation.json")))["settings"]["guidance"]["dg"]
    assert record["weight"] == 2.0 and record["discriminator_sha256"] == __import__("dnnlib").util.file_sha256(copy)
    result = CliRunner().invoke(generate.main, [*args, "--seeds", "0-4", "--dg", copy, "--dg-weight", "3"])
    assert result.exit_code != 0 and "settings.guidance.dg.weight" in result.output, result.output
    result = CliRunner().invoke(generate.main, [*args[:3], str(tmp_path / "neg"), *args[4:], "--seeds", "0",
                                                "--dg", copy, "--dg-weight", "-2"])
    assert result.exit_code != 0 and "--dg-weight must be >= 0, got -2" in result.output, result.output
    with pytest.raises(ValueError, match="--dg-weight-corrector must be >= 0"):
        guidance.DiscriminatorGuidance(copy, weight_corrector=-1)


def test_fid_network_source_samples_with_dg_like_generate(dg_files):
    """fid.py calc --network builds its images with metrics.network_source from the same SamplerConfig."""
    import dataclasses

    import metrics

    net = persistence.load_network_pickle(dg_files["net"])["ema"]
    config = generation.SamplerConfig(num_steps=4, guidance={"dg": dict(value=dg_files["adm"], weight=4.0)})
    source = metrics.network_source(net, [3, 4, 5], batch_size=2, **dataclasses.asdict(config))
    images = torch.cat([batch.cpu() for _, batch in source.batches(torch.device("cpu"))])
    expected = torch.cat([batch for _, batch in generation.generate_images(net, [3, 4, 5], batch_size=2,
                                                                            device="cpu", num_steps=4,
                                                                            guidance=config.guidance)])
    assert torch.equal(images, expected)
    plain = torch.cat([batch for _, batch in generation.generate_images(net, [3, 4, 5], device="cpu", num_steps=4)])
    assert not torch.equal(images, plain)
    assert source.description["sampler_options"]["guidance"]["dg"]["weight"] == 4.0


def test_train_dg_cli_trains_measures_and_refuses_bad_input(toy_sets, tmp_path):
    runner = CliRunner()
    common = ["--real", str(toy_sets / "real"), "--fake", str(toy_sets / "fake"), "--num", "128"]
    result = runner.invoke(train_dg.main, ["train", *common, "--network", str(toy_sets / "encoder.pkl"),
                                           "--outdir", str(tmp_path / "run"), "--epochs", "1", "--batch", "64",
                                           "--width", "32", "--depth", "1", "--head-channels", "32",
                                           "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(tmp_path / "run" / "discriminator-000001.pkl")
    result = runner.invoke(train_dg.main, ["accuracy", "--dg", str(tmp_path / "run" / "discriminator-000001.pkl"),
                                           *common, "--sigmas", "0.05,5", "--device", "cpu",
                                           "--out", str(tmp_path / "acc.json")])
    assert result.exit_code == 0, result.output
    assert set(json.load(open(tmp_path / "acc.json"))) == {"0.05", "5.0"}
    for extra, message in ((["--network", str(tmp_path / "none.pkl")], "--network: "),
                           ([], "--network is required"),
                           (["--encoder", "adm"], "--adm-classifier is required"),
                           (["--network", str(toy_sets / "encoder.pkl"), "--aot", "100"], "multiple of --batch")):
        result = runner.invoke(train_dg.main, ["train", *common, *extra, "--outdir", str(tmp_path / "x"),
                                               "--device", "cpu"])
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        assert "Traceback" not in result.output


def test_train_dg_workflow_paths_and_early_checks(toy_sets, tmp_path, monkeypatch):
    """The same files spelled otherwise ('./real', an absolute path, a trailing '/') resume a run (refused as "other
    real, fake, network" before); accuracy checks its levels, channels and --out before the work; import refuses an
    option it would ignore; a batch larger than the sets is refused before anything is written."""
    runner = CliRunner()
    head = ["--width", "32", "--depth", "1", "--head-channels", "32", "--device", "cpu", "--batch", "64"]
    monkeypatch.chdir(toy_sets)
    result = runner.invoke(train_dg.main, ["train", "--real", "real", "--fake", "fake", "--network", "encoder.pkl",
                                           "--num", "64", "--outdir", str(tmp_path / "run"), "--epochs", "1", *head])
    assert result.exit_code == 0, result.output
    options = json.load(open(tmp_path / "run" / "training_options.json"))
    assert options["real"] == str(toy_sets / "real") and options["network"] == str(toy_sets / "encoder.pkl")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(train_dg.main, ["train", "--real", str(toy_sets / "real") + "/", "--fake",
                                           os.path.relpath(toy_sets / "fake"), "--network",
                                           str(toy_sets / "encoder.pkl"), "--num", "64", "--outdir", "run",
                                           "--epochs", "2", "--resume", "auto", *head])
    assert result.exit_code == 0 and "Resuming" in result.output, result.output
    assert os.path.isfile(tmp_path / "run" / "discriminator-000002.pkl")

    pkl = str(tmp_path / "run" / "discriminator-000002.pkl")
    sets = ["--real", str(toy_sets / "real"), "--fake", str(toy_sets / "fake"), "--num", "16", "--device", "cpu"]
    result = runner.invoke(train_dg.main, ["accuracy", "--dg", pkl, *sets, "--sigmas", "0.1,-1"])
    assert result.exit_code == 2 and "noise levels must be positive, got '0.1,-1'" in result.output, result.output
    (tmp_path / "folder.json").mkdir()
    result = runner.invoke(train_dg.main, ["accuracy", "--dg", pkl, *sets, "--out", str(tmp_path / "folder.json")])
    assert result.exit_code == 1 and "folder.json" in result.output and "Traceback" not in result.output
    rgb = tmp_path / "rgb"
    os.makedirs(rgb)
    for i in range(4):
        PIL.Image.fromarray(np.full((TOY_RES, TOY_RES, 3), 40 * i, np.uint8)).save(rgb / f"{i}.png")
    result = runner.invoke(train_dg.main, ["accuracy", "--dg", pkl, "--real", str(rgb), "--fake",
                                           str(toy_sets / "fake"), "--num", "4", "--device", "cpu"])
    assert result.exit_code == 2 and f"Invalid value for --real: {rgb} has 3 channels; the discriminator takes 1" \
        in result.output, result.output

    result = runner.invoke(train_dg.main, ["--help"])  # a conditional network's fakes: one folder per class
    assert "--class=0 --outdir=fakes/0" in result.output and "also writes their labels" not in result.output
    result = runner.invoke(train_dg.main, ["import", "--adm-classifier", "c.pt", "--discriminator", "d.pt",
                                           "--label-dim", "5", "--out", "x.pkl"])
    assert result.exit_code == 2 and "--label-dim applies to the conditional head (--cond) only" in result.output
    result = runner.invoke(train_dg.main, ["train", *sets[:4], "--network", str(toy_sets / "encoder.pkl"), "--num",
                                           "8", "--outdir", "small", *head])
    assert result.exit_code == 1 and "16 images in all are fewer than one --batch (64)" in result.output
    assert not os.path.exists(tmp_path / "small")


def test_sampling_batches_read_nothing_back_from_the_device(tmp_path, monkeypatch):
    """After a run's first batch, a batch makes no device-to-host read (on a GPU each one waits for the queued work):
    the grid's levels are read once per run (solver_grid.host_levels), and DG decides from the planned levels on the
    host which calls run the discriminator (it read active.any() per call: 18 reads per batch for Heun 18 steps).
    Counted on the CPU by wrapping the tensor methods that read a value back. Boosting, per-sample by design, is
    left out. The one read allowed is the finiteness check of the batch before (a bool per image, read when the next
    batch is queued behind it, so it waits for nothing queued after it; the last batch's at the end)."""
    net = tiny_edm_net(seed=7)
    dg_path = str(tmp_path / "dg.pkl")
    dgd.save_discriminator(dg_path, tiny_discriminator("network"))
    reads = []
    for options in (dict(num_steps=18), dict(solver="dpmpp_3m", num_steps=10), dict(solver="unipc", num_steps=10),
                    dict(solver="ipndm", num_steps=10), dict(num_steps=18, solver_kwargs=dict(S_churn=40)),
                    dict(num_steps=18, guidance={"dg": dict(value=dg_path, weight=2.0)})):
        batches = generation.generate_images(net, list(range(12)), batch_size=4, device="cpu", **options)
        next(batches)  # the first batch reads the grid
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                method = getattr(torch.Tensor, name)
                patch.setattr(torch.Tensor, name, lambda self, *a, _m=method, _n=name, **k: (
                    reads.append((_n, self.dtype, tuple(self.shape))), _m(self, *a, **k))[1])
            assert len(list(batches)) == 2
        finiteness = [read for read in reads if read == ("tolist", torch.bool, (4,))]
        assert len(finiteness) == 3, (options, reads)  # batches 1, 2 (late) and 3 (at the end)
        assert [read for read in reads if read not in finiteness] == [], (options, reads)
        reads.clear()


def test_a_guidance_without_its_methods_is_refused_before_any_image(monkeypatch):
    """build_guidance checks the object a GuidanceEntry builds: one without record() (what generation.json stores)
    was met only after the sampler line, as an AttributeError."""
    class NoRecord:
        def __init__(self, value):
            self.value = value

        def describe(self, *args, **kwargs):
            return "test guidance"

        def prepare(self, *args, **kwargs):
            return None

    entry = dataclasses.replace(guidance.GUIDANCE["dg"], flag="--test-guidance", options=(), build=NoRecord)
    monkeypatch.setitem(guidance.GUIDANCE, "test", entry)
    with pytest.raises(TypeError, match=r"guidance 'test': NoRecord has no record \(a guidance object needs "
                                        r"describe, prepare, record"):
        guidance.build_guidance({"test": {"value": "x"}})
    NoRecord.record = lambda self: {"value": self.value}
    assert guidance.guidance_record({"test": {"value": "x"}}) == {"test": {"value": "x"}}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), a file whose writes fail ENOSPC")
def test_train_dg_on_a_full_disk_names_the_stats_file(toy_sets, tmp_path, monkeypatch):
    """stats.jsonl on a full disk (its appends go to /dev/full): one error line naming it ('Error: [Errno 28] No space
    left on device' named nothing); the epoch's state is not written, so a resume repeats that epoch."""
    import builtins

    import training.dg

    def stats_on_a_full_disk(path, mode="r", *args, **kwargs):
        full = str(path).endswith("stats.jsonl") and "a" in mode
        return builtins.open("/dev/full" if full else path, mode, *args, **kwargs)

    monkeypatch.setattr(training.dg, "open", stats_on_a_full_disk, raising=False)
    result = CliRunner().invoke(train_dg.main, ["train", "--real", str(toy_sets / "real"), "--fake",
                                                str(toy_sets / "fake"), "--num", "64", "--network",
                                                str(toy_sets / "encoder.pkl"), "--outdir", str(tmp_path / "run"),
                                                "--epochs", "1", "--batch", "64", "--width", "32", "--depth", "1",
                                                "--head-channels", "32", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert [line for line in result.output.splitlines() if "Error" in line] == \
        [f"Error: cannot write {tmp_path / 'run' / 'stats.jsonl'} (No space left on device)"], result.output
    assert not os.path.exists(tmp_path / "run" / "training-state.pt")


def test_accuracy_expands_the_home_folder_in_its_image_sets_and_out(toy_sets, tmp_path, monkeypatch):
    """`accuracy --real=~/... --out=~/...`: the shell expands no ~ after "="; train did, accuracy did not ('~/real:
    dataset path does not exist'; --out went to a folder named '~')."""
    shutil.copytree(toy_sets, tmp_path / "home")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(train_dg.main, ["train", "--real=~/real", "--fake=~/fake", "--num", "16",
                                                "--network=~/encoder.pkl", "--outdir=~/run", "--epochs", "1",
                                                "--batch", "16", "--width", "32", "--depth", "1", "--head-channels",
                                                "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(train_dg.main, ["accuracy", "--dg=~/run/discriminator-000001.pkl", "--real=~/real",
                                                "--fake=~/fake", "--num", "16", "--sigmas", "1", "--device", "cpu",
                                                "--out=~/acc.json"])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(tmp_path / "home" / "acc.json") and os.listdir(tmp_path) == ["home"]


def test_an_out_naming_an_input_is_refused_before_the_work(dg_files, tmp_path):
    """accuracy --out=d.pkl (the JSON named as the --dg pickle) replaced the discriminator with the results, and
    import --out naming the released head replaced it; refused as fid.py calc refuses --out=ref.npz, the file kept."""
    import shutil
    pkl = tmp_path / "d.pkl"
    shutil.copy(dg_files["network"], pkl)
    before = pkl.read_bytes()
    os.symlink(pkl, tmp_path / "link.pkl")
    result = CliRunner().invoke(train_dg.main, ["accuracy", "--dg", str(pkl), "--real", str(tmp_path / "real"),
                                                "--fake", str(tmp_path / "fake"), "--device", "cpu", "--out",
                                                str(tmp_path / "link.pkl")])
    assert result.exit_code == 1, result.output
    assert f"Error: --out {tmp_path / 'link.pkl'} is the --dg file, which the results would replace; choose another " \
           f"--out" in result.output
    head = tmp_path / "discriminator_60.pt"
    head.write_bytes(b"released")
    result = CliRunner().invoke(train_dg.main, ["import", "--adm-classifier", str(tmp_path / "c.pt"),
                                                "--discriminator", str(head), "--out", str(head)])
    assert result.exit_code == 1 and f"Error: --out {head} is the --discriminator file" in result.output, result.output
    assert pkl.read_bytes() == before and head.read_bytes() == b"released"


@pytest.mark.parametrize("width, head_channels", [(100, 50), (96, 64)])
def test_a_head_width_that_cannot_build_is_refused_before_anything_is_loaded(tmp_path, width, head_channels):
    """--width must be a multiple of the head's 32 group-norm groups and of --head-channels: the check came when the
    head was built, after the encoder snapshot and both image sets had been loaded (minutes at 50k images). Now it
    comes first: with an encoder file that does not exist, the error is the width's, and no run folder is made."""
    result = CliRunner().invoke(train_dg.main, ["train", "--real", str(tmp_path / "real"), "--fake",
                                                str(tmp_path / "fake"), "--network", str(tmp_path / "missing.pkl"),
                                                "--outdir", str(tmp_path / "run"), "--width", str(width),
                                                "--head-channels", str(head_channels), "--device", "cpu"])
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: --width {width} must be a multiple of 32 (the head's group norm) and of "
        f"--head-channels={head_channels} (channels per attention head)"), result.output
    assert not os.path.exists(tmp_path / "run")
