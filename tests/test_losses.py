"""Losses: weights, sigma samplers and values against independent formulas; per-image randomness; registry."""

import math
import os
import re

import numpy as np
import pytest
import scipy.stats
import torch

import dnnlib
import losses
from losses import Batch, EDMLoss, PerImageRandom, VELoss, VPLoss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecordingNet(torch.nn.Module):
    """Stand-in denoiser: D = 0, remembering what it was called with."""

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.x, self.sigma, self.class_labels, self.augment_labels = x, sigma, class_labels, augment_labels
        return torch.zeros_like(x)


def _images(n=6, c=2, res=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand([n, c, res, res], generator=gen) * 2 - 1


def _vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return np.sqrt(np.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1)


def _vp_t(sigma, beta_d=19.9, beta_min=0.1):
    return (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log1p(sigma ** 2)) - beta_min) / beta_d


@pytest.mark.parametrize('loss_fn, weight_formula', [
    (EDMLoss(), lambda s: (s ** 2 + 0.5 ** 2) / (s * 0.5) ** 2),
    (EDMLoss(sigma_data=1.3), lambda s: (s ** 2 + 1.3 ** 2) / (s * 1.3) ** 2),
    (VPLoss(), lambda s: 1 / s ** 2),
    (VELoss(), lambda s: 1 / s ** 2),
])
def test_loss_value_is_weight_times_squared_target_with_zero_denoiser(loss_fn, weight_formula):
    images = _images()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    net = RecordingNet()
    loss = loss_fn(net, Batch(images=images, labels=labels, noise=noise))
    assert loss.shape == images.shape
    sigma = net.sigma.double()
    assert sigma.shape == (6, 1, 1, 1) and bool((sigma > 0).all())
    # With D = 0 the loss is lambda(sigma) * y^2 element-wise (no augmentation: y = images).
    expected = weight_formula(sigma) * images.double() ** 2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    # The network saw y + sigma * noise, the labels, and no augment labels.
    torch.testing.assert_close(net.x, images + net.sigma * noise, rtol=0, atol=1e-6)
    assert net.class_labels is labels and net.augment_labels is None


@pytest.mark.parametrize('loss_class, options, message', [
    (EDMLoss, dict(sigma_data=0), 'EDM needs sigma_data > 0 and P_std >= 0, got sigma_data=0, P_std=1.2'),
    (EDMLoss, dict(P_std=-1), 'EDM needs sigma_data > 0 and P_std >= 0'),
    (EDMLoss, dict(P_mean=60), 'P_mean=60, P_std=1.2 gives noise levels 2.83e+23 ... 4.61e+28'),
    (EDMLoss, dict(P_mean=-60), 'P_mean=-60, P_std=1.2 gives noise levels'),
    (VELoss, dict(sigma_min=0), 'VE needs 0 < sigma_min <= sigma_max'),
    (VELoss, dict(sigma_min=1e-30), 'sigma_min=1e-30, sigma_max=100 gives noise levels'),
    (VPLoss, dict(epsilon_t=0), 'VP needs 0 < epsilon_t < 1'),
    (VPLoss, dict(beta_d=-20), 'VP needs 0 < epsilon_t < 1, beta_d >= 0'),
    (VPLoss, dict(beta_d=1000), 'beta_d=1000, beta_min=0.1, epsilon_t=1e-05 gives noise levels'),
])
def test_options_whose_every_step_is_non_finite_are_refused(loss_class, options, message):
    # Accepted before: with sigma_data=0 every step's loss was inf, the loop scrubbed each one and saved the untrained
    # network. The float32 weights the check refuses, from the formula: EDM's at sigma = exp(60 +- 6) is inf / inf.
    sigma = np.float32(math.exp(60 - 6))
    with np.errstate(over='ignore', invalid='ignore'):
        assert np.isnan((sigma ** 2 + np.float32(0.25)) / (sigma * np.float32(0.5)) ** 2)
    with pytest.raises(ValueError, match='^--loss-opt: ' + re.escape(message)):
        loss_class(**options)


@pytest.mark.parametrize('loss_fn', [EDMLoss(P_mean=30, P_std=1.2), EDMLoss(P_std=0), VELoss(sigma_min=1e-6),
                                     VPLoss(beta_d=100)])
