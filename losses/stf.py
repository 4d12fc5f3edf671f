"""Stable Target Field (Xu, Tong, Jaakkola, ICLR 2023): a lower-variance regression target for denoising losses.

Only the target changes. Instead of the clean image y, the denoiser regresses

    T(x, sigma) = sum_k w_k r_k,   w = softmax_k(-||x - r_k||^2 / (2 sigma^2)),

the posterior mean of the clean image given x under a reference set {r_k} that contains y itself (with its own
augmentation) and R - b other training images (b = the micro-batch on this rank). x = y + sigma * n is exactly
the network input and sigma the per-sample noise level. Because the own sample is in the set and the others are
independent draws of the data, E[T | x] = E[y | x] = D*(x) for any R (T is a Rao-Blackwellisation of y), so the
minimiser is unchanged while the target variance drops, most at large sigma (down to tr Cov(data) / R).

`STFLoss` wraps a denoising loss (EDM, VP or VE; anything with the `DenoisingLoss` hooks) and keeps its sigma
sampler, weight, augmentation and noise (AOT's paired noise runs under it, but the weights above are the posterior for
noise drawn independently of the image, so under AOT's pairing T estimates the unpaired posterior mean, not AOT's
paired one: the network learns STF's denoiser at AOT's inputs; AOTLoss.check_data says so). Its batch source
(`ReferenceSource`)
adds R raw images per rank and iteration from an independent shuffled stream over the training set to every
round; the loss augments the R - b it uses like training images and prepends the micro-batch's own augmented rows.

Conditional training: with `mask_classes` (default) a sample's references are restricted to its own class
(argmax of the one-hot label), so T estimates the class-conditional posterior mean the network is trained for. The
reference repository (Newbeeer/stf) ignores labels, i.e. mixes classes: `mask_classes=False` reproduces that.

Numerics: the B x R logits use ||x - r||^2 = ||x||^2 - 2 x.r + ||r||^2, where the row constant ||x||^2 cancels in
the softmax; they are computed in float64 with autocast off (a B x R x D tensor is never formed). float64 keeps the
logits exact to ~1e-8 nats even at sigma = 0.002, where float32 expansion errors reach tens of nats.

The class stays persistent only so that snapshots written when losses were pickled still import.
"""

import dataclasses

import torch

import dnnlib
from losses.denoising import report_loss_by_sigma
from losses.wrapper import LossWrapper
from processes import EDMProcess
from torch_utils import persistence
from torch_utils.misc import stream_seed

__all__ = ['class_indices', 'stf_logits', 'stf_weights', 'stf_targets', 'STFLoss', 'ReferenceSource',
           'reference_stream_seed', 'stf_loss_kwargs']


