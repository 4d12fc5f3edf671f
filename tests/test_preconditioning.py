"""Preconditioners: coefficients against the paper's formulas, sigma ranges, round_sigma, dtypes and precision."""

import contextlib
import copy

import numpy as np
import pytest
import torch

from training import preconditioning

TINY_BACKBONE = dict(model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                     dropout=0)
SIGMAS = [0.002, 0.5, 80.0]


class RecordingBackbone(torch.nn.Module):
    """Stand-in for F: records its inputs and returns `value` everywhere (out_channels channels)."""

    def __init__(self, out_channels, value=0.0, dtype=torch.float32):
        super().__init__()
        self.out_channels, self.value, self.dtype = out_channels, value, dtype
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.calls.append(dict(x=x, noise_labels=noise_labels, class_labels=class_labels,
                               augment_labels=augment_labels))
        shape = (x.shape[0], self.out_channels, *x.shape[2:])
        return torch.full(shape, self.value, dtype=self.dtype)


def make(precond_name, label_dim=0, **kwargs):
    torch.manual_seed(0)
    return getattr(preconditioning, precond_name)(img_resolution=8, img_channels=3, label_dim=label_dim,
                                                  **dict(TINY_BACKBONE, **kwargs))


def vp_t(sigma, beta_d=19.9, beta_min=0.1):
    """Inverse of the VP schedule; float64 for a Python float, float32 arithmetic for an np.float32.

    Squares are np.square, not `** 2`: under NumPy 1.x promotion a float32 scalar ** a Python int is float64."""
    dtype = type(sigma) if isinstance(sigma, np.floating) else np.float64
    beta_d, beta_min, one, two = dtype(beta_d), dtype(beta_min), dtype(1), dtype(2)
    if dtype is np.float64:
        return (np.sqrt(np.square(beta_min) + two * beta_d * np.log1p(np.square(sigma))) - beta_min) / beta_d
    return (np.sqrt(np.square(beta_min) + two * beta_d * np.log(one + np.square(sigma))) - beta_min) / beta_d


def iddpm_u(M=1000, C_1=0.001, C_2=0.008):
    """The iDDPM sigma table, independently in float64."""
    alpha_bar = np.sin(0.5 * np.pi * np.arange(M + 1) / M / (C_2 + 1)) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], C_1) - 1)
    return u


U_TABLE = iddpm_u()


def expected_coefficients(precond_name, sigma):
    """(c_skip, c_out, c_in, c_noise) from EDM Table 1, in float64."""
    if precond_name == 'EDMPrecond':
        sd = 0.5
        return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / np.sqrt(sigma ** 2 + sd ** 2),
                1 / np.sqrt(sd ** 2 + sigma ** 2), np.log(sigma) / 4)
    if precond_name == 'VPPrecond':
        # EDM evaluates t(sigma) in float32, where log(1 + sigma^2) loses ~1% at sigma = 0.002 (1 + 4e-6 rounds to
        # 1 + 34 ulp); VP networks were trained with that input, so it is matched (float64: vp_t).
        t32 = vp_t(np.float32(sigma))
        assert abs(t32 / vp_t(sigma) - 1) < 0.02
        return 1.0, -sigma, 1 / np.sqrt(sigma ** 2 + 1), 999 * t32
    if precond_name == 'VEPrecond':
        return 1.0, sigma, 1.0, np.log(sigma / 2)
    if precond_name == 'iDDPMPrecond':
        return 1.0, -sigma, 1 / np.sqrt(sigma ** 2 + 1), 999 - np.argmin(np.abs(U_TABLE - sigma))
    raise KeyError(precond_name)