def test_options_near_the_refused_ones_train_finitely(loss_fn):
    images = _images()
    loss = loss_fn(RecordingNet(), Batch(images=images, labels=torch.zeros(6, 0)))
    assert bool(torch.isfinite(loss).all())


def test_a_subclass_whose_weight_reads_its_own_options_is_built():
    # The up-front checks called self.weight, the subclass's, before its constructor had set what it reads
    # (AttributeError: 'Gamma' object has no attribute 'gamma'); they check the class's own formula.
    class Gamma(EDMLoss):
        def __init__(self, gamma=1.0, **options):
            super().__init__(**options)
            self.gamma = float(gamma)

        def weight(self, sigma):
            return super().weight(sigma) * sigma ** self.gamma

    sigma = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(Gamma(gamma=0.5).weight(sigma), EDMLoss().weight(sigma) * sigma ** 0.5)
    with pytest.raises(ValueError, match='^--loss-opt: EDM needs sigma_data > 0'):
        Gamma(gamma=0.5, sigma_data=0)


def test_edm_weight_is_inverse_c_out_squared():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_out = sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
    torch.testing.assert_close(EDMLoss().weight(sigma), 1 / c_out ** 2)


def _sample_sigma(loss_fn, num=200_000, seed=0):
    torch.manual_seed(seed)
    return loss_fn.sample_sigma(Batch(torch.zeros(num, 1, 1, 1), torch.zeros(num, 0)), num, 'cpu').flatten().double()


def test_edm_sigma_is_lognormal():
    log_sigma = _sample_sigma(EDMLoss()).log().numpy()
    # Standard errors at n = 2e5: mean 0.0027, std 0.0019.
    assert abs(log_sigma.mean() - (-1.2)) < 0.012
    assert abs(log_sigma.std() - 1.2) < 0.01
    # A frozen distribution's cdf, not kstest(x, 'norm', args=(loc, scale)): SciPy 1.18.0-1.18.1 map the name 'norm'
    # to the standard normal cdf and fail on the args (scipy/scipy#25448).
    assert scipy.stats.kstest(log_sigma, scipy.stats.norm(loc=-1.2, scale=1.2).cdf).pvalue > 1e-3
    log_sigma = _sample_sigma(EDMLoss(P_mean=-0.4, P_std=1.0), seed=1).log().numpy()
    assert abs(log_sigma.mean() - (-0.4)) < 0.01 and abs(log_sigma.std() - 1.0) < 0.01


def test_ve_sigma_is_log_uniform():
    log_sigma = _sample_sigma(VELoss()).log().numpy()
    lo, hi = math.log(0.02), math.log(100)
    assert log_sigma.min() >= lo - 1e-6 and log_sigma.max() <= hi + 1e-6
    assert abs(log_sigma.mean() - (lo + hi) / 2) < 0.03
    assert abs(log_sigma.std() - (hi - lo) / math.sqrt(12)) < 0.02
    assert scipy.stats.kstest(log_sigma, 'uniform', args=(lo, hi - lo)).pvalue > 1e-3


def test_vp_time_is_uniform():
    sigma = _sample_sigma(VPLoss()).numpy()
    t = _vp_t(sigma)
    eps = 1e-5
    assert t.min() >= eps - 1e-6 and t.max() <= 1 + 1e-6
    assert abs(t.mean() - (1 + eps) / 2) < 0.003
    assert abs(t.std() - (1 - eps) / math.sqrt(12)) < 0.003
    assert scipy.stats.kstest(t, 'uniform', args=(eps, 1 - eps)).pvalue > 1e-3
    # sigma(t) against the closed form, and the range ends (sigma(1) = 152.17).
    t_grid = np.array([1e-5, 0.1, 0.5, 1.0])
    np.testing.assert_allclose(VPLoss().sigma(torch.tensor(t_grid)).numpy(), _vp_sigma(t_grid), rtol=1e-12)
    assert abs(_vp_sigma(1.0) - 152.17) < 0.01


class FlipPipe:
    """Stand-in augmentation that draws from the global RNG: flips each image with probability 1/2."""

    def __call__(self, images):
        flip = (torch.rand([images.shape[0], 1, 1, 1]) < 0.5).float()
        return torch.where(flip > 0, images.flip(3), images), flip.reshape(-1, 1)


