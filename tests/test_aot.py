"""AOT (losses/aot.py): exact assignment against brute force, lower paired distance than the identity pairing on
every pool, class-wise pairing, each image and noise used once per pool in the loop, composition with STF/VP/VE,
exact resume inside a pool, the background assignment equal to the synchronous one, and train.py --aot."""

import itertools
import json
import os
import subprocess
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from launch import torchrun
from test_stf import TINY_NET, RecordingNet, ShiftAugment, _resume_kwargs, assert_exact_resume
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
from losses.aot import AOTLoss, aot_loss_kwargs, assign_noise, pairwise_distances
from losses.stf import STFLoss, stf_loss_kwargs, stf_targets
from torch_utils import persistence
from training import training_loop as tl
from training.dataset import ImageFolderDataset, InfiniteSampler

EDM = dict(class_name='losses.denoising.EDMLoss')


def _cost(images, noise, perm):
    return float(torch.linalg.vector_norm((images - noise[perm]).flatten(1), dim=1).sum())


def test_pairwise_distances_match_explicit_differences():
    gen = torch.Generator().manual_seed(0)
    images, noise = torch.rand([5, 3, 4, 4], generator=gen) * 2 - 1, torch.randn([7, 3, 4, 4], generator=gen)
    expected = torch.linalg.vector_norm(images.double().flatten(1)[:, None] - noise.double().flatten(1)[None], dim=2)
    torch.testing.assert_close(pairwise_distances(images, noise), expected, rtol=1e-12, atol=1e-12)


def test_assignment_is_optimal_by_brute_force_and_classwise_with_labels():
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        images, noise = torch.rand([6, 2, 2, 3], generator=gen) * 2 - 1, torch.randn([6, 2, 2, 3], generator=gen)
        perm = assign_noise(images, noise)
        assert sorted(perm.tolist()) == list(range(6))
        best = min(_cost(images, noise, torch.tensor(p)) for p in itertools.permutations(range(6)))
        assert _cost(images, noise, perm) == pytest.approx(best, rel=1e-12)

        classes = torch.tensor([0, 1, 0, 2, 1, 0])
        perm = assign_noise(images, noise, torch.eye(3)[classes])
        assert sorted(perm.tolist()) == list(range(6)) and torch.equal(classes[perm], classes)  # never across classes
        feasible = [p for p in itertools.permutations(range(6)) if torch.equal(classes[list(p)], classes)]
        best = min(_cost(images, noise, torch.tensor(p)) for p in feasible)
        assert _cost(images, noise, perm) == pytest.approx(best, rel=1e-12)
    # Labels of dimension 0 (unconditional datasets) mean one global assignment.
    torch.testing.assert_close(assign_noise(images, noise, torch.zeros(6, 0)), assign_noise(images, noise))
    with pytest.raises(ValueError, match='one noise per image'):
        assign_noise(images, noise[:5])


def test_paired_distance_is_lower_than_identity_on_every_pool():
    images, labels = digits_images()
    data = torch.tensor(images, dtype=torch.float32)[:, None] / 127.5 - 1
    gen = torch.Generator().manual_seed(2)
    gains = []
    for pool_idx in range(8):
        idx = torch.randperm(len(data), generator=gen)[:128]
        pool_images, pool_labels = data[idx], torch.eye(10)[torch.from_numpy(labels)[idx]]
        noise = torch.randn(pool_images.shape, generator=gen)
        for conditional in (False, True):
            perm = assign_noise(pool_images, noise, pool_labels if conditional else None)
            paired = pairwise_distances(pool_images, noise[perm]).diagonal().mean()
            identity = pairwise_distances(pool_images, noise).diagonal().mean()
            assert paired < identity, (pool_idx, conditional)
            gains.append(float(1 - paired / identity))
            if conditional:
                assert torch.equal(pool_labels[perm], pool_labels)
    print(f'AOT on 8x8 digits, pools of 128: mean paired distance {100 * np.mean(gains[0::2]):.1f} % (uncond), '
          f'{100 * np.mean(gains[1::2]):.1f} % (class-wise) below random pairing')
    assert min(gains[0::2]) > 0.02  # D = 64: a few percent, as expected (losses.md 2.9)