@pytest.mark.parametrize('precond_name', ['EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond'])
def test_coefficients_match_formulas(precond_name):
    net = make(precond_name)
    out_channels = 6 if precond_name == 'iDDPMPrecond' else 3
    x = torch.randn(3, 3, 8, 8) + 2
    sigma = torch.tensor(SIGMAS)
    # D = c_skip x + c_out F: F = 0 isolates c_skip, x = 0 with F = 1 isolates c_out (no float32 cancellation).
    net.model = RecordingBackbone(out_channels, 1.0)
    c_out = net(torch.zeros_like(x), sigma).mean(dim=(1, 2, 3))
    net.model = RecordingBackbone(out_channels, 0.0)
    c_skip = net(x, sigma) / x
    call = net.model.calls[0]
    c_in = call['x'] / x
    for i, s in enumerate(SIGMAS):
        want_skip, want_out, want_in, want_noise = expected_coefficients(precond_name, s)
        torch.testing.assert_close(c_skip[i], torch.full_like(c_skip[i], want_skip), rtol=1e-5, atol=1e-6)
        assert c_out[i].item() == pytest.approx(want_out, rel=1e-5)
        torch.testing.assert_close(c_in[i], torch.full_like(c_in[i], want_in), rtol=1e-5, atol=1e-7)
        assert call['noise_labels'][i].item() == pytest.approx(want_noise, rel=1e-5, abs=1e-5)
    assert call['noise_labels'].shape == (3,)


def test_vp_sigma_range():
    net = make('VPPrecond')
    assert net.sigma_max == pytest.approx(np.sqrt(np.expm1(0.5 * 19.9 + 0.1)), rel=1e-6)
    assert net.sigma_max == pytest.approx(152.17, abs=0.005)
    # EDM evaluates sigma(1e-5) in float32: exp(1e-6) - 1 cancels to 2^-20, so sigma_min = 2^-10 (float64: ~0.001).
    assert net.sigma_min == 0.0009765625
    assert net.sigma(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(
        np.sqrt(np.expm1(0.5 * 19.9 * 0.25 + 0.05)), rel=1e-12)
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)
    assert type(net.sigma_min) is float and type(net.sigma_max) is float


def test_ve_and_edm_ranges():
    ve, edm = make('VEPrecond'), make('EDMPrecond')
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0, float('inf'), 0.5)
    for net in (ve, edm):
        sigma = torch.tensor([0.3, 7.0], dtype=torch.float64)
        assert torch.equal(net.round_sigma(sigma), sigma)
        with pytest.raises(ValueError, match='return_index'):
            net.round_sigma(sigma, return_index=True)


def test_iddpm_sigma_table_and_rounding():
    net = make('iDDPMPrecond')
    u = net.u.double().numpy()
    np.testing.assert_allclose(u, U_TABLE, rtol=1e-3)  # EDM's float32 recursion vs float64
    assert u[-1] == 0 and net.sigma_min == pytest.approx(0.00642, abs=5e-6) and net.sigma_max == pytest.approx(
        20291, rel=1e-4)
    assert net.sigma_min == float(net.u[999]) and net.sigma_max == float(net.u[0])
    # round_sigma snaps to the nearest table entry and keeps shape and dtype; return_index gives j.
    j = torch.tensor([[0, 17], [500, 998]])
    perturbed = (net.u[j] * torch.tensor([[0.9999, 1.0001], [1.0001, 0.9999]])).double()
    rounded = net.round_sigma(perturbed)
    assert rounded.shape == (2, 2) and rounded.dtype == torch.float64
    torch.testing.assert_close(rounded, net.u[j].double())
    assert torch.equal(net.round_sigma(perturbed, return_index=True), j)
    assert net.round_sigma(80.0).item() == pytest.approx(U_TABLE[np.argmin(np.abs(U_TABLE - 80))], rel=1e-5)


@pytest.mark.parametrize('precond_name', ['EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond'])
def test_dtypes_and_sigma_shapes(precond_name):
    net = make(precond_name, label_dim=4).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.eye(4)[[0, 2]]
    with torch.no_grad():
        per_sample = net(x, torch.tensor([1.5, 1.5], dtype=torch.float64), labels)
        zero_dim = net(x, torch.tensor(1.5, dtype=torch.float64), labels)
        python_float = net(x, 1.5, labels)
        column = net(x.float(), torch.full([2, 1, 1, 1], 1.5), labels)
    for out in (per_sample, zero_dim, python_float, column):
        assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
        torch.testing.assert_close(out, per_sample, rtol=1e-6, atol=1e-6)