def _edm_reference_loss(net, images, labels, augment_pipe):
    """EDM's EDMLoss written from the paper, drawing from the global RNG in EDM's order: sigma, augment, noise."""
    rnd_normal = torch.randn([images.shape[0], 1, 1, 1])
    sigma = (rnd_normal * 1.2 - 1.2).exp()
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    y, augment_labels = augment_pipe(images)
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)


def test_edm_loss_consumes_global_rng_like_edm():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 2, 3, padding=1)
    wrapper = lambda x, sigma, labels, augment_labels=None: net(x) * sigma.sqrt()  # noqa: E731
    images, labels = _images(n=8), torch.zeros(8, 0)
    torch.manual_seed(7)
    ours = EDMLoss()(wrapper, Batch(images, labels), augment_pipe=FlipPipe())
    torch.manual_seed(7)
    reference = _edm_reference_loss(wrapper, images, labels, FlipPipe())
    assert torch.equal(ours, reference)


def test_augment_labels_in_batch_mean_images_are_already_augmented():
    class NoPipe:
        def __call__(self, images):
            raise AssertionError('augment_pipe must not run on pre-augmented images')

    net = RecordingNet()
    images, aug = _images(), torch.ones(6, 9)
    EDMLoss()(net, Batch(images, torch.zeros(6, 0), augment_labels=aug), augment_pipe=NoPipe())
    assert net.augment_labels is aug


def _assemble(global_batch, world, batch_gpu, draw):
    """Run `draw(random)` for every (rank, round) layout and put the rows back at their global positions."""
    rounds = global_batch // (world * batch_gpu)
    out = [None] * global_batch
    for rank in range(world):
        for round_idx in range(rounds):
            rnd = PerImageRandom.for_round(seed=5, key=96, batch_size=global_batch, world_size=world, rank=rank,
                                           batch_gpu=batch_gpu, round_idx=round_idx, device='cpu')
            rows = draw(rnd)
            for i in range(batch_gpu):
                out[(round_idx * batch_gpu + i) * world + rank] = rows[i]
    return torch.stack(out)


@pytest.mark.parametrize('world, batch_gpu', [(2, 4), (1, 4), (2, 2), (4, 2), (8, 1)])
def test_per_image_random_does_not_depend_on_layout(world, batch_gpu):
    def draw(rnd):
        sigma_like, uniform, noise_like = rnd.randn(1, 1, 1), rnd.rand(3), rnd.randn(2, 2)
        return torch.cat([sigma_like.flatten(1), uniform[:, :1], noise_like.flatten(1)], dim=1)  # [rows, 6]

    reference = _assemble(8, 1, 8, draw)
    assert torch.equal(_assemble(8, world, batch_gpu, draw), reference)
    # Successive calls, other keys and other seeds give other numbers.
    assert reference.shape == (8, 6) and not torch.equal(reference[:, 0], reference[:, 2])
    other = PerImageRandom.for_round(5, 104, 8, 1, 0, 8, 0, 'cpu').randn(1, 1, 1).flatten()
    assert not torch.equal(other, reference[:, 0])


def test_per_image_random_rows_follow_the_sampler_layout():
    # Rank r, round k of world W, batch_gpu b hold global rows (k*b + i)*W + r.
    rnd = PerImageRandom.for_round(0, 0, batch_size=24, world_size=3, rank=1, batch_gpu=4, round_idx=1, device='cpu')
    assert list(range(24))[rnd.rows] == [(1 * 4 + i) * 3 + 1 for i in range(4)]