def test_prepare_pool_augments_once_and_permutes_the_drawn_noise():
    gen = torch.Generator().manual_seed(3)
    images = torch.rand([12, 1, 4, 4], generator=gen) * 2 - 1
    labels = torch.eye(3)[torch.arange(12) % 3]
    loss_fn, pipe = AOTLoss(pool_size=12), ShiftAugment()
    assert source_chain(loss_fn, batch_gpu=4, num_rounds=3) == [('PoolSource', 12), ('StreamSource', None)]
    torch.manual_seed(7)
    pool = loss_fn.prepare_pool(Batch(images=images, labels=labels), augment_pipe=pipe)
    torch.manual_seed(7)
    drawn = torch.randn_like(images)
    assert pipe.rows == [12] and torch.equal(pool.images, images + 0.5) and pool.augment_labels.shape == (12, 9)
    assert pool.labels is labels and pool.references is None
    match = (pool.noise.flatten(1)[:, None] == drawn.flatten(1)[None]).all(-1)  # [pool row, drawn row]
    assert match.sum(1).tolist() == [1] * 12 and match.sum(0).tolist() == [1] * 12  # each noise exactly once
    perm = match.float().argmax(1)
    assert torch.equal(perm % 3, torch.arange(12) % 3)  # within classes
    assert torch.equal(perm, assign_noise(images + 0.5, drawn, labels))
    # Without augmentation the images pass through, with no augment labels.
    plain = loss_fn.prepare_pool(Batch(images=images, labels=labels))
    assert plain.images is images and plain.augment_labels is None


def test_aot_loss_uses_the_paired_noise_and_composes_with_stf_vp_ve():
    gen = torch.Generator().manual_seed(4)
    images, noise = torch.rand([4, 2, 4, 4], generator=gen) * 2 - 1, torch.randn([4, 2, 4, 4], generator=gen)
    labels = torch.eye(2)[[0, 1, 0, 1]]
    for base in ('losses.denoising.EDMLoss', 'losses.denoising.VPLoss', 'losses.denoising.VELoss'):
        net = RecordingNet()
        loss = AOTLoss(dict(class_name=base), pool_size=8)(net, Batch(images=images, labels=labels, noise=noise,
                                                                      augment_labels=torch.ones(4, 9)))
        torch.testing.assert_close(net.x, images + net.sigma * noise, rtol=0, atol=1e-6)
        assert torch.equal(net.augment_labels, torch.ones(4, 9))  # the pool's augmentation, not a new one
        assert loss.shape == images.shape
    # AOT over STF: paired noise in x, STF target over own rows + references.
    references = torch.rand([4, 2, 4, 4], generator=gen) * 2 - 1
    loss_fn = AOTLoss(stf_loss_kwargs(EDM, num_refs=8), pool_size=8)
    assert source_chain(loss_fn) == [('ReferenceSource', 8), ('PoolSource', 8), ('StreamSource', None)]
    net = RecordingNet()
    loss = loss_fn(net, Batch(images=images, labels=labels, noise=noise, references=references,
                              reference_labels=torch.eye(2)[[1, 1, 0, 0]]))
    torch.testing.assert_close(net.x, images + net.sigma * noise, rtol=0, atol=1e-6)
    target = stf_targets(net.x, net.sigma, torch.cat([images, references]), torch.tensor([0, 1, 0, 1]),
                         torch.tensor([0, 1, 0, 1, 1, 1, 0, 0]))
    weight = (net.sigma ** 2 + 0.25) / (net.sigma * 0.5) ** 2
    torch.testing.assert_close(loss, weight * target ** 2, rtol=1e-6, atol=0)
    assert isinstance(loss_fn.base, STFLoss)
    with pytest.raises(ValueError, match='AOTLoss needs the paired noise'):
        loss_fn(net, Batch(images=images, labels=labels))
    with pytest.raises(ValueError, match='pool_size'):
        AOTLoss(pool_size=0)
    with pytest.raises(ValueError, match='AOT is already applied'):
        aot_loss_kwargs(aot_loss_kwargs(EDM))


