"""Helpers for the training tests, and a worker that runs the training loop under torchrun.

    python -m torch.distributed.run --nproc_per_node=2 tests/train_worker.py CONFIG.json

runs training_loop(**json.load(CONFIG.json)) on CPU processes (gloo).
"""

import io
import json
import os
import sys
import zipfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_tree_equal(a, b, path='state'):
    """torch.equal on every tensor of two nested containers, == on everything else."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_tree_equal(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f'{path}[{i}]')
    else:
        assert a == b, path


def write_zip_dataset(path: str, images: np.ndarray, labels=None) -> str:
    """EDM's dataset format: uncompressed PNGs {idx//1000:05d}/img{idx:08d}.png + dataset.json; images uint8 NHW[C]."""
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as zf:
        names = []
        for idx, image in enumerate(images):
            name = f'{idx // 1000:05d}/img{idx:08d}.png'
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format='png', compress_level=0)
            zf.writestr(name, buf.getvalue())
            names.append(name)
        meta = {'labels': None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]}
        zf.writestr('dataset.json', json.dumps(meta))
    return path


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 (0..16 -> 0..255) and their labels."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def random_images(num: int, resolution: int = 8, seed: int = 0) -> np.ndarray:
    """Smooth-ish random grayscale images (uint8), so that denoising has something to learn."""
    rnd = np.random.RandomState(seed)
    base = rnd.rand(num, 1, 1) * 255
    grad = np.linspace(-60, 60, resolution)[None, None, :] * rnd.choice([-1, 1], size=(num, 1, 1))
    noise = rnd.randn(num, resolution, resolution) * 20
    return np.clip(base + grad + noise, 0, 255).astype(np.uint8)


def tiny_network_kwargs(precond: str = 'edm', dropout: float = 0.0, augment_dim: int = 0) -> dict:
    """A ~50k-parameter DDPM++ (SongUNet) for 8x8 images."""
    classes = dict(vp='VPPrecond', ve='VEPrecond', edm='EDMPrecond')
    kwargs = dict(class_name=f'training.preconditioning.{classes[precond]}', model_type='SongUNet',
                  embedding_type='positional', encoder_type='standard', decoder_type='standard',
                  channel_mult_noise=1, resample_filter=[1, 1], model_channels=8, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], dropout=dropout, use_fp16=False)
    if augment_dim:
        kwargs['augment_dim'] = augment_dim
    return kwargs


