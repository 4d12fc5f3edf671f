"""STF (losses/stf.py): targets against a naive B x R x D computation, unbiasedness by exact enumeration, variance
reduction on digits, class masking, the loss wrapper over EDM/VP/VE, persistence, and train.py --stf."""

import glob
import itertools
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner
from train_worker import (
    ROOT,
    assert_tree_equal,
    digits_images,
    loop_kwargs,
    random_images,
    source_chain,
    write_zip_dataset,
)

import train
from losses import Batch
from losses.aot import aot_loss_kwargs
from losses.denoising import EDMLoss
from losses.stf import STFLoss, class_indices, reference_stream_seed, stf_loss_kwargs, stf_targets, stf_weights
from torch_utils import persistence
from training import training_loop as tl

TINY_NET = ['--cbase', '8', '--cres', '1,2', '--blocks', '1', '--attn', '4', '--workers', '0', '--device', 'cpu']


class RecordingNet(torch.nn.Module):
    """Stand-in denoiser: D = 0, remembering its inputs."""

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.x, self.sigma, self.class_labels, self.augment_labels = x, sigma, class_labels, augment_labels
        return torch.zeros_like(x)


class ShiftAugment:
    """Stand-in augment pipe: adds 0.5, returns 9 zero labels, and counts the rows it saw."""

    def __init__(self):
        self.rows = []

    def __call__(self, images):
        self.rows.append(images.shape[0])
        return images + 0.5, torch.zeros(images.shape[0], 9)