# ---------------------------------------------------------------------------------------------------------------------
# In the training loop.

@pytest.fixture(scope='module')
def labelled_zip(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return write_zip_dataset(str(root / 'tinylab.zip'), random_images(64), labels=[i % 3 for i in range(64)])


def test_loop_consumes_each_pool_in_order_each_image_and_noise_once(labelled_zip, tmp_path, monkeypatch):
    seen = []
    original = AOTLoss.__call__

    def recording_call(self, net, batch, augment_pipe=None):
        seen.append((batch.images.clone(), batch.noise.clone(), batch.labels.clone()))
        return original(self, net, batch, augment_pipe)

    monkeypatch.setattr(AOTLoss, '__call__', recording_call)
    tl.training_loop(**loop_kwargs(
        str(tmp_path), labelled_zip, batch_gpu=4, total_kimg=0.032, loss_kwargs=aot_loss_kwargs(EDM, pool_size=16),
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=labelled_zip, use_labels=True,
                            xflip=False, cache=True)))
    assert len(seen) == 8  # 4 iterations x 2 rounds = 2 pools of 16
    dataset = ImageFolderDataset(labelled_zip, use_labels=True)
    stream = iter(InfiniteSampler(dataset, seed=123))
    for pool_idx in range(2):
        rows = seen[4 * pool_idx: 4 * pool_idx + 4]
        images, noise, labels = (torch.cat([r[k] for r in rows]) for k in range(3))
        indices = [next(stream) for _ in range(16)]  # the pool is the next 16 images of the rank's stream, in order
        expected = torch.stack([torch.from_numpy(dataset[i][0]) for i in indices]).float() / 127.5 - 1
        torch.testing.assert_close(images, expected, rtol=0, atol=0)
        assert labels.argmax(1).tolist() == [i % 3 for i in indices]
        assert len({tuple(n.flatten().tolist()) for n in noise}) == 16  # 16 distinct noises: each used once
        # The handed-out pairing is the optimal class-wise assignment (the identity is optimal for it).
        assert torch.equal(assign_noise(images, noise, labels), torch.arange(16))
        distances = pairwise_distances(images, noise)
        assert distances.diagonal().mean() < distances.mean()
    assert not torch.equal(seen[0][1], seen[4][1])  # fresh noise every pool


def test_pool_that_does_not_divide_into_steps_is_refused(labelled_zip, tmp_path):
    with pytest.raises(ValueError, match=r'pool of 12 images per GPU must be a multiple of the per-GPU batch per '
                                         r'step, 8 \(batch size / number of processes\)'):
        tl.training_loop(**loop_kwargs(str(tmp_path), labelled_zip, loss_kwargs=aot_loss_kwargs(EDM, pool_size=12)))
    result = CliRunner().invoke(train.main, [str(a) for a in ['--outdir', tmp_path / 'runs', '--data', labelled_zip,
                                                              '--batch', 16, '--aot', 24, '-n']])
    assert result.exit_code != 0
    assert ('Invalid value for --aot: the pool of 24 images per GPU must be a multiple of the per-GPU batch per step, '
            '16 (batch size / number of processes)') in result.output, result.output


@pytest.mark.parametrize('plugins', ['aot', 'aot+stf'])
def test_exact_resume_inside_a_pool(labelled_zip, tmp_path, plugins):
    """Pools of 16 = 2 iterations of 8: the resume at 24 images starts in the middle of the second pool."""
    config = stf_loss_kwargs(EDM, num_refs=12) if plugins == 'aot+stf' else EDM
    state = assert_exact_resume(tmp_path, labelled_zip, aot_loss_kwargs(config, pool_size=16))
    assert state.get('reference_position', 0) == (5 * 12 if plugins == 'aot+stf' else 0)


