"""GDD and GDD-I: a one-step generator fine-tuned from a diffusion model with a purely distributional (GAN) loss.

Zheng & Yang 2024, "Diffusion Models Are Innate One-Step Generators" (arXiv 2405.20750; reference code Zyriix/GDD,
later renamed D2O). The generator is the pretrained denoiser evaluated once at the highest noise level,

    G(z, c) = D(sigma z; sigma, c),  sigma = 80,  z ~ N(0, I),

initialised from a pretrained pickle's EMA (`train.py --init=PKL`, dropout 0, EDMPrecond or GDDPrecond) and trained
against real images with a discriminator, in three phases per iteration (the training loop's phases, each with the
networks' own optimizer; no learning-rate ramp):

    G   non-saturating logistic loss on D(G(z)):  softplus(-D(G(z)))              (hinge: -D(G(z)))
    D   fresh z, G without gradients:              softplus(D(G(z))) + softplus(-D(x))   (hinge: relu(1 + .) + ...)
    R1  lazy, on reals at iterations 16, 32, ...:  gain 16 * (gamma / 2) * |grad_x sum D(x)|^2, through the
        discriminator's frozen feature network to the pixels

A discriminator returns a list of logit tensors [N, P_k] (training/discriminators.py); a sample's loss is the sum
over the list of the mean over its P_k logits. The reference's discriminator returns one row per sample and its loss
sums their means, so its G and D losses are sums over each GPU's samples while R1 is a mean: `batch_sum=True` (the
default) reproduces that scale, so the balance between the D loss and R1 (and Adam's epsilon) is the reference's for
the same per-GPU batch; `batch_sum=False` takes batch means (a run then does not depend on the number of GPUs; to keep
the reference's balance divide r1_gamma by its per-GPU batch, 64 at batch 256 on 4 GPUs).

Optimisers (GDD's training_loop.py): Adam betas (0, 0.99), eps 1e-8 for both networks; G at --lr; D at d_lr with
StyleGAN2's lazy-regularisation correction c = 16 / 17 (lr * c, beta2 = 0.99^c), one Adam shared by D and R1.
GDD-I (`freeze=1`): the convolutions conv0/conv1 of every UNet block and the attention output projections `proj` are
left out of G's optimizer (84.4% of CIFAR-10's NCSN++, 78.8% of ImageNet's ADM), exactly the reference's rule
(`frozen_parameter`); freeze=2 also freezes qkv, freeze=3 also the skip convs. Frozen tensors get no gradient and
stay bit-identical. EMA: the loop's, half-life min(--ema, 5% of the images seen), from the pretrained weights.

Snapshots record `OneStepProcess(sigma)`, so generate.py and fid.py --network sample them in one step by default.
"""

import os
import re

import torch
import torch.nn.functional as F

from processes.one_step import OneStepProcess
from torch_utils import distributed as dist
from torch_utils import training_stats
from training import discriminators

from .base import Phase, constant_lr

# GDD's --freeze levels: a generator parameter leaves the optimizer when its name contains one of _BLOCK_WORDS and
# one of these (Zyriix/GDD training_loop.py; the loss re-freezes with a narrower rule that the optimizer rule
# overrides: up/down convs get gradients there but are never stepped).
FREEZE_LEVELS = {0: (), 1: ('conv', 'proj'), 2: ('conv', 'proj', 'qkv'), 3: ('conv', 'proj', 'qkv', 'skip')}
_BLOCK_WORDS = ('block', 'up', 'down', 'in')
LOSS_TYPES = ('ns', 'hinge')
ADAM_BETAS = (0.0, 0.99)
ADAM_EPS = 1e-8


def frozen_parameter(name: str, level: int) -> bool:
    """Whether GDD-I at `level` keeps the generator parameter `name` (e.g. 'model.enc.16x16_block0.conv0.weight') out
    of the optimizer. Plain substring tests, as the reference: 'in' also matches 'in0', 'affine', ..., which is
    harmless since a conv/proj word is needed too (GroupNorms, affine, qkv, skip, the stem and output convs train)."""
    words = FREEZE_LEVELS[level]
    return any(w in name for w in _BLOCK_WORDS) and any(w in name for w in words)