def test_loss_with_per_image_random_is_layout_independent():
    images, labels = _images(n=8), torch.zeros(8, 0)
    loss_fn = EDMLoss()
    net = RecordingNet()

    def run(world, batch_gpu):
        rows = [None] * 8
        for rank in range(world):
            for k in range(8 // (world * batch_gpu)):
                rnd = PerImageRandom.for_round(3, 0, 8, world, rank, batch_gpu, k, 'cpu')
                idx = list(range(8))[rnd.rows]
                loss = loss_fn(net, Batch(images[idx], labels[idx], random=rnd))
                for i, j in enumerate(idx):
                    rows[j] = loss[i]
        return torch.stack(rows)

    assert torch.equal(run(2, 4), run(1, 8))
    assert torch.equal(run(1, 2), run(1, 8))


def test_statistics_of_per_image_random():
    rnd = PerImageRandom(seed=0, key=0, global_batch=100_000, rows=slice(None), device='cpu')
    normal, uniform = rnd.randn(2).numpy(), rnd.rand(1).numpy().ravel()
    assert abs(normal.mean()) < 0.01 and abs(normal.std() - 1) < 0.01
    assert scipy.stats.kstest(uniform, 'uniform').pvalue > 1e-3


def test_registry_and_defaults():
    assert {'edm', 'vp', 've'} <= set(losses.LOSSES)  # the denoising losses (plug-ins add more)
    assert all(losses.DEFAULT_LOSS_FOR_PRECOND[k] == k for k in ('vp', 've', 'edm'))
    assert losses.loss_options('edm') == {'P_mean': -1.2, 'P_std': 1.2, 'sigma_data': 0.5}
    assert losses.loss_options('vp') == {'beta_d': 19.9, 'beta_min': 0.1, 'epsilon_t': 1e-5}
    assert losses.loss_options('ve') == {'sigma_min': 0.02, 'sigma_max': 100}
    stream = object()
    for cls in (losses.LOSSES[name] for name in ('edm', 'vp', 've')):
        assert cls().batch_source(None, stream) is stream  # nothing beyond EDM's stream of images and labels
        assert cls().process.name == 'edm' and cls().process.options() == {}
        assert not hasattr(cls(), 'phases')  # one-phase losses: the loop builds the default phase


def test_cli_options_reach_the_loss():
    kwargs = losses.loss_kwargs('edm', losses.parse_loss_options('edm', ['P_mean=-0.4', 'P_std = 1']))
    assert kwargs == {'class_name': 'losses.denoising.EDMLoss', 'P_mean': -0.4, 'P_std': 1.0}
    loss = dnnlib.util.construct_class_by_name(**kwargs)
    assert isinstance(loss, EDMLoss) and (loss.P_mean, loss.P_std, loss.sigma_data) == (-0.4, 1.0, 0.5)
    assert losses.parse_loss_options('ve', ['sigma_max=80']) == {'sigma_max': 80}


@pytest.mark.parametrize('name, items, message', [
    ('edm', ['foo=1'], "loss 'edm' has no option 'foo'; its options are: P_mean, P_std, sigma_data"),
    ('edm', ['P_mean'], "expected KEY=VALUE, got 'P_mean'"),
    ('vp', ['beta_d=abc'], "option 'beta_d' of loss 'vp': cannot read 'abc' as float"),
    ('stf', [], "unknown loss 'stf'; expected one of edm, vp, ve"),
])
def test_bad_loss_options(name, items, message):
    with pytest.raises(ValueError) as excinfo:
        losses.parse_loss_options(name, items)
    assert message in str(excinfo.value)


def test_losses_round_trip_through_network_pickles(tmp_path):
    import training.snapshots  # noqa: F401  (registers the persistent classes; alone this file imports it nowhere)
    from torch_utils import persistence
    path = str(tmp_path / 'loss.pkl')
    persistence.save_network_pickle(path, dict(ema=None, loss_fn=EDMLoss(P_mean=-0.5), other=VPLoss(beta_d=10)))
    data = persistence.load_network_pickle(path)
    assert isinstance(data['loss_fn'], EDMLoss) and data['loss_fn'].P_mean == -0.5
    assert isinstance(data['other'], VPLoss) and data['other'].beta_d == 10.0


def test_default_loss_of_an_added_precond(monkeypatch):
    """--precond without --loss: the table's entry, else the one registered loss declaring it first (an added loss and
    its wrapper need no DEFAULT_LOSS_FOR_PRECOND line), else a one-line refusal naming --loss."""
    assert losses.default_loss_for(None) == 'edm' and losses.default_loss_for('eps') == 'spd'

    class Mine(losses.EDMLoss):
        preconditionings = ('mine',)

    monkeypatch.setitem(losses.LOSSES, 'mine', Mine)
    assert losses.default_loss_for('mine') == 'mine'
    monkeypatch.setitem(losses.LOSSES, 'mine2', Mine)
    with pytest.raises(ValueError, match=r"--precond=mine has no default loss \(losses mine, mine2 declare it\)"):
        losses.default_loss_for('mine')
    with pytest.raises(ValueError, match=r"--precond=nobody has no default loss"):
        losses.default_loss_for('nobody')