def test_labels_default_to_zeros_and_augment_labels_reach_backbone():
    net = make('EDMPrecond', label_dim=5)
    net.model = RecordingBackbone(3)
    x = torch.randn(2, 3, 8, 8)
    net(x, torch.tensor(1.0))
    call = net.model.calls[-1]
    assert torch.equal(call['class_labels'], torch.zeros(1, 5)) and call['augment_labels'] is None
    augment_labels = torch.randn(2, 9)
    net(x, torch.tensor(1.0), torch.eye(5)[[1, 4]].double(), augment_labels=augment_labels)
    call = net.model.calls[-1]
    assert call['class_labels'].dtype == torch.float32 and torch.equal(call['class_labels'], torch.eye(5)[[1, 4]])
    assert call['augment_labels'] is augment_labels
    unconditional = make('EDMPrecond')
    unconditional.model = RecordingBackbone(3)
    unconditional(x, torch.tensor(1.0), torch.eye(5)[[1, 4]])
    assert unconditional.model.calls[-1]['class_labels'] is None


def test_augment_labels_change_the_output_of_a_real_backbone():
    net = make('EDMPrecond', augment_dim=9).eval()
    torch.nn.init.normal_(net.model.dec['8x8_aux_conv'].weight)  # init_zero would hide any dependence
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([2.0, 2.0])
    with torch.no_grad():
        plain = net(x, sigma)
        zeros = net(x, sigma, augment_labels=torch.zeros(2, 9))
        augmented = net(x, sigma, augment_labels=torch.ones(2, 9))
    assert torch.equal(plain, zeros) and not torch.allclose(plain, augmented)


def test_precision_contexts_leave_fp32_cpu_results_unchanged():
    net = make('EDMPrecond', use_fp16=True).eval()  # fp16 applies on CUDA only; CPU stays fp32 like EDM.
    reference = make('EDMPrecond').eval()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 3.0])
    with torch.no_grad():
        plain = net(x, sigma)
        assert torch.equal(plain, reference(x, sigma))
        assert torch.equal(plain, net(x, sigma, force_fp32=True))
        for context in (contextlib.nullcontext(), torch.autocast('cpu', enabled=False)):
            with context:
                assert torch.equal(net(x, sigma), plain)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            mixed = net(x, sigma)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0.05, atol=0.05)


def test_backbone_dtype_mismatch_and_unknown_model_type_are_reported():
    net = make('VEPrecond')
    net.model = RecordingBackbone(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match='backbone returned torch.float64, expected torch.float32'):
        net(torch.randn(1, 3, 8, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="model_type='ResNet'"):
        preconditioning.EDMPrecond(img_resolution=8, img_channels=3, model_type='ResNet')


def test_state_dict_prefix_attributes_and_deepcopy():
    net = make('EDMPrecond', label_dim=2).eval()
    assert all(key.startswith('model.') for key in net.state_dict())
    assert (net.img_resolution, net.img_channels, net.label_dim, net.use_fp16) == (8, 3, 2, False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(net)(x, 0.7), net(x, 0.7), rtol=0, atol=0)


def test_training_gradient_flows_to_backbone():
    net = make('VPPrecond')
    net.train()
    out = net(torch.randn(2, 3, 8, 8), torch.tensor([0.5, 5.0]))
    out.square().sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_eps_precond_passes_x_and_the_time_label_through_and_returns_f():
    """EpsPrecond (DDPM's epsilon prediction, SPD): c_in = 1, c_noise = the label given (the process's t * 1000 / T),
    no skip, no output scaling: the backbone sees x and the label unchanged, and its output F is the result."""
    net = make('EpsPrecond')
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) + 2
    labels = torch.tensor([0.0, 12.5, 999.0])
    for value in (0.0, 0.75):
        net.model = RecordingBackbone(3, value)
        out = net(x, labels)
        call = net.model.calls[0]
        assert torch.equal(call['x'], x) and torch.equal(call['noise_labels'], labels)
        assert out.dtype == torch.float32 and torch.equal(out, torch.full_like(x, value))


def test_gdd_precond_under_autocast_feeds_the_backbone_float32_not_float64():
    """GDDPrecond keeps a float64 input for its skip term (the solvers pass float64). Under --precision=bf16
    (torch.autocast) the backbone got it as float64, which autocast never casts: every layer ran in float64 (no
    tensor cores, 4x the activation memory). It must enter as float32, for autocast to take it from there."""
    net = make('GDDPrecond')
    net.model = RecordingBackbone(3, 0.0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x, torch.tensor([80.0, 2.0]))
    assert net.model.calls[0]['x'].dtype == torch.float32
    assert out.dtype == torch.float64  # the skip term keeps the caller's precision
