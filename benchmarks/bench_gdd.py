"""GDD's three claims at toy scale (scikit-learn digits at 16 x 16, CPU): a small EDM model is pre-trained, then
fine-tuned into a one-step generator G(z) = D(80 z; 80) with GDD's GAN loss (the small spectral-norm CNN
discriminator), and compared by the Frechet distance in the digit classifier's feature space (metrics/digits_classifier,
not FID) against all 1,797 real digits.

    python benchmarks/bench_gdd.py --outdir /tmp/bench-gdd              # about 15 CPU minutes at one thread

(1) innate one-step ability: the one-step distance of the pre-trained model (blurry means) and its curve under GDD,
    next to the 35-NFE Heun teacher's; (2) GDD-I (freeze=1) against GDD over --seeds; (3) the same budget (images,
    G updates, optimizer) with plain L2 regression of G(z) onto the teacher's 35-NFE sample from the same z.
Everything goes through the training loop and the snapshots' own sampling, as train.py and generate.py would; results
are written to OUTDIR/results.json and printed.
"""

import io
import json
import os
import sys
import time
import zipfile

import click
import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics import digits_classifier  # noqa: E402
from metrics.frechet import frechet_distance  # noqa: E402
from processes import OneStepProcess  # noqa: E402
from samplers.generation import generate_images  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training import snapshots  # noqa: E402
from training import training_loop as tl  # noqa: E402

RESOLUTION = 16
TEACHER = dict(class_name='training.preconditioning.EDMPrecond', model_type='SongUNet', embedding_type='positional',
               encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
               model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)


def write_digits_zip(path: str) -> str:
    images, _ = digits_classifier.digits_as_uint8(RESOLUTION)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        for idx, image in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(image[0]).save(buf, format='png', compress_level=0)
            zf.writestr(f'{idx // 1000:05d}/img{idx:08d}.png', buf.getvalue())
        zf.writestr('dataset.json', json.dumps({'labels': None}))
    return path


class FrechetMeter:
    """Frechet distance of generated uint8 images to the real digits, in the digit classifier's 64-d features."""

    def __init__(self, classifier):
        self.classifier = classifier
        real, _ = digits_classifier.digits_as_uint8(RESOLUTION)
        self.mu, self.sigma = self.stats(real)

    def stats(self, images):
        feats = digits_classifier.extract_features(self.classifier, images)
        return feats.mean(0), np.cov(feats, rowvar=False)

    def __call__(self, images) -> float:
        return float(frechet_distance(*self.stats(images), self.mu, self.sigma))


def sample(net, seeds, sampling=None, **options) -> torch.Tensor:
    return torch.cat([images for _, images in generate_images(net, seeds, batch_size=256, device='cpu',
                                                              sampling=sampling, **options)])


class OneStepRegressionLoss:
    """Claim 3's baseline: G(z) = D(sigma z; sigma) regressed (L2) onto the teacher's sample from the same z."""

    def __init__(self, pairs: str = '', sigma: float = 80.0):
        data = persistence.safe_torch_load(pairs)
        self.z, self.x = data['z'], data['x']
        self.sigma = float(sigma)
        self.process = OneStepProcess(self.sigma)

    def __call__(self, net, batch, augment_pipe=None):
        n = batch.images.shape[0]
        u = batch.random.rand() if batch.random is not None else torch.rand(n)
        idx = (u * len(self.z)).long().clamp(max=len(self.z) - 1).cpu()
        z, x = self.z[idx].to(batch.images.device), self.x[idx].to(batch.images.device)
        return (net(z * self.sigma, torch.full([n], self.sigma, device=z.device)) - x).square()