@pytest.mark.parametrize('plugins', ['stf', 'aot+stf'])
def test_a_resume_replays_the_streams_from_the_resume_points_in_the_state(labelled_zip, tmp_path, monkeypatch,
                                                                           plugins):
    """A training state keeps each stream's newest resume point (its order and generator state) at or before the
    position a resume starts from (AOT: the start of the pool it re-reads); the resume replays only the draws after it
    (it replayed the whole stream: 4-6 minutes for STF's reference stream at 200 Mimg) and stays exact. Here a point
    every 8 draws."""
    monkeypatch.setattr(InfiniteSampler, '_CHUNK', 4)
    monkeypatch.setattr(InfiniteSampler, 'RESUME_POINT_DRAWS', 8)
    monkeypatch.setattr(InfiniteSampler, 'RESUME_POINTS_KEPT', 8)  # AOT reads two pools ahead: 32 draws here
    starts, start = [], InfiniteSampler._start

    def recording_start(self, first, window):
        order, rnd, done = start(self, first, window)
        starts.append((first, done))
        return order, rnd, done

    monkeypatch.setattr(InfiniteSampler, '_start', recording_start)
    config = stf_loss_kwargs(EDM, num_refs=12)
    assert_exact_resume(tmp_path, labelled_zip, aot_loss_kwargs(config, pool_size=16) if plugins == 'aot+stf'
                        else config)
    state = torch.load(tmp_path / 'first' / 'training-state-000000.pt', weights_only=True)
    pool_start = 16 if plugins == 'aot+stf' else state['data_position']  # 24 images: the second pool of 16
    for name, position in (('data', pool_start), ('reference', state['reference_position'])):
        point = state[f'{name}_stream_resume_point']
        assert 0 < point['draw'] <= position and point['draw'] % 8 == 0, (name, point['draw'], position)
    resumed = [(first, done) for first, done in starts if first > 0]
    assert len(resumed) == 2 and all(0 < done <= first for first, done in resumed), starts


def test_resume_with_another_per_rank_batch_keeps_whole_steps(monkeypatch):
    """A resume with another --batch (allowed, inexact) can land inside a pool at a position that is not a multiple
    of the new step: the pool is then consumed in whole steps and the rows short of a step are passed over (before:
    rounds of 8, 4, 0, 0, ... rows, then a crash on the empty batch)."""
    from training.batch_sources import DataContext, StreamSource
    monkeypatch.setattr('losses.aot.BACKGROUND_ASSIGNMENT', False)

    class Numbered(torch.utils.data.Dataset):  # image i holds the value i
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return np.full([1, 2, 2], i, dtype=np.uint8), np.zeros([0], dtype=np.float32)

    def source(batch_gpu, resume):
        data = DataContext(dataset=Numbered(), rank=0, world_size=1, seed=0, batch_gpu=batch_gpu, num_rounds=1,
                           device=torch.device('cpu'), loader_kwargs=dict(num_workers=0), resume=resume)
        return AOTLoss(pool_size=16).batch_source(data, StreamSource(data))

    first = source(4, {})
    first.next_rounds()
    saved = first.state_dict()
    assert saved['data_position'] == 4
    for position in (4, 12, 14):  # resumed positions inside the first pool
        resumed = source(8, {**saved, 'data_position': position})
        sizes, positions = [], []
        for _ in range(4):
            (batch,) = resumed.next_rounds()
            sizes.append(batch.images.shape[0])
            positions.append(resumed.state_dict()['data_position'])
        assert sizes == [8] * 4
        # From 4: rows 4..11, then the 4 rows left are short of a step and the next pools follow; from 12 and 14
        # the first pool has less than a step left.
        assert positions == {4: [12, 24, 32, 40], 12: [24, 32, 40, 48], 14: [24, 32, 40, 48]}[position]