def _naive(x, sigma, refs, classes=None, ref_classes=None):
    """Weights and targets through the explicit B x R x D difference tensor, in float64."""
    x, refs = x.double().flatten(1), refs.double().flatten(1)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    logits = -((x[:, None, :] - refs[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2)
    if classes is not None:
        logits[classes[:, None] != ref_classes[None, :]] = float('-inf')
    weights = torch.softmax(logits, dim=1)
    return weights, (weights[:, :, None] * refs[None, :, :]).sum(1)


# ---------------------------------------------------------------------------------------------------------------------
# The target.

def test_bxr_targets_equal_naive_bxrxd_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn([5, 3, 4, 4], generator=gen, dtype=torch.float64) * 2
    refs = torch.rand([7, 3, 4, 4], generator=gen, dtype=torch.float64) * 2 - 1
    sigma = torch.tensor([0.05, 0.4, 1.0, 6.0, 80.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    weights, targets = _naive(x, sigma, refs)
    torch.testing.assert_close(stf_weights(x, sigma, refs), weights, rtol=1e-9, atol=1e-12)
    ours = stf_targets(x, sigma, refs)
    assert ours.shape == x.shape and ours.dtype == torch.float64
    torch.testing.assert_close(ours.flatten(1), targets, rtol=1e-9, atol=1e-12)
    # Not vacuous: the weights are mixed at large sigma and nearly one-hot at small sigma.
    assert weights[-1].min() > 0.1 and weights[0].max() > 0.999
    # float32 inputs: computed in float64, returned in float32; a scalar sigma broadcasts over the batch.
    ours32 = stf_targets(x.float(), 1.5, refs.float())
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32.double().flatten(1), _naive(x.float(), 1.5, refs.float())[1], rtol=0,
                               atol=1e-6)


def test_targets_ignore_autocast_and_keep_the_own_sample_at_tiny_sigma():
    gen = torch.Generator().manual_seed(1)
    y = torch.rand([4, 3, 8, 8], generator=gen) * 2 - 1
    refs = torch.cat([y, torch.rand([60, 3, 8, 8], generator=gen) * 2 - 1])
    refs[4] = y[0] + 0.0125  # a near duplicate of y[0]: ||delta||^2 / (2 sigma^2) = 0.03 / 8e-6 = 3750 nats
    x = y + 0.002 * torch.randn(y.shape, generator=gen)
    exact = stf_targets(x, 0.002, refs)
    torch.testing.assert_close(exact, y, rtol=0, atol=0)  # the own sample takes all the weight, bit for bit
    x = y + 3.0 * torch.randn(y.shape, generator=gen)
    reference = stf_targets(x, 3.0, refs)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        under_autocast = stf_targets(x, 3.0, refs)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=0)


def test_class_masking_never_mixes_classes():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn([6, 2, 3, 3], generator=gen) * 5  # large sigma: unmasked weights would spread everywhere
    refs = torch.randn([12, 2, 3, 3], generator=gen)
    classes, ref_classes = torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(12) % 3
    weights = stf_weights(x, 5.0, refs, classes, ref_classes)
    other = classes[:, None] != ref_classes[None, :]
    assert bool((weights[other] == 0).all()) and bool((weights[~other] > 0.01).all())
    torch.testing.assert_close(weights.sum(1), torch.ones(6, dtype=torch.float64))
    targets = stf_targets(x, 5.0, refs, classes, ref_classes)
    for b in range(6):  # the target is the STF target over the sample's class alone
        same = ref_classes == classes[b]
        torch.testing.assert_close(targets[b].double().flatten(), _naive(x[b:b + 1], 5.0, refs[same])[1][0],
                                   rtol=0, atol=1e-6)
    assert class_indices(torch.eye(3)[[2, 0, 1]]).tolist() == [2, 0, 1]
    assert class_indices(torch.zeros(4, 0)) is None and class_indices(None) is None


def test_average_target_equals_ideal_denoiser_only_with_the_own_sample():
    """Exact expectation over the reference draws (enumeration) on a 3-atom distribution: E[T | x] = D*(x) when the
    set is {y} + n-1 i.i.d. draws, with y ~ p(y | x); leaving y out (self-normalised IS) is biased."""
    atoms = torch.tensor([[-1.0, 0.2], [0.3, 0.9], [0.8, -0.6]], dtype=torch.float64)
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    sigma, n = 0.7, 3
    for x in torch.tensor([[-0.5, 0.0], [0.4, 0.3], [1.5, -1.2]], dtype=torch.float64):
        x = x.reshape(1, 2)
        log_post = probs.log() - ((x - atoms) ** 2).sum(1) / (2 * sigma ** 2)
        ideal = (torch.softmax(log_post, 0)[:, None] * atoms).sum(0)
        posterior = torch.softmax(log_post, 0)
        with_own = torch.zeros(2, dtype=torch.float64)
        for own in range(3):
            for others in itertools.product(range(3), repeat=n - 1):
                p = posterior[own] * torch.prod(probs[list(others)])
                with_own += p * stf_targets(x, sigma, atoms[[own, *others]])[0]
        without_own = torch.zeros(2, dtype=torch.float64)
        for draws in itertools.product(range(3), repeat=n):
            without_own += torch.prod(probs[list(draws)]) * stf_targets(x, sigma, atoms[list(draws)])[0]
        torch.testing.assert_close(with_own, ideal, rtol=0, atol=1e-12)
        assert (without_own - ideal).abs().max() > 0.02, (without_own, ideal)


def test_stf_target_variance_is_below_dsm_and_the_reduction_grows_with_sigma():
    """digits in [-1, 1] (D = 64), training-like reference sets (64 own rows + 192 others, R = 256): the trace of
    the target covariance given x, E||T - D*(x)||^2 with D* the posterior mean over all 1797 digits, vs DSM's
    E||y - D*(x)||^2 on the same (y, x)."""
    images, _ = digits_images()
    data = torch.tensor(images.reshape(len(images), -1) / 127.5 - 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    batch, num_refs, num_batches = 64, 256, 32
    ratios = []
    for sigma in (0.5, 1.0, 2.0, 5.0):
        dsm, stf = [], []
        for _ in range(num_batches):
            idx = torch.randint(len(data), [num_refs], generator=gen)
            y, refs = data[idx[:batch]], data[idx]
            x = y + sigma * torch.randn(y.shape, generator=gen, dtype=torch.float64)
            ideal = stf_targets(x, sigma, data)
            dsm.append(((y - ideal) ** 2).sum(1))
            stf.append(((stf_targets(x, sigma, refs) - ideal) ** 2).sum(1))
        dsm, stf = torch.cat(dsm), torch.cat(stf)
        diff = dsm - stf
        print(f'sigma {sigma}: trace DSM {dsm.mean():.4f}, STF {stf.mean():.4f}, ratio {dsm.mean() / stf.mean():.2f}')
        assert diff.mean() > 4 * diff.std() / diff.numel() ** 0.5  # below DSM, beyond sampling noise
        ratios.append(float(dsm.mean() / stf.mean()))
    assert ratios == sorted(ratios) and ratios[0] > 1.05 and ratios[-1] > 50


# ---------------------------------------------------------------------------------------------------------------------
# The loss.

def _stf_batch(num=4, num_refs=10, seed=0, classes=3):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand([num, 2, 4, 4], generator=gen) * 2 - 1
    references = torch.rand([num_refs, 2, 4, 4], generator=gen) * 2 - 1
    labels = torch.eye(classes)[torch.arange(num) % classes]
    reference_labels = torch.eye(classes)[torch.arange(num_refs) % classes]
    noise = torch.randn(images.shape, generator=gen)
    return Batch(images=images, labels=labels, noise=noise, references=references, reference_labels=reference_labels)


def test_stf_loss_regresses_the_target_over_own_rows_and_augmented_references():
    batch = _stf_batch()
    loss_fn, net, pipe = STFLoss(num_refs=9), RecordingNet(), ShiftAugment()
    assert source_chain(loss_fn) == [('ReferenceSource', 9), ('StreamSource', None)]
    loss = loss_fn(net, batch, augment_pipe=pipe)
    assert loss.shape == batch.images.shape and pipe.rows == [4, 5]  # own rows, then the 9 - 4 references used
    y = batch.images + 0.5
    torch.testing.assert_close(net.x, y + net.sigma * batch.noise, rtol=0, atol=1e-6)
    assert net.augment_labels.shape == (4, 9) and net.class_labels is batch.labels
    refs = torch.cat([y, batch.references[:5] + 0.5])
    classes = torch.cat([torch.arange(4) % 3, torch.arange(5) % 3])
    target = stf_targets(net.x, net.sigma, refs, classes[:4], classes)
    weight = (net.sigma ** 2 + 0.25) / (net.sigma * 0.5) ** 2
    torch.testing.assert_close(loss, weight * target ** 2, rtol=1e-6, atol=0)
    # Only the target changed: same sigma and x as EDM's loss from the same RNG state.
    torch.manual_seed(5)
    STFLoss(num_refs=9)(net, Batch(images=batch.images, labels=batch.labels, references=batch.references,
                                   reference_labels=batch.reference_labels))
    stf_x, stf_sigma = net.x, net.sigma
    torch.manual_seed(5)
    plain = EDMLoss()(net, Batch(images=batch.images, labels=batch.labels))
    assert torch.equal(net.x, stf_x) and torch.equal(net.sigma, stf_sigma)
    assert not torch.allclose(plain, loss_fn(RecordingNet(), Batch(images=batch.images, labels=batch.labels,
                                                                   noise=batch.noise, references=batch.references,
                                                                   reference_labels=batch.reference_labels)))


def test_stf_loss_at_large_sigma_weighs_the_first_provided_references_with_their_own_labels():
    """At sigma = 3 the references share the weight (at EDM's typical sigma the own row takes it all, so a loss that
    took other references or mislabelled them would pass the test above): the loss equals a per-sample loop over
    the own rows and the first R - b provided references (augmented), masked by the argmax of their labels."""
    batch = _stf_batch()
    net, pipe = RecordingNet(), ShiftAugment()
    loss = STFLoss(dict(class_name='losses.denoising.EDMLoss', P_mean=float(torch.tensor(3.0).log()), P_std=0.0),
                   num_refs=9)(net, batch, augment_pipe=pipe)
    sigma = net.sigma.double().flatten()
    torch.testing.assert_close(sigma, torch.full([4], 3.0, dtype=torch.float64))
    x = net.x.double().flatten(1)
    refs = [r.double().flatten() for r in batch.images + 0.5] + [r.double().flatten() for r in
                                                                  batch.references[:5] + 0.5]
    ref_classes = [int(l.argmax()) for l in batch.labels] + [int(l.argmax()) for l in batch.reference_labels[:5]]
    expected = torch.zeros(4, 32, dtype=torch.float64)
    for b in range(4):
        own = int(batch.labels[b].argmax())
        same = [k for k in range(9) if ref_classes[k] == own]
        logw = torch.tensor([-float(((x[b] - refs[k]) ** 2).sum()) / (2 * 9.0) for k in same], dtype=torch.float64)
        w = (logw - logw.max()).exp()
        w = w / w.sum()
        assert float(w[[i for i, k in enumerate(same) if k >= 4]].sum()) > 0.05  # the references matter here
        expected[b] = sum(wi * refs[k] for wi, k in zip(w, same))
    weight = (9.0 + 0.25) / (3.0 * 0.5) ** 2
    torch.testing.assert_close(loss.double().flatten(1), weight * expected ** 2, rtol=1e-5, atol=1e-7)


def test_stf_loss_without_augmentation_with_vp_ve_and_unmasked_classes():
    batch = _stf_batch(num=4, num_refs=4, classes=2)
    for base, weight_of in [('losses.denoising.VPLoss', lambda s: 1 / s ** 2),
                            ('losses.denoising.VELoss', lambda s: 1 / s ** 2)]:
        net = RecordingNet()
        loss = STFLoss(dict(class_name=base), num_refs=8, mask_classes=False)(net, batch)  # no augment pipe
        refs = torch.cat([batch.images, batch.references])
        target = stf_targets(net.x, net.sigma, refs)
        torch.testing.assert_close(loss, weight_of(net.sigma) * target ** 2, rtol=1e-6, atol=0)
    # Unmasked (Newbeeer/stf): at large sigma every reference, of any class, gets weight.
    weights = stf_weights(batch.images + 50 * batch.noise, 50.0, torch.cat([batch.images, batch.references]))
    assert bool((weights > 0.01).all())
    # R = b: the reference set is the micro-batch itself; no references needed.
    net = RecordingNet()
    STFLoss(num_refs=4)(net, Batch(images=batch.images, labels=batch.labels, noise=batch.noise))


def test_check_data_takes_a_reference_set_of_exactly_the_micro_batch():
    """R = b is the smallest valid set (its own rows only); R = b - 1 is refused, R > dataset size warns."""
    assert STFLoss(num_refs=4).check_data(batch_gpu_total=8, batch_gpu=4, dataset_size=100) == []
    with pytest.raises(ValueError, match='must hold the per-GPU micro-batch of 4'):
        STFLoss(num_refs=3).check_data(batch_gpu_total=8, batch_gpu=4, dataset_size=100)
    assert STFLoss(num_refs=100).check_data(batch_gpu_total=8, batch_gpu=4, dataset_size=100) == []
    warnings_ = STFLoss(num_refs=101).check_data(batch_gpu_total=8, batch_gpu=4, dataset_size=100)
    assert len(warnings_) == 1 and 'larger than the dataset (100 images)' in warnings_[0]


@pytest.mark.parametrize('num_refs, batch_kwargs, message', [
    (3, {}, r'reference set \(num_refs = --stf-refs = 3\) must hold the whole micro-batch of 4'),
    (9, dict(references=None), 'STFLoss needs 5 reference images in batch.references, got none'),
    (20, {}, 'STFLoss needs 16 reference images in batch.references, got 10'),
    (9, dict(reference_labels=None), 'class masking needs batch.reference_labels'),
])
def test_stf_loss_errors(num_refs, batch_kwargs, message):
    import dataclasses
    batch = dataclasses.replace(_stf_batch(), **batch_kwargs)
    with pytest.raises(ValueError, match=message):
        STFLoss(num_refs=num_refs)(RecordingNet(), batch)
    with pytest.raises(ValueError, match='num_refs'):
        STFLoss(num_refs=0)
    with pytest.raises(TypeError, match='lacks the denoising-loss hooks'):
        STFLoss(dict(class_name='torch.nn.Identity'))
    with pytest.raises(ValueError, match='STF is already applied'):
        stf_loss_kwargs(stf_loss_kwargs(dict(class_name='losses.denoising.EDMLoss')))


def test_snapshot_with_stf_and_aot_loads_safely_and_with_plain_pickle_without_our_losses(tmp_path):
    """A snapshot records the loss config as plain data (registered names and options), so our safe importer reads
    it and plain pickle (EDM's generate.py) loads the snapshot without the `losses` package (absent in EDM's
    environment); the record rebuilds the same config."""
    import losses
    from training import snapshots
    config = aot_loss_kwargs(stf_loss_kwargs(dict(class_name='losses.denoising.EDMLoss', P_mean=-1.0), 32, False), 64)
    path = str(tmp_path / 'snap.pkl')
    snapshots.save_snapshot(path, ema=None, loss_kwargs=config, process=EDMLoss().process)
    loaded = persistence.load_network_pickle(path)
    assert 'loss_fn' not in loaded
    assert loaded['loss'] == {'name': 'aot', 'options': {'pool_size': 64, 'base': {'name': 'stf', 'options': {
        'num_refs': 32, 'mask_classes': False, 'base': {'name': 'edm', 'options': {'P_mean': -1.0}}}}}}
    assert losses.loss_kwargs_from_record(loaded['loss']) == config
    code = ('import sys, pickle; sys.modules["losses"] = None; sys.modules["processes"] = None\n'
            f'data = pickle.load(open({path!r}, "rb"))\n'
            'print(data["loss"]["name"], data["loss"]["options"]["base"]["options"]["num_refs"], data["process"])')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ['aot', '32', "{'name':", "'edm',", "'options':", '{}}']


# ---------------------------------------------------------------------------------------------------------------------
# Training.

@pytest.fixture(scope='module')
def labelled_zip(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return write_zip_dataset(str(root / 'tinylab.zip'), random_images(64), labels=[i % 3 for i in range(64)])


def test_loop_hands_references_from_an_independent_stream(labelled_zip, tmp_path, monkeypatch):
    """The loop gives every round of an iteration the same R raw references and labels from the reference stream,
    and a resume continues that stream where it stopped."""
    seen = []
    original = STFLoss.__call__

    def recording_call(self, net, batch, augment_pipe=None):
        seen.append((batch.images.clone(), batch.references.clone(), batch.reference_labels.clone()))
        return original(self, net, batch, augment_pipe)

    monkeypatch.setattr(STFLoss, '__call__', recording_call)
    kwargs = loop_kwargs(str(tmp_path), labelled_zip, batch_gpu=4, loss_kwargs=stf_loss_kwargs(
        dict(class_name='losses.denoising.EDMLoss'), num_refs=12),
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=labelled_zip, use_labels=True,
                            xflip=False, cache=True))
    tl.training_loop(**kwargs)
    assert len(seen) == 6  # 3 iterations x 2 rounds
    from training.dataset import ImageFolderDataset, InfiniteSampler
    dataset = ImageFolderDataset(labelled_zip, use_labels=True)
    sampler = iter(InfiniteSampler(dataset, seed=reference_stream_seed(123)))
    for it in range(3):
        indices = [next(sampler) for _ in range(12)]
        expected = torch.stack([torch.from_numpy(dataset[i][0]) for i in indices]).float() / 127.5 - 1
        for round_idx in range(2):
            _, references, reference_labels = seen[2 * it + round_idx]
            torch.testing.assert_close(references, expected, rtol=0, atol=0)
            assert reference_labels.argmax(1).tolist() == [i % 3 for i in indices]
    # The references are not the training images of the iteration.
    assert not torch.equal(seen[0][0], seen[0][1][:4])
    state = torch.load(os.path.join(str(tmp_path), 'training-state-000000.pt'), weights_only=True)
    assert state['reference_position'] == 36 and state['data_position'] == 24


def _resume_kwargs(run_dir, data, loss_kwargs):
    """Augmentation, dropout, 2 accumulation rounds, class labels: every random stream in use."""
    return loop_kwargs(
        run_dir, data, batch_gpu=4, kimg_per_tick=0.008, loss_kwargs=loss_kwargs,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True,
                            xflip=False, cache=True),
        network_kwargs=dict(loop_kwargs('', '')['network_kwargs'], dropout=0.2, augment_dim=9),
        augment_kwargs=dict(class_name='training.augment.AugmentPipe', p=0.5, xflip=1e8, yflip=1, scale=1,
                            rotate_frac=1, aniso=1, translate_frac=1))


def assert_exact_resume(tmp_path, data, loss_kwargs):
    """5 iterations straight == 3 iterations, then a resume from that state to 5: weights, EMA, Adam, RNG, data."""
    runs = {name: str(tmp_path / name) for name in ('straight', 'first', 'resumed')}
    for d in runs.values():
        os.makedirs(d)
    tl.training_loop(**dict(_resume_kwargs(runs['straight'], data, loss_kwargs), total_kimg=0.040))
    tl.training_loop(**dict(_resume_kwargs(runs['first'], data, loss_kwargs), total_kimg=0.024))
    first_state = os.path.join(runs['first'], 'training-state-000000.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # same options: no 'not exact' warning
        warnings.filterwarnings('ignore', message="--aot: the wrapped loss's target")  # said at every start
        tl.training_loop(**dict(_resume_kwargs(runs['resumed'], data, loss_kwargs), total_kimg=0.040,
                                resume_state_dump=first_state))
    a, b = (torch.load(os.path.join(runs[name], 'training-state-000000.pt'), weights_only=True)
            for name in ('straight', 'resumed'))
    assert a['cur_nimg'] == b['cur_nimg'] == 40 and a['data_position'] == b['data_position'] == 40
    assert a.get('reference_position') == b.get('reference_position')
    for key in ('networks', 'ema', 'optimizers', 'rng', 'cur_iter'):
        assert_tree_equal(a[key], b[key], key)
    first = torch.load(first_state, weights_only=True)
    assert not torch.equal(first['networks']['net']['model.enc.8x8_conv.weight'],
                           a['networks']['net']['model.enc.8x8_conv.weight'])
    return a


def test_reference_position_is_global_and_a_two_rank_resume_continues_each_ranks_stream():
    """reference_position counts the references of all ranks (R per rank and iteration); resumed from it, each of 2
    ranks reads the references an uninterrupted run reads next."""
    from losses.stf import ReferenceSource
    from training.batch_sources import DataContext

    class Inner:
        def next_rounds(self):
            return [Batch(images=torch.zeros(1, 1, 2, 2), labels=torch.zeros(1, 0))]

        def state_dict(self):
            return {}

    dataset = torch.utils.data.TensorDataset(torch.arange(40 * 4).reshape(40, 1, 2, 2).to(torch.uint8),
                                             torch.zeros(40, 0))

    def source(rank, resume):
        data = DataContext(dataset=dataset, rank=rank, world_size=2, seed=3, batch_gpu=1, num_rounds=1,
                           device=torch.device('cpu'), loader_kwargs={}, resume=resume)
        return ReferenceSource(Inner(), data, num_refs=3)

    for rank in (0, 1):
        straight = source(rank, {})
        refs = [straight.next_rounds()[0].references for _ in range(5)]
        assert straight.state_dict()['reference_position'] == 2 * 5 * 3
        resumed_source = source(rank, {'reference_position': 2 * 3 * 3})  # after 3 iterations
        resumed = [resumed_source.next_rounds()[0].references for _ in range(2)]
        assert torch.equal(resumed[0], refs[3]) and torch.equal(resumed[1], refs[4])
        assert not torch.equal(refs[3], refs[4])


def test_exact_resume_with_stf(labelled_zip, tmp_path):
    state = assert_exact_resume(tmp_path, labelled_zip, stf_loss_kwargs(dict(class_name='losses.denoising.EDMLoss'),
                                                                        num_refs=12))
    assert state['reference_position'] == 5 * 12


def _invoke(args):
    return CliRunner().invoke(train.main, [str(a) for a in args], catch_exceptions=False)


def test_train_cli_with_stf_writes_snapshots(labelled_zip, tmp_path):
    outdir = tmp_path / 'runs'
    result = _invoke(['--outdir', outdir, '--data', labelled_zip, '--cond', 1, '--loss', 'edm', '--stf', 1,
                      '--stf-refs', 40, '--batch', 32, '--duration', 0.001, '--tick', 1, '--snap', 1, '--dump', 1,
                      '--seed', 1, '--dropout', 0, *TINY_NET])
    assert result.exit_code == 0, result.output
    run_dir = outdir / '00000-tinylab-cond-ddpmpp-edm-gpus1-batch32-fp32-stf40'
    assert {'network-snapshot-000000.pkl', 'network-snapshot-000001.pkl', 'training-state-000001.pt'} <= set(
        os.listdir(run_dir))
    options = json.load(open(run_dir / 'training_options.json'))
    assert options['loss_kwargs'] == dict(class_name='losses.stf.STFLoss', num_refs=40, mask_classes=True,
                                          base_kwargs=dict(class_name='losses.denoising.EDMLoss'))
    snapshot = persistence.load_network_pickle(str(run_dir / 'network-snapshot-000001.pkl'))
    assert snapshot['loss']['name'] == 'stf' and snapshot['loss']['options']['num_refs'] == 40
    state = torch.load(run_dir / 'training-state-000001.pt', weights_only=True)
    assert state['cur_nimg'] == 1024 and state['reference_position'] == 32 * 40
    lines = [json.loads(line) for line in open(run_dir / 'stats.jsonl')]
    assert all(torch.isfinite(torch.tensor(line['Loss/loss']['mean'])) for line in lines)


@pytest.mark.parametrize('extra, message', [
    (['--stf-refs', 16], '--stf-refs and --stf-mask-classes need --stf=1'),
    (['--stf', 1, '--stf-refs', 4, '--batch', 16, '--batch-gpu', 8],
     'Invalid value for --stf-refs: the reference set of 4 images per GPU must hold the per-GPU micro-batch of 8'),
])
def test_train_cli_stf_option_errors(labelled_zip, tmp_path, extra, message):
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', labelled_zip, '-n', *extra])
    assert result.exit_code != 0 and message in result.output, result.output


def test_train_cli_stf_over_vp_dry_run(labelled_zip, tmp_path):
    result = _invoke(['--outdir', tmp_path / 'runs', '--data', labelled_zip, '--precond', 'vp', '--stf', 1,
                      '--stf-mask-classes', 0, '--loss-opt', 'beta_d=10', '-n', *TINY_NET])
    assert result.exit_code == 0, result.output
    start = result.output.index('Training options:') + len('Training options:')
    options = json.loads(result.output[start:result.output.index('\n\n', start + 2)])
    assert options['loss_kwargs'] == dict(class_name='losses.stf.STFLoss', num_refs=1024, mask_classes=False,
                                          base_kwargs=dict(class_name='losses.denoising.VPLoss', beta_d=10.0))
    assert glob.glob(str(tmp_path / 'runs' / '*')) == []


class _OtherProcessLoss(EDMLoss):
    """A DenoisingLoss over a process that is not EDM's x = y + sigma * n (as an added flow-matching loss)."""

    class process:  # noqa: N801 - a stand-in process object
        name = 'flow'


def test_stf_refuses_a_base_loss_over_another_process():
    """STF's target is EDM's posterior mean: over an added DenoisingLoss of another process it would train a wrong
    network without a word (extensibility trial B: --loss=flow --stf trained), so it is refused when built."""
    with pytest.raises(TypeError, match=r"--stf: STF targets are posterior means under EDM's process.*'flow'"):
        STFLoss(dict(class_name=f'{__name__}._OtherProcessLoss'), num_refs=9)