def run_loop(run_dir, data, network_kwargs, loss_kwargs, *, kimg, batch, lr, seed, tick_kimg, resume_pkl=None,
             ema_kimg=0.5, lr_rampup_kimg=0.0, betas=(0.0, 0.99)):
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    tl.training_loop(run_dir=run_dir, dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data),
                     data_loader_kwargs=dict(num_workers=0), network_kwargs=network_kwargs, loss_kwargs=loss_kwargs,
                     optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=lr, betas=list(betas), eps=1e-8),
                     seed=seed, batch_size=batch, total_kimg=kimg, ema_halflife_kimg=ema_kimg * 1000,
                     lr_rampup_kimg=lr_rampup_kimg, kimg_per_tick=tick_kimg, snapshot_ticks=1, state_dump_ticks=None,
                     resume_pkl=resume_pkl, device='cpu', progress=False, cudnn_benchmark=False)
    return time.time() - start


def snapshot_curve(run_dir, meter, seeds, batch):
    curve = []
    for name in sorted(os.listdir(run_dir)):
        if name.startswith('network-snapshot-'):
            snapshot = snapshots.read_snapshot(os.path.join(run_dir, name))
            nimg = int(name[17:23]) * 1000 or batch  # the first snapshot is written after one iteration
            curve.append((nimg, meter(sample(snapshot.net, seeds, snapshot.process.sampling))))
    return curve


@click.command()
@click.option('--outdir', required=True, type=str, help='Working folder: runs, snapshots, results')
@click.option('--pretrain-kimg', default=24.0, show_default=True, type=float,
              help='Training length of the EDM teacher the runs fine-tune')
@click.option('--gan-kimg', default=16.0, show_default=True, type=click.FloatRange(min=1),
              help='Fine-tuning length of each run')
@click.option('--batch', default=32, show_default=True, type=int, help='Fine-tuning batch')
@click.option('--lr', default=1e-4, show_default=True, type=float, help='Generator (and L2) learning rate')
@click.option('--d-lr', default=1e-4, show_default=True, type=float, help='Discriminator learning rate')
@click.option('--seeds', default='0,1,2', show_default=True, type=str,
              help='Training seeds: one run per seed and method')
@click.option('--eval-kimg', default=4.0, show_default=True, type=click.FloatRange(min=1),
              help='Distance measured every this many kimg (at least 1: snapshots are named by whole kimg)')