def test_aot_over_stf_warns_that_stfs_target_undoes_the_pairing():
    """STF's weights are the posterior for noise independent of the image: under AOT's pairing its target is the
    unpaired posterior mean (a 1-D toy: y = +-1, sigma = 3, pools of 512 paired by |y - z|, 1024 references: AOT's
    E[y | x] is 1.00 at x ~ 1.5, STF's target under the same pairs 0.16, the unpaired tanh(x / sigma^2) 0.16)."""
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(0)
    y, z = rng.choice([-1.0, 1.0], 512), rng.standard_normal(512)
    rows, cols = linear_sum_assignment(np.abs(y[:, None] - z[None, :]))
    x = y + 3 * z[cols[np.argsort(rows)]]
    refs = np.concatenate([y[:, None], rng.choice([-1.0, 1.0], (512, 1023))], axis=1)  # own image first, as STF
    logw = -(x[:, None] - refs) ** 2 / 18
    w = np.exp(logw - logw.max(axis=1, keepdims=True))
    target = (w * refs).sum(axis=1) / w.sum(axis=1)
    near = (x > 0.5) & (x < 2.5)
    assert y[near].mean() == 1.0  # AOT's pairs: positive x comes from y = +1 only
    assert abs(target[near].mean() - np.tanh(x[near] / 9).mean()) < 0.03 < 0.5 < 1 - target[near].mean()

    layout = dict(batch_gpu_total=8, batch_gpu=8, dataset_size=100)
    assert AOTLoss(base_kwargs=EDM, pool_size=16).check_data(**layout) == []
    (message,) = AOTLoss(base_kwargs=stf_loss_kwargs(EDM, num_refs=12), pool_size=16).check_data(**layout)
    assert message.startswith('--aot: ') and 'replaces the paired target' in message