def loop_kwargs(run_dir: str, data: str, **overrides) -> dict:
    """training_loop kwargs for a tiny CPU run; EDM's defaults except where a short run needs otherwise."""
    kwargs = dict(
        run_dir=run_dir,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=False,
                            xflip=False, cache=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=tiny_network_kwargs(),
        loss_kwargs=dict(class_name='losses.denoising.EDMLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8),
        augment_kwargs=None,
        seed=123, batch_size=8, total_kimg=0.024, ema_halflife_kimg=0.5, lr_rampup_kimg=0,
        kimg_per_tick=1, snapshot_ticks=None, state_dump_ticks=1, cudnn_benchmark=False, device='cpu',
        progress=False,
    )
    kwargs.update(overrides)
    return kwargs


def main(config_path: str) -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch

    from torch_utils import distributed as dist
    from training.training_loop import training_loop

    torch.set_num_threads(1)
    with open(config_path) as f:
        config = json.load(f)
    dist.init(device='cpu')
    try:
        training_loop(**config)
    finally:
        dist.shutdown()


if __name__ == '__main__':
    main(sys.argv[1])


class TwoPhaseLoss:
    """Stand-in multi-phase loss (GDD-like shape): EDM's loss on 'net' every iteration, plus an extra network
    'aux' (one scalar) trained by a lazy phase at iterations 1, 3, 5, ...
    (SGD lr 0.25 on (w - 1)^2: w goes 0 -> 0.5 -> 0.75). teacher=True adds a frozen network the loss put in eval
    mode (a distillation teacher); the aux phase records its mode in `teacher_modes`."""

    teacher_modes = []
    after_steps = []  # (aux weight, cur_nimg, grad enabled) at each after_step call

    def __init__(self, aux_lr_scale=None, teacher=False):
        from losses.denoising import EDMLoss
        self.edm = EDMLoss()
        self.aux_lr_scale = aux_lr_scale
        self.teacher = teacher

    def extra_networks(self, net):
        import torch
        aux = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(aux.weight)
        return dict(aux=aux, teacher=torch.nn.Dropout(0.5).eval()) if self.teacher else dict(aux=aux)

    def phases(self, networks, optimizer_kwargs):
        import torch

        from losses import Phase, default_phases
        main = default_phases(self.edm, networks, optimizer_kwargs)[0]

        def aux_loss(nets, batch, augment_pipe):
            assert not any(p.requires_grad for p in nets['net'].parameters())
            if 'teacher' in nets:
                TwoPhaseLoss.teacher_modes.append(nets['teacher'].training)
            ones = torch.ones(batch.images.shape[0], 1, device=batch.images.device)
            return (nets['aux'](ones) - 1) ** 2

        aux_opt = torch.optim.SGD(networks["aux"].parameters(), lr=0.25)
        schedule = None if self.aux_lr_scale is None else (lambda cur_nimg: self.aux_lr_scale)
        def follow(nets, cur_nimg):  # an EMA-target-like update after the aux step
            TwoPhaseLoss.after_steps.append((nets['aux'].weight.item(), cur_nimg, torch.is_grad_enabled()))

        return [main, Phase(name='aux', network='aux', optimizer=aux_opt, loss_fn=aux_loss, interval=2, offset=1,
                            stat_name='Loss/aux', lr_schedule=schedule, after_step=follow)]


class CountingSource:
    """A batch source that wraps the loop's stream, marks every batch with its iteration number and keeps that
    count as resumable state ('toy_position')."""

    def __init__(self, inner, data):
        self.inner = inner
        self.count = int(data.resume.get('toy_position', 0))
        self.seen = []

    def next_rounds(self):
        import dataclasses

        import torch
        rounds = self.inner.next_rounds()
        self.seen.append(self.count)
        self.count += 1
        return [dataclasses.replace(b, noise=torch.full_like(b.images, 0.5)) for b in rounds]

    def state_dict(self):
        return {**self.inner.state_dict(), 'toy_position': self.count}


class OwnSourceLoss:
    """EDM's loss fed by its own batch source (constant noise 0.5 from CountingSource); records the sources built."""

    built = []

    def __init__(self):
        from losses.denoising import EDMLoss
        self.edm = EDMLoss()
        self.process = self.edm.process

    def batch_source(self, data, inner):
        source = CountingSource(inner, data)
        OwnSourceLoss.built.append(source)
        return source

    def check_data(self, **layout):
        return []

    def __call__(self, net, batch, augment_pipe=None):
        assert bool((batch.noise == 0.5).all())
        return self.edm(net, batch, augment_pipe)


def source_chain(loss_fn, num_images: int = 32, batch_gpu: int = 4, num_rounds: int = 2) -> list:
    """Build `loss_fn`'s batch source around EDM's stream over a tiny in-memory dataset and describe it from the
    outside in: [(class name, its size: num_refs / pool_size / None)]."""
    import torch

    from training.batch_sources import DataContext, StreamSource

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return num_images

        def __getitem__(self, idx):
            return torch.full((1, 4, 4), idx % 256, dtype=torch.uint8).numpy(), torch.eye(2)[idx % 2].numpy()

    data = DataContext(dataset=Images(), rank=0, world_size=1, seed=0, batch_gpu=batch_gpu, num_rounds=num_rounds,
                       device=torch.device('cpu'), loader_kwargs={})
    source = loss_fn.batch_source(data, StreamSource(data))
    chain = []
    while source is not None:
        chain.append((type(source).__name__, getattr(source, 'num_refs', getattr(source, 'pool_size', None))))
        source = getattr(source, 'inner', None)
    return chain