def _parse_pairs(text: str, option: str) -> dict:
    """'a=PATH,b=PATH' -> {'a': 'PATH', 'b': 'PATH'}. A comma starts a new pair only before NAME=, so a path may hold
    commas ('vgg16_bn=/w/run,2/vgg.pth': split at every comma, the error named '/w/run' as the missing file)."""
    pairs = {}
    for item in filter(None, (t.strip(' ,') for t in re.split(r',(?=\s*[A-Za-z_][\w.-]*\s*=)', text))):
        key, sep, value = item.partition('=')
        if not sep or not key or not value:
            raise ValueError(f"--loss-opt {option}: expected NAME=PATH[,NAME=PATH...], got {item!r}")
        pairs[key.strip()] = value.strip()
    return pairs


class GDDLoss:
    """GDD's three phases over the generator `net` and a discriminator `D` (extra network); see the module doc."""

    uses_loop_lr_ramp = False  # its phases keep a constant rate (losses.constant_lr): --lr-rampup does not apply
    # --augment augments what the discriminator sees; the generator gets no augmentation labels (train.py builds the
    # network without that input: a layer nothing feeds stops DDP).
    feeds_augment_labels = False
    # It distils a pretrained denoiser into a one-step generator: train.py warns when no --init (or --transfer,
    # --resume) gives it one.
    distils_pretrained = True
    # Zyriix/GDD trains the generator without dropout and augments nothing (every released command); train.py warns
    # when a run leaves these at its EDM defaults (0.13, 0.12).
    reference_options = {'dropout': 0, 'augment': 0}

    # The --precond values it trains, its default first: GDD's shifted EDM preconditioning, or EDM's (equivalent to
    # about 5e-5 at sigma = 80). train.py --init swaps an EDM pickle's wrapper for the first unless --precond is given.
    preconditionings = ('gdd', 'edm')

    def __init__(self,
                 sigma: float = 80.0,               # The generator's noise level: G(z) = D(sigma z; sigma).
                 loss_type: str = 'ns',             # 'ns' (non-saturating logistic) or 'hinge'.
                 r1_gamma: float = 1e-4,            # R1 weight (0 = no R1 phase).
                 r1_interval: int = 16,             # Lazy R1: every this many iterations, with this gain.
                 d_lr: float = 1e-4,                # Discriminator learning rate (the generator's is --lr).
                 freeze: int = 0,                   # GDD-I level: 0 = GDD, 1 = conv/proj frozen, 2 + qkv, 3 + skip.
                 discriminator: str = 'projected',  # training.discriminators.DISCRIMINATORS name.
                 backbones: str = 'vgg16_bn,tf_efficientnet_lite0',  # projected: its frozen feature networks.
                 disc_weights: str = '',            # projected: NAME=PATH[,...] local backbone weights.
                 disc_embedding: str = '',          # projected: class-embedding pickle path/URL, or 'random'.
                 interp224: bool = True,            # projected: resize inputs to 224 x 224.
                 disc_channels: int = 64,           # sn_cnn: channels of its first layer.
                 batch_sum: bool = True,            # G/D losses summed over each rank's batch (the reference).
                 ):
        if not sigma > 0:
            raise ValueError(f'--loss-opt sigma: must be positive, got {sigma}')
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-opt loss_type: {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
        if freeze not in FREEZE_LEVELS:
            raise ValueError(f'--loss-opt freeze: {freeze}; expected one of {", ".join(map(str, FREEZE_LEVELS))}')
        if discriminator not in discriminators.DISCRIMINATORS:
            raise ValueError(f"--loss-opt discriminator: {discriminator!r}; expected one of "
                             f"{', '.join(discriminators.DISCRIMINATORS)}")
        if r1_gamma < 0 or r1_interval < 1 or not d_lr > 0 or disc_channels < 1:
            raise ValueError(f'--loss-opt: r1_gamma >= 0, r1_interval >= 1, d_lr > 0 and disc_channels >= 1 '
                             f'(got {r1_gamma}, {r1_interval}, {d_lr}, {disc_channels})')
        names = [b.strip() for b in backbones.split(',') if b.strip()]
        unknown = [b for b in names if b not in discriminators.BACKBONES]
        if discriminator == 'projected' and (unknown or not names):
            raise ValueError(f"--loss-opt backbones: unknown {unknown or backbones!r}; known: "
                             f"{', '.join(discriminators.BACKBONES)}")
        self.sigma = float(sigma)
        self.loss_type = loss_type
        self.r1_gamma = float(r1_gamma)
        self.r1_interval = int(r1_interval)
        self.d_lr = float(d_lr)
        self.freeze = int(freeze)
        self.discriminator = discriminator
        self.backbones = names
        self.disc_weights = _parse_pairs(disc_weights, 'disc_weights')
        self.disc_embedding = disc_embedding or None
        self.interp224 = bool(interp224)
        self.disc_channels = int(disc_channels)
        self.batch_sum = bool(batch_sum)
        self.process = OneStepProcess(self.sigma)
        self._rank_batch = None  # samples per rank and iteration (check_data), for batch_sum

    # -----------------------------------------------------------------------------------------------------------------
    # What the loop asks of a loss.

    def check_data(self, *, batch_gpu_total: int, batch_gpu: int, dataset_size: int) -> list[str]:
        """Refuses backbones whose package is missing; records the per-rank batch, by which batch_sum scales the G
        and D losses."""
        if self.discriminator == 'projected':
            # Local files named by the options: checked here (train.py --dry-run included), not when the loop
            # builds the discriminator after the run directory exists.
            for name, path in self.disc_weights.items():
                if name not in self.backbones:
                    raise ValueError(f'--loss-opt disc_weights: {name!r} is not one of the backbones '
                                     f'({", ".join(self.backbones)})')
                if '://' not in path and not os.path.isfile(os.path.expanduser(path)):
                    raise ValueError(f'--loss-opt disc_weights: {name}={path}: no such file')
            embedding = self.disc_embedding
            if embedding not in (None, 'random') and '://' not in embedding and \
                    not os.path.isfile(os.path.expanduser(embedding)):
                raise ValueError(f'--loss-opt disc_embedding: {embedding}: no such file')
            try:
                discriminators.check_packages(self.backbones)
            except discriminators.DiscriminatorUnavailableError as err:
                raise ValueError(f'--loss-opt backbones: {err}') from None
        self._rank_batch = int(batch_gpu_total)
        return []

    def check_network(self, *, img_resolution: int, img_channels: int, label_dim: int) -> list[str]:
        """The projected discriminator's feature networks read RGB (grey is repeated): refused here, before the run
        folder, rather than when the loop builds it."""
        if self.discriminator == 'projected' and img_channels not in discriminators.PROJECTED_CHANNELS:
            raise ValueError(f'--loss-opt discriminator=projected reads RGB or grey images; --data has {img_channels} '
                             f'channels (drop the alpha channel, or use discriminator=sn_cnn)')
        return []

    def discriminator_options(self) -> dict:
        if self.discriminator == 'projected':
            return dict(backbones=self.backbones, weights=self.disc_weights, class_embedding=self.disc_embedding,
                        interp224=self.interp224)
        return dict(channels=self.disc_channels)

    def extra_networks(self, net) -> dict:
        D = discriminators.build_discriminator(self.discriminator, img_resolution=net.img_resolution,
                                               img_channels=net.img_channels, label_dim=net.label_dim,
                                               **self.discriminator_options())
        return {'D': D}

    def generator_parameters(self, net) -> list:
        """G's parameters that its optimizer steps (all but GDD-I's frozen ones)."""
        return [p for name, p in net.named_parameters() if not frozen_parameter(name, self.freeze)]

    def phases(self, networks: dict, optimizer_kwargs: dict) -> list[Phase]:
        net, D = networks['net'], networks['D']
        g_params = self.generator_parameters(net)
        if self.freeze:
            total, trained = sum(p.numel() for p in net.parameters()), sum(p.numel() for p in g_params)
            dist.print0(f'GDD-I (freeze={self.freeze}): {total - trained:,} of {total:,} generator parameters frozen '
                        f'({100 * (total - trained) / total:.1f}%)')
        g_opt = torch.optim.Adam(g_params, lr=optimizer_kwargs['lr'], betas=ADAM_BETAS, eps=ADAM_EPS)
        # StyleGAN2's lazy regularisation: D's Adam also takes the R1 steps, so its rate and beta2 are rescaled.
        c = self.r1_interval / (self.r1_interval + 1) if self.r1_gamma > 0 else 1.0
        d_opt = torch.optim.Adam(D.trainable_parameters(), lr=self.d_lr * c, betas=(ADAM_BETAS[0], ADAM_BETAS[1] ** c),
                                 eps=ADAM_EPS)
        phases = [Phase(name='G', network='net', optimizer=g_opt, loss_fn=self.generator_loss, stat_name='Loss/G',
                        lr_schedule=constant_lr),
                  Phase(name='D', network='D', optimizer=d_opt, loss_fn=self.discriminator_loss, stat_name='Loss/D',
                        lr_schedule=constant_lr, grad_sync='allreduce')]
        if self.r1_gamma > 0:
            # The penalty differentiates D's input gradient: no torch.compile for D (no double backward there).
            phases.append(Phase(name='R1', network='D', optimizer=d_opt, loss_fn=self.r1_loss,
                                interval=self.r1_interval, offset=self.r1_interval, stat_name='Loss/R1',
                                lr_schedule=constant_lr, grad_sync='allreduce', compilable=False))
        return phases

    # -----------------------------------------------------------------------------------------------------------------
    # The phases' losses: per-sample tensors, which the loop sums and divides by the rank's batch.

    def generate(self, net, z, labels):
        """G(z, c) = D(sigma z; sigma, c)."""
        sigma = torch.full([z.shape[0]], self.sigma, dtype=torch.float32, device=z.device)
        return net(z * self.sigma, sigma, labels)

    def _noise(self, batch):
        if batch.random is not None:  # per image (--rng=image): the same z whatever the batch layout
            return batch.random.randn(*batch.images.shape[1:]).to(batch.images.device)
        return torch.randn_like(batch.images)

    @staticmethod
    def _labels(net, batch):
        # Under several processes the loop hands the loss DistributedDataParallel wrappers, which do not forward
        # attributes: read label_dim from the wrapped network.
        return batch.labels if getattr(net, 'module', net).label_dim else None

    @staticmethod
    def _discriminate(D, images, labels, augment_pipe):
        if augment_pipe is not None:  # The reference's run_D: reals and fakes alike (no released config uses it).
            images, _ = augment_pipe(images)
        return D(images, labels)

    def _scale(self, batch) -> float:
        return float(self._rank_batch or batch.images.shape[0]) if self.batch_sum else 1.0

    @staticmethod
    def per_sample(logits: list, fn) -> torch.Tensor:
        """Sum over the discriminator's logit tensors of the mean of fn(logits) over each tensor's logits."""
        return sum(fn(l.to(torch.float32)).mean(dim=1) for l in logits)

    def generator_loss(self, nets, batch, augment_pipe=None):
        net, D = nets['net'], nets['D']
        labels = self._labels(net, batch)
        fake = self.generate(net, self._noise(batch), labels)
        logits = self._discriminate(D, fake, labels, augment_pipe)
        training_stats.report('Loss/logits/fake', torch.cat([l.detach().flatten() for l in logits]))
        fn = (lambda l: F.softplus(-l)) if self.loss_type == 'ns' else (lambda l: -l)
        return self.per_sample(logits, fn) * self._scale(batch)

    def discriminator_loss(self, nets, batch, augment_pipe=None):
        net, D = nets['net'], nets['D']
        labels = self._labels(net, batch)
        with torch.no_grad():
            fake = self.generate(net, self._noise(batch), labels)
        fake_logits = self._discriminate(D, fake.detach(), labels, augment_pipe)
        real_logits = self._discriminate(D, batch.images, labels, augment_pipe)
        training_stats.report('Loss/logits/real', torch.cat([l.detach().flatten() for l in real_logits]))
        if self.loss_type == 'ns':
            fake_loss = self.per_sample(fake_logits, F.softplus)
            real_loss = self.per_sample(real_logits, lambda l: F.softplus(-l))
        else:
            fake_loss = self.per_sample(fake_logits, lambda l: F.relu(1 + l))
            real_loss = self.per_sample(real_logits, lambda l: F.relu(1 - l))
        return (fake_loss + real_loss) * self._scale(batch)

    def r1_loss(self, nets, batch, augment_pipe=None):
        net, D = nets['net'], nets['D']
        reals = batch.images.detach().requires_grad_(True)
        logits = D(reals, self._labels(net, batch))
        total = sum(l.sum() for l in logits)
        if batch.grad_scale is None:
            grad, = torch.autograd.grad(outputs=[total], inputs=[reals], create_graph=True)
        else:  # fp16: scaled as the outer loss is, so that the inner fp16 backward does not underflow
            grad, = torch.autograd.grad(outputs=[total * batch.grad_scale], inputs=[reals], create_graph=True)
            grad = grad.to(torch.float32) / batch.grad_scale
        penalty = grad.to(torch.float32).square().sum(dim=[1, 2, 3])
        training_stats.report('Loss/r1_penalty', penalty.detach())
        return penalty * (self.r1_gamma / 2 * self.r1_interval)