def test_train_cli_with_aot_and_with_aot_plus_stf(labelled_zip, tmp_path):
    outdir = tmp_path / 'runs'
    common = ['--outdir', outdir, '--data', labelled_zip, '--cond', 1, '--loss', 'edm', '--batch', 32, '--duration',
              0.001, '--tick', 1, '--snap', 1, '--dump', 1, '--seed', 1, '--dropout', 0, *TINY_NET]
    for extra, name in [(['--aot', 64], '00000-tinylab-cond-ddpmpp-edm-gpus1-batch32-fp32-aot64'),
                        (['--aot', 64, '--stf', 1, '--stf-refs', 40],
                         '00001-tinylab-cond-ddpmpp-edm-gpus1-batch32-fp32-stf40-aot64')]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            result = CliRunner().invoke(train.main, [str(a) for a in common + extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        said = [w for w in caught if 'replaces the paired target' in str(w.message)]
        assert len(said) == ('--stf' in extra)  # once: train.py and the loop both said it
        run_dir = outdir / name
        assert {'network-snapshot-000000.pkl', 'network-snapshot-000001.pkl', 'training-state-000001.pt'} <= set(
            os.listdir(run_dir))
        options = json.load(open(run_dir / 'training_options.json'))
        snapshot = persistence.load_network_pickle(str(run_dir / 'network-snapshot-000001.pkl'))
        assert snapshot['loss']['name'] == 'aot' and snapshot['loss']['options']['pool_size'] == 64
        if '--stf' in extra:
            assert options['loss_kwargs'] == dict(class_name='losses.aot.AOTLoss', pool_size=64, base_kwargs=dict(
                class_name='losses.stf.STFLoss', num_refs=40, mask_classes=True, base_kwargs=EDM))
            assert snapshot['loss']['options']['base']['name'] == 'stf'
        else:
            assert options['loss_kwargs'] == dict(class_name='losses.aot.AOTLoss', pool_size=64, base_kwargs=EDM)
        state = torch.load(run_dir / 'training-state-000001.pt', weights_only=True)
        assert state['cur_nimg'] == 1024 and state['data_position'] == 1024
        lines = [json.loads(line) for line in open(run_dir / 'stats.jsonl')]
        assert all(np.isfinite(line['Loss/loss']['mean']) for line in lines)
    with pytest.warns(UserWarning, match='replaces the paired target'):  # a dry run has no loop to say it
        result = CliRunner().invoke(train.main, [str(a) for a in common + extra + ['-n']], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_with_aot_and_stf(labelled_zip, tmp_path):
    """torchrun, 2 CPU ranks: per-rank pools (4 images per rank and iteration, pools of 8) and reference streams."""
    config = loop_kwargs(str(tmp_path), labelled_zip, batch_size=8, total_kimg=0.032,
                         loss_kwargs=aot_loss_kwargs(stf_loss_kwargs(EDM, num_refs=12), pool_size=8),
                         dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=labelled_zip,
                                             use_labels=True, xflip=False, cache=True))
    config_path = tmp_path / 'config.json'
    config_path.write_text(json.dumps(config))
    cmd = torchrun(2, os.path.join(ROOT, 'tests', 'train_worker.py'), config_path)
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = torch.load(tmp_path / 'training-state-000000.pt', weights_only=True)
    assert state['world_size'] == 2 and len(state['rng']) == 2 and state['cur_iter'] == 4
    assert state['data_position'] == 32 and state['reference_position'] == 2 * 4 * 12
    assert all(torch.isfinite(v).all() for v in state['networks']['net'].values())


def test_background_assignment_gives_the_synchronous_pairs_trajectory_and_resume(labelled_zip, tmp_path,
                                                                                 monkeypatch):
    """The next pool's assignment solved in a worker thread (BACKGROUND_ASSIGNMENT, the default) against the
    synchronous source: the same handed-out pairs, the same training state after 5 iterations (weights, EMA, Adam,
    RNG, data position), and a resume whose first part ran with the other mode is exact."""
    import threading

    from losses import aot

    solved_in, handed_out = [], []
    solve, call = aot._solve_assignment, AOTLoss.__call__

    def recording_solve(*args):
        solved_in.append(threading.current_thread().name)
        return solve(*args)

    def recording_call(self, net, batch, augment_pipe=None):
        handed_out.append(torch.cat([batch.images.flatten(1), batch.noise.flatten(1)], dim=1).clone())
        return call(self, net, batch, augment_pipe)

    monkeypatch.setattr(aot, '_solve_assignment', recording_solve)
    monkeypatch.setattr(AOTLoss, '__call__', recording_call)
    config = aot_loss_kwargs(EDM, pool_size=16)  # 2 iterations of 8 per pool: 5 iterations cross 3 pools
    states, pairs, threads = {}, {}, {}
    for mode, background in (('sync', False), ('background', True)):
        monkeypatch.setattr(aot, 'BACKGROUND_ASSIGNMENT', background)
        solved_in.clear()
        handed_out.clear()
        run_dir = tmp_path / mode
        run_dir.mkdir()
        tl.training_loop(**dict(_resume_kwargs(str(run_dir), labelled_zip, config), total_kimg=0.040))
        states[mode] = torch.load(run_dir / 'training-state-000000.pt', weights_only=True)
        pairs[mode], threads[mode] = torch.stack(handed_out), list(solved_in)
    assert threads['sync'] == ['MainThread'] * 3
    # The background source also started a 4th pool (after the 5th iteration's) and solved all in its worker.
    assert len(threads['background']) == 4 and all(name.startswith('aot-assignment') for name in threads['background'])
    assert torch.equal(pairs['sync'], pairs['background']) and len(pairs['sync']) == 10  # 5 iterations x 2 rounds
    for key in ('networks', 'ema', 'optimizers', 'rng', 'cur_iter', 'data_position'):
        assert_tree_equal(states['sync'][key], states['background'][key], key)

    # A run that starts synchronously and resumes (inside a pool) in the background ends where both straight runs do.
    first, resumed = tmp_path / 'first', tmp_path / 'resumed'
    first.mkdir(), resumed.mkdir()
    monkeypatch.setattr(aot, 'BACKGROUND_ASSIGNMENT', False)
    tl.training_loop(**dict(_resume_kwargs(str(first), labelled_zip, config), total_kimg=0.024))
    monkeypatch.setattr(aot, 'BACKGROUND_ASSIGNMENT', True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the mode is not a trajectory option: no 'not exact' warning
        tl.training_loop(**dict(_resume_kwargs(str(resumed), labelled_zip, config), total_kimg=0.040,
                                resume_state_dump=str(first / 'training-state-000000.pt')))
    state = torch.load(resumed / 'training-state-000000.pt', weights_only=True)
    for key in ('networks', 'ema', 'optimizers', 'rng', 'cur_iter', 'data_position'):
        assert_tree_equal(states['sync'][key], state[key], key)


def test_start_assignment_in_a_worker_equals_assign_noise():
    """The future's permutation is assign_noise's, with and without classes; PendingPool pairs the noise with it."""
    import concurrent.futures

    from losses.aot import PendingPool, start_assignment

    gen = torch.Generator().manual_seed(5)
    images, noise = torch.rand([24, 1, 4, 4], generator=gen) * 2 - 1, torch.randn([24, 1, 4, 4], generator=gen)
    labels = torch.eye(3)[torch.randint(0, 3, [24], generator=gen)]
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        for given in (None, labels):
            future = start_assignment(images, noise, given, executor)
            perm = assign_noise(images, noise, given)
            assert torch.equal(torch.from_numpy(future.result()), perm)
            pool = PendingPool(Batch(images=images, labels=labels), noise, future).result()
            assert torch.equal(pool.noise, noise[perm]) and pool.images is images


def test_stochastic_sampling_of_an_aot_snapshot_is_noted(tmp_path):
    """generate.py and fid.py say when a network trained on paired noise is sampled with steps that draw fresh noise
    (Heun's churn, SPD's ancestral default, DG's boosting); deterministic samplers and other losses say nothing."""
    from test_generate import tiny_net

    import generate
    from losses import stochastic_sampling_notes
    from processes import EDMProcess
    from processes.spd import SPDProcess
    from samplers.generation import GRID_SAMPLING, SamplerConfig
    from training.snapshots import save_snapshot

    edm = dict(class_name='losses.denoising.EDMLoss')
    aot_stf = aot_loss_kwargs(stf_loss_kwargs(edm, num_refs=8), pool_size=64)
    assert stochastic_sampling_notes(None) == [] and stochastic_sampling_notes({'name': 'edm', 'options': {}}) == []
    from losses import loss_record
    assert stochastic_sampling_notes(loss_record(aot_stf)) == [AOTLoss.stochastic_sampling_note]
    assert stochastic_sampling_notes(loss_record(stf_loss_kwargs(aot_loss_kwargs(edm, pool_size=8), num_refs=8))) \
        == [AOTLoss.stochastic_sampling_note]  # a wrapper's base is read too

    net = tiny_net()
    # Which samplers draw noise: the registry's rule per solver, with the defaults filled in.
    assert not GRID_SAMPLING.draws_noise(net, SamplerConfig())
    assert GRID_SAMPLING.draws_noise(net, SamplerConfig(solver='heun', solver_kwargs=dict(S_churn=40.0)))
    assert not GRID_SAMPLING.draws_noise(net, SamplerConfig(solver='heun', solver_kwargs=dict(S_churn=0.0)))
    assert not GRID_SAMPLING.draws_noise(net, SamplerConfig(solver='unipc', num_steps=6))
    assert GRID_SAMPLING.draws_noise(net, SamplerConfig(guidance={'dg': dict(value='unused.pkl', boost=True)}))
    fourier = SPDProcess(T=50).sampling
    assert fourier.draws_noise(net, SamplerConfig())  # all T ancestral steps
    assert not fourier.draws_noise(net, SamplerConfig(solver='ddim'))
    assert not fourier.draws_noise(net, SamplerConfig(num_steps=8))  # the few-step default, DPM-Solver++(2M)

    for name, loss in [('aot', aot_stf), ('edm', edm)]:
        path = str(tmp_path / f'{name}.pkl')
        save_snapshot(path, ema=net, loss_kwargs=loss, process=EDMProcess())
        for extra, noted in [(['--S_churn', '40'], name == 'aot'), ([], False)]:
            result = CliRunner().invoke(generate.main, ['--network', path, '--outdir', str(tmp_path / f'{name}{extra}'),
                                                        '--seeds', '0', '--steps', '3', '--device', 'cpu', *extra])
            assert result.exit_code == 0, result.output
            said = f'Note: this snapshot {AOTLoss.stochastic_sampling_note}; this sampler draws noise in its steps'
            assert (said in result.output) == noted, (name, extra, result.output)