def class_indices(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Class index per row (argmax of one-hot labels [N, L]); None when there are no labels (L = 0)."""
    if labels is None or labels.ndim != 2 or labels.shape[1] == 0:
        return None
    return labels.argmax(dim=1)


def stf_logits(x, sigma, references, sample_classes=None, reference_classes=None) -> torch.Tensor:
    """Float64 logits [B, R] of the STF weights, up to a per-row constant: (x.r - ||r||^2 / 2) / sigma^2.

    x: [B, ...] noisy images; sigma: scalar, [B] or [B, 1, 1, 1]; references: [R, ...]. With both class tensors
    given, logits of references of another class are -inf (every row must keep at least one reference: its own).
    """
    num_samples, num_refs = x.shape[0], references.shape[0]
    with torch.autocast(device_type=x.device.type, enabled=False):
        x64 = x.reshape(num_samples, -1).to(torch.float64)
        refs64 = references.reshape(num_refs, -1).to(torch.float64)
        sigma64 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)  # exact for floats
        # -||x - r||^2 / 2 = x.r - ||r||^2 / 2 - ||x||^2 / 2; the last term is the same for a whole row.
        logits = (x64 @ refs64.T - 0.5 * refs64.square().sum(dim=1)) / sigma64.square()
    if sample_classes is not None and reference_classes is not None:
        other_class = sample_classes.reshape(-1, 1) != reference_classes.reshape(1, -1)
        logits = logits.masked_fill(other_class, float('-inf'))
    return logits


def stf_weights(x, sigma, references, sample_classes=None, reference_classes=None) -> torch.Tensor:
    """Float64 weights [B, R] = softmax_k(-||x_b - r_k||^2 / (2 sigma_b^2)) (max-subtracted by torch.softmax)."""
    return torch.softmax(stf_logits(x, sigma, references, sample_classes, reference_classes), dim=1)


@torch.no_grad()
def stf_targets(x, sigma, references, sample_classes=None, reference_classes=None) -> torch.Tensor:
    """STF targets T_b = sum_k w_bk r_k, shaped like x, in the references' dtype (computed in float64)."""
    weights = stf_weights(x, sigma, references, sample_classes, reference_classes)
    with torch.autocast(device_type=x.device.type, enabled=False):
        targets = weights @ references.reshape(references.shape[0], -1).to(torch.float64)
    return targets.to(references.dtype).reshape(x.shape)


def reference_stream_seed(seed: int) -> int:
    """Seed of the reference stream's InfiniteSampler (RandomState takes 32 bits); distinct from the run's seed."""
    return stream_seed(seed, 0x5EF) & 0xFFFFFFFF


class ReferenceSource:
    """STF's data: the inner source's rounds, each given the same R raw reference images (and labels) per rank and
    iteration, read from an independent shuffled stream over the training set (InfiniteSampler seeded by
    `reference_stream_seed`), so that pools and resumes never interleave with it. State: 'reference_position', the
    global number of reference images consumed."""

    def __init__(self, inner, data, num_refs: int):
        self.inner, self.data, self.num_refs = inner, data, int(num_refs)
        self.position = int(data.resume.get('reference_position', 0)) // data.world_size
        self._iterator = data.stream(seed=reference_stream_seed(data.seed), start_idx=self.position,
                                     batch_size=self.num_refs,
                                     resume_from=data.resume.get('reference_stream_resume_point'))

    def next_rounds(self):
        rounds = self.inner.next_rounds()
        references = self.data.to_batch(*next(self._iterator))
        self.position += self.num_refs
        return [dataclasses.replace(batch, references=references.images, reference_labels=references.labels)
                for batch in rounds]

    def state_dict(self) -> dict:
        position = self.position * self.data.world_size
        return {**self.inner.state_dict(), 'reference_position': position,
                'reference_stream_resume_point': self._iterator.resume_point(position)}


@persistence.persistent_class
class STFLoss(LossWrapper):
    """A denoising loss with STF targets over a reference set of `num_refs` images per rank (own rows included).

    base_kwargs: the wrapped loss, e.g. {'class_name': 'losses.denoising.EDMLoss', 'P_mean': -1.2} (default EDM).
    num_refs: R, the size of each sample's reference set including its micro-batch (Newbeeer/stf's per-GPU
        `--rbatch`; its published results use 1024). Must be >= the micro-batch b.
    mask_classes: restrict references to the sample's class in conditional training (False: Newbeeer/stf).
    """

    # Its target is the posterior mean for noise independent of the image (a wrapper that pairs noise with images
    # reads this: AOTLoss.check_data).
    target_assumes_independent_noise = True

    def __init__(self, base_kwargs=None, num_refs=1024, mask_classes=True):
        super().__init__(base_kwargs)
        self.num_refs = int(num_refs)
        self.mask_classes = bool(mask_classes)
        if self.num_refs < 1:
            raise ValueError(f'STFLoss: num_refs (--stf-refs) must be >= 1, got {num_refs}')
        self.require_hooks(self.base, ('noisy_batch',), '--stf', 'STF targets need a denoising loss', 'denoising-loss')
        process = self.base.process
        if not isinstance(process, EDMProcess):
            # Its target is the posterior mean of y under x = y + sigma n, regressed by D(x; sigma): a DenoisingLoss
            # over another process (an added one, e.g. a flow's velocity) would train a wrong network silently.
            raise TypeError(f"--stf: STF targets are posterior means under EDM's process x = y + sigma * n; the base "
                            f"loss {type(self.innermost()).__name__} trains the {getattr(process, 'name', process)!r} "
                            f"process")
        if isinstance(self.base, STFLoss):
            raise ValueError('STF is already applied to this loss')

    def batch_source(self, data, inner):
        return ReferenceSource(self.base.batch_source(data, inner), data, self.num_refs)

    def check_data(self, *, batch_gpu_total: int, batch_gpu: int, dataset_size: int) -> list[str]:
        warnings = self.base.check_data(batch_gpu_total=batch_gpu_total, batch_gpu=batch_gpu,
                                        dataset_size=dataset_size)
        if self.num_refs < batch_gpu:
            raise ValueError(f'--stf-refs: the reference set of {self.num_refs} images per GPU must hold the per-GPU '
                             f'micro-batch of {batch_gpu} images')
        if self.num_refs > dataset_size:
            warnings = [*warnings, f'--stf-refs: a reference set of {self.num_refs} images per GPU is larger than the '
                                   f'dataset ({dataset_size} images), so it holds repeated images']
        return warnings

    def reference_set(self, batch, y, augment_pipe=None):
        """(references [R, ...], their classes or None): the own rows y, then R - b augmented provided images."""
        num_own = y.shape[0]
        num_extra = self.num_refs - num_own
        if num_extra < 0:
            raise ValueError(f'STFLoss: the reference set (num_refs = --stf-refs = {self.num_refs}) must hold the '
                             f'whole micro-batch of {num_own} images; raise --stf-refs or lower --batch-gpu')
        if num_extra == 0:
            references = y
        else:
            provided = getattr(batch, 'references', None)
            if provided is None or provided.shape[0] < num_extra:
                have = 'none' if provided is None else f'{provided.shape[0]}'
                raise ValueError(f'STFLoss needs {num_extra} reference images in batch.references, got {have}; its '
                                 f'batch source (ReferenceSource) provides them')
            extra = provided[:num_extra]
            if augment_pipe is not None:
                extra, _ = augment_pipe(extra)  # each reference gets its own augmentation, like a training image
            references = torch.cat([y, extra.to(y.dtype)])
        classes = None
        if self.mask_classes:
            own_classes = class_indices(batch.labels)
            extra_labels = getattr(batch, 'reference_labels', None)
            if own_classes is not None:
                if extra_labels is None and num_extra > 0:
                    raise ValueError('STFLoss: class masking needs batch.reference_labels for the references')
                extra_classes = class_indices(extra_labels[:num_extra]) if num_extra > 0 else own_classes[:0]
                classes = torch.cat([own_classes, extra_classes.to(own_classes.device)])
        return references, classes

    def __call__(self, net, batch, augment_pipe=None):
        # The wrapped loss's draws in its order (sigma, augmentation, noise), with the STF target in place of y.
        sigma, weight, y, augment_labels, x = self.base.noisy_batch(batch, augment_pipe)
        references, reference_classes = self.reference_set(batch, y, augment_pipe)
        sample_classes = reference_classes[:y.shape[0]] if reference_classes is not None else None
        target = stf_targets(x.detach(), sigma, references.detach(), sample_classes, reference_classes)
        D_x = net(x, sigma, batch.labels, augment_labels=augment_labels)
        loss = weight * ((D_x - target) ** 2)
        report_loss_by_sigma(loss, sigma)
        return loss


def stf_loss_kwargs(base_kwargs: dict, num_refs: int = 1024, mask_classes: bool = True) -> dnnlib.EasyDict:
    """Config entry wrapping a loss config (e.g. losses.loss_kwargs('edm')) with STF targets."""
    base = dict(base_kwargs)
    if base.get('class_name', '').endswith('.STFLoss'):
        raise ValueError('STF is already applied to this loss')
    return dnnlib.EasyDict(class_name='losses.stf.STFLoss', base_kwargs=base, num_refs=int(num_refs),
                           mask_classes=bool(mask_classes))