@click.option('--eval-num', default=1000, show_default=True, type=int, help='Images per distance')
@click.option('--pairs', 'num_pairs', default=2048, show_default=True, type=int, help='Teacher pairs for L2')
@click.option('--threads', default=1, show_default=True, type=int, help='CPU threads')
def main(outdir, pretrain_kimg, gan_kimg, batch, lr, d_lr, seeds, eval_kimg, eval_num, num_pairs, threads):
    torch.set_num_threads(threads)
    os.makedirs(outdir, exist_ok=True)
    seeds = [int(s) for s in seeds.split(',')]
    eval_seeds = list(range(eval_num))
    data = write_digits_zip(os.path.join(outdir, 'digits16.zip'))
    results = dict(command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d"),
                   config=dict(pretrain_kimg=pretrain_kimg, gan_kimg=gan_kimg, batch=batch, lr=lr, d_lr=d_lr,
                               seeds=seeds, threads=threads, eval_num=eval_num, num_pairs=num_pairs,
                               teacher=TEACHER))

    classifier, info = digits_classifier.train_classifier(seed=0, epochs=30)
    meter = FrechetMeter(classifier)
    real, _ = digits_classifier.digits_as_uint8(RESOLUTION)
    halves = np.random.RandomState(0).permutation(len(real))
    results['real_halves'] = float(frechet_distance(*meter.stats(real[halves[:898]]), *meter.stats(real[halves[898:]])))
    results['classifier'] = info
    print(f"classifier test accuracy {info['test_acc']:.3f}; real half vs half: {results['real_halves']:.2f}")

    # The teacher: EDM's loss and defaults as the quick start trains it.
    pre_dir = os.path.join(outdir, 'pretrain')
    pretrained = os.path.join(pre_dir, 'teacher.pkl')
    if not os.path.isfile(pretrained):
        seconds = run_loop(pre_dir, data, TEACHER, dict(class_name='losses.denoising.EDMLoss'), kimg=pretrain_kimg,
                           batch=64, lr=2e-3, seed=0, tick_kimg=pretrain_kimg, ema_kimg=0.005, lr_rampup_kimg=1,
                           betas=(0.9, 0.999))
        last = sorted(n for n in os.listdir(pre_dir) if n.startswith('network-snapshot-'))[-1]
        os.replace(os.path.join(pre_dir, last), pretrained)
        results['pretrain_sec_per_kimg'] = seconds / pretrain_kimg
    teacher = snapshots.read_snapshot(pretrained).net
    results['teacher_35nfe'] = meter(sample(teacher, eval_seeds))
    one_step = OneStepProcess(80.0).sampling
    results['teacher_one_step'] = meter(sample(teacher, eval_seeds, one_step))
    print(f"teacher: Heun 18 steps (35 NFE) {results['teacher_35nfe']:.2f}; one step D(80 z; 80) "
          f"{results['teacher_one_step']:.2f}")

    # Claim 3's targets: the teacher's 35-NFE sample for each of num_pairs noises.
    pairs = os.path.join(outdir, 'teacher-pairs.pt')
    if not os.path.isfile(pairs):
        z = torch.randn([num_pairs, 1, RESOLUTION, RESOLUTION], generator=torch.Generator().manual_seed(123))
        from samplers import make_grid
        from samplers import sample as solve
        grid = make_grid('edm', 18, sigma_range=(float(teacher.sigma_min), float(teacher.sigma_max)),
                         round_sigma=teacher.round_sigma, end='zero')
        with torch.no_grad():
            x = torch.cat([solve(teacher, z[i:i + 512], grid, solver='heun').float() for i in range(0, len(z), 512)])
        torch.save(dict(z=z, x=x), pairs)

    network_kwargs = dict(TEACHER, class_name='training.preconditioning.GDDPrecond')
    gan = dict(class_name='losses.gdd.GDDLoss', discriminator='sn_cnn', disc_channels=16, d_lr=d_lr)
    runs = {f'{kind}-seed{seed}': (gan if kind != 'l2' else
                                   dict(class_name='bench_gdd.OneStepRegressionLoss', pairs=pairs),
                                   dict(freeze=1) if kind == 'gdd-i' else {}, seed)
            for seed in seeds for kind in ('gdd', 'gdd-i', 'l2') if kind != 'l2' or seed == seeds[0]}
    results['runs'] = {}
    for name, (loss, extra, seed) in runs.items():
        run_dir = os.path.join(outdir, name)
        seconds = run_loop(run_dir, data, network_kwargs, dict(loss, **extra), kimg=gan_kimg, batch=batch, lr=lr,
                           seed=seed, tick_kimg=eval_kimg, resume_pkl=pretrained)
        curve = snapshot_curve(run_dir, meter, eval_seeds, batch)
        results['runs'][name] = dict(curve=curve, sec_per_kimg=seconds / gan_kimg)
        print(f"{name}: " + ', '.join(f'{n / 1000:g}k {d:.2f}' for n, d in curve) + f"  ({seconds / gan_kimg:.1f} "
              f"s/kimg)")
        with open(os.path.join(outdir, 'results.json'), 'w') as f:
            json.dump(results, f, indent=1)

    final = {name: run['curve'][-1][1] for name, run in results['runs'].items()}
    for kind in ('gdd', 'gdd-i'):
        values = [v for k, v in final.items() if k.startswith(kind + '-seed')]
        print(f'{kind}: final one-step distance {np.mean(values):.2f} +- {np.std(values):.2f} over {len(values)} seeds')
    print(f"l2 regression (same budget): {[v for k, v in final.items() if k.startswith('l2')]}")
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
