"""Training DG's discriminator (Kim et al., ICML 2023; alsdudrla10/DG's train.py) on real images and the score
model's samples; the library behind train_dg.py.

What the reference does, and this does: real rows have target 1, generated rows 0; each epoch shuffles both sets
together and takes batches of 128 (the last incomplete one dropped); each row is perturbed at its own VP time t,
importance-sampled as the reference does (`VPTime.sample_time`: sigma(t) log-uniform on [sigma(1e-5), sigma(1)] =
[0.001, 152]), x = y + sigma(t) z in EDM's VE form (the discriminator maps it to the VP input alpha y + std z
itself); the frozen encoder's features go through the head; binary cross-entropy on the logit; Adam, lr 3e-4, weight
decay 1e-7. A DG pickle is written after every epoch (`discriminator-EEEEEE.pkl`) together with the training state,
so a run resumes at an epoch boundary and continues bit for bit (every random draw is a function of the seed, the
epoch and the position in it).

AOT pairing (`aot=N`, the AOT paper's "discriminator trained with AOT"): the epoch's stream is cut into pools of N
rows (real and generated mixed as they come), and each pool's perturbation noise is paired with its images exactly
as the AOT loss pairs a pool (under the torch seed `losses.aot.pool_seed(seed, 0, pool index)`, one unit noise per
image, permuted by `losses.aot.assign_noise`: the exact assignment minimising the summed Euclidean image-noise
distances, within each class when the rows are labelled); sigma stays independent per row.

Why not train.py's loop: that loop trains a diffusion network on one labelled image stream (EMA, augmentation,
network snapshots in EDM's format, noise-level sampling of the diffusion loss). DG trains a classifier on a frozen
encoder over two sets with a real/generated target per row, by epochs; forcing it through the loop would add
DG-specific branches there. This module reuses what fits: the dataset reader, AOT's pairing, the safe loaders and
the atomic writers.
"""

import dataclasses
import glob
import hashlib
import json
import math
import os
import time
import zipfile

import numpy as np
import torch

from dnnlib import util
from losses.aot import assign_noise, pool_seed
from samplers.dg.discriminator import (
    Discriminator,
    DiscriminatorError,
    VPTime,
    build_discriminator,
    load_adm_classifier,
    save_discriminator,
)
from samplers.dg.networks import GROUPS
from torch_utils import persistence, training_stats
from torch_utils.misc import stream_seed

STATE_FORMAT = "dg-training-state"
STATE_VERSION = 1
STATE_FILE = "training-state.pt"
STATS_FILE = "stats.jsonl"
OPTIONS_FILE = "training_options.json"
_EPOCH_TAG, _BATCH_TAG = 0xD6E, 0xD6B  # stream tags of the per-epoch shuffle and the per-batch draws
# Noise-level bins of the accuracy report: decades of sigma over the training range (0.001 ... 152).
SIGMA_BINS = (0.0, 0.01, 0.1, 1.0, 10.0, math.inf)


@dataclasses.dataclass
class ImageSet:
    """A whole image set in memory: uint8 images [N, C, H, W] and class indices [N] (None: unlabelled)."""

    images: torch.Tensor
    classes: torch.Tensor | None
    source: str


GENERATION_RECORD = "generation.json"  # what generate.py writes beside its images (samplers.generation)


def _generated_class(folder: str) -> int | None:
    """The class of every image in a generate.py output folder made with --class (its generation.json), or None
    when the folder has no record or was made with random classes."""
    path = os.path.join(folder, GENERATION_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            class_idx = json.load(f).get("class_idx")
    except (OSError, ValueError, AttributeError):
        return None
    return int(class_idx) if isinstance(class_idx, int) else None


def load_image_set(path: str, *, use_labels: bool, max_images: int | None = None, option: str = "--real",
                   resolution: int | None = None) -> ImageSet:
    """A dataset zip or folder (training.dataset.ImageFolderDataset: every image checked when opened), its first
    `max_images` images in name order (the reference takes the first num_data), with the class of each image when
    `use_labels`: from its dataset.json, or, for generated images, from generate.py's records: a folder made with
    `generate.py --class=K` holds class K, and a folder of such folders (one per class) holds them all."""
    from training.dataset import DatasetError, ImageFolderDataset

    def read(dataset, count_limit):
        count = len(dataset) if count_limit is None else min(len(dataset), int(count_limit))
        return torch.from_numpy(np.stack([dataset[i][0] for i in range(count)]))

    try:
        dataset = ImageFolderDataset(path, use_labels=use_labels, resolution=resolution)
        if not use_labels:
            return ImageSet(images=read(dataset, max_images), classes=None, source=str(path))
        if dataset.has_labels:
            images = read(dataset, max_images)
            if not dataset.has_onehot_labels:
                raise DatasetError(f"{path}: DG reads class indices as labels, not label vectors")
            classes = torch.as_tensor(np.array([dataset.get_details(i).raw_label for i in range(len(images))],
                                               dtype=np.int64))
            return ImageSet(images=images, classes=classes, source=str(path))
        # Generated images: one class per generate.py folder.
        single = _generated_class(path) if os.path.isdir(path) else None
        if single is not None:
            images = read(dataset, max_images)
            return ImageSet(images=images, classes=torch.full([len(images)], single, dtype=torch.int64),
                            source=str(path))
        folders = sorted(os.path.join(path, name) for name in os.listdir(path)
                         if os.path.isdir(os.path.join(path, name))) if os.path.isdir(path) else []
        labelled = [(folder, _generated_class(folder)) for folder in folders]
        how = f"one folder per class, made with generate.py --class=K --outdir={path}/K"
        if not any(cls is not None for _, cls in labelled):
            where = (f"a dataset.json, or for generated images {how}" if option == "--fake" else "labels in its "
                     "dataset.json (dataset_tool.py writes them from a labelled source)")
            raise DatasetError(f"{path}: no labels: a conditional discriminator, or a class-conditional encoder "
                               f"network, needs the class of every image: {where}")
        # Every image needs its class: a folder without one would drop its images silently (and with them, maybe
        # every generated image of a class).
        unlabelled = [os.path.basename(folder) for folder, cls in labelled if cls is None]
        if unlabelled:
            shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
            raise DatasetError(f"{path}: no class record ({GENERATION_RECORD} of a generate.py --class=K run) in the "
                               f"folder(s) {shown}, so their images have no class: make {how}, or move those "
                               f"folders out")
        class_sets = [(ImageFolderDataset(folder, resolution=resolution), cls) for folder, cls in labelled]
        outside = len(dataset) - sum(len(class_set) for class_set, _ in class_sets)
        if outside:
            raise DatasetError(f"{path}: {outside} images lie outside its class folders, so they have no class: "
                               f"make {how}")
        per_folder = None if max_images is None else -(-int(max_images) // len(labelled))
        parts = [(read(class_set, per_folder), cls) for class_set, cls in class_sets]
        images = torch.cat([images for images, _ in parts])[:max_images]
        classes = torch.cat([torch.full([len(images)], cls, dtype=torch.int64) for images, cls in parts])
        return ImageSet(images=images, classes=classes[:len(images)], source=str(path))
    except (DatasetError, OSError) as err:
        raise DiscriminatorError(f"{option}: {err}") from None


@dataclasses.dataclass
class DGTrainingOptions:
    """Everything that decides the trained discriminator (recorded in the training state and the DG pickles)."""

    real: str                       # dataset zip/folder of real images
    fake: str                       # dataset zip/folder of the score model's samples (generate.py's output)
    encoder: str = "network"        # 'network' (the score model's own) or 'adm' (guided-diffusion's classifier)
    network: str | None = None      # the EDM-format snapshot whose middle blocks are the features ('network')
    adm_classifier: str | None = None  # 32x32_classifier.pt ('adm')
    cond: bool = False              # class-conditional head (labels from both sets' dataset.json)
    epochs: int = 50                # the reference's default (its released checkpoints: 60 uncond, 250 cond)
    batch: int = 128
    lr: float = 3e-4
    weight_decay: float = 1e-7
    max_images: int | None = None   # per set (the reference's num_data, 50000)
    aot: int = 0                    # AOT pool size (0: unpaired noise, as the reference)
    width: int = 128                # head width (the reference's 128)
    depth: int = 2                  # residual blocks of the head (the reference's 2)
    head_channels: int = 64         # channels per attention head (the reference's 64)
    seed: int = 0
    t_min: float = 1e-5             # the reference's smallest training time

    def __post_init__(self):
        # Recorded absolute (a URL as given): a resume from another folder names the same files, and the same files
        # spelled otherwise ('./real.zip', 'fakes/') are the same.
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if value and "://" not in str(value):
                setattr(self, name, _absolute(value))

    def record(self) -> dict:
        return dataclasses.asdict(self)


_PATH_FIELDS = ("real", "fake", "network", "adm_classifier")


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def check_class_coverage(real: ImageSet, fake: ImageSet) -> None:
    """A conditional discriminator learns every class from both sets; a class with images in one set only is told
    apart by its label alone, so it is refused (naming the classes and how to make the missing images)."""
    real_classes, fake_classes = set(real.classes.unique().tolist()), set(fake.classes.unique().tolist())
    if real_classes - fake_classes:
        missing = sorted(real_classes - fake_classes)
        raise DiscriminatorError(f"--fake: {fake.source} has no generated images of class "
                                 f"{', '.join(map(str, missing))} (the real set has them); make them with "
                                 f"generate.py --class=K --outdir={fake.source}/K")
    if fake_classes - real_classes:
        missing = sorted(fake_classes - real_classes)
        raise DiscriminatorError(f"--real: {real.source} has no images of class {', '.join(map(str, missing))} "
                                 f"(the generated set has them)")


def image_set_fingerprint(path: str, num_images: int) -> dict:
    """What identifies the images a run was trained on: the number used and the sha256 of the sorted list of the
    set's files with their sizes (a folder's files, or a zip's members), labels and records included."""
    path = _absolute(path)
    if os.path.isdir(path):
        entries = []
        for root, _dirs, names in os.walk(path):
            for name in names:
                full = os.path.join(root, name)
                entries.append((os.path.relpath(full, path).replace(os.sep, "/"), os.path.getsize(full)))
    else:
        with zipfile.ZipFile(path) as archive:
            entries = [(info.filename, info.file_size) for info in archive.infolist()]
    digest = hashlib.sha256("\n".join(f"{name}\t{size}" for name, size in sorted(entries)).encode()).hexdigest()
    return dict(images=int(num_images), files_sha256=digest)


def check_options(opts: DGTrainingOptions) -> None:
    """ValueError naming the option for values that cannot train."""
    if opts.encoder not in ("network", "adm"):
        raise ValueError(f"--encoder must be 'network' or 'adm', got {opts.encoder!r}")
    if opts.encoder == "network" and not opts.network:
        raise ValueError("--network is required with --encoder=network (the snapshot whose features are used)")
    if opts.encoder == "adm" and opts.network:
        raise ValueError("--network applies to --encoder=network only")
    for name in ("epochs", "batch", "width", "depth", "head_channels"):
        if int(getattr(opts, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.width % GROUPS or opts.width % opts.head_channels:  # before the encoder and the images are loaded
        raise ValueError(f"--width {opts.width} must be a multiple of {GROUPS} (the head's group norm) and of "
                         f"--head-channels={opts.head_channels} (channels per attention head)")
    if opts.aot < 0:
        raise ValueError(f"--aot must be >= 0, got {opts.aot}")
    if opts.aot and opts.aot % opts.batch:
        raise ValueError(f"--aot: the pool of {opts.aot} rows must be a multiple of --batch={opts.batch}")
    if not opts.lr > 0 or opts.weight_decay < 0:
        raise ValueError(f"--lr must be > 0 and --weight-decay >= 0, got {opts.lr} and {opts.weight_decay}")
    if not 0 < opts.t_min < 1:
        raise ValueError(f"t_min (the smallest training time) must lie in (0, 1), got {opts.t_min}")


def build_encoder(opts: DGTrainingOptions, device):
    """(encoder module on `device`, image resolution, channels, label_dim of the encoder network or 0)."""
    if opts.encoder == "adm":
        classifier = load_adm_classifier(opts.adm_classifier)
        return classifier.to(device), classifier.image_size, 3, 0
    from training.snapshots import load_snapshot

    try:
        snapshot = load_snapshot(opts.network, device)
    except (persistence.NetworkPickleError, OSError) as err:
        raise DiscriminatorError(f"--network: {err}") from None
    if not getattr(snapshot.process.sampling, "takes_guidance", False):
        raise DiscriminatorError(f"--network: {opts.network} was trained with the process {snapshot.process.name!r}, "
                                 f"which DG does not guide (it corrects a sigma-grid denoiser)")
    net = snapshot.net
    return net, int(net.img_resolution), int(net.img_channels), int(getattr(net, "label_dim", 0) or 0)


def _batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, _BATCH_TAG, epoch, index))


def pool_paired_noise(images: torch.Tensor, labels: torch.Tensor | None, seed: int, pool_index: int) -> torch.Tensor:
    """The AOT-paired unit noise of a pool ([-1, 1] images [N, ...], one-hot labels or None), exactly as the AOT
    loss prepares pool `pool_index` of rank 0 without augmentation (losses.aot: the torch RNG seeded with pool_seed,
    one unit noise per image, permuted by assign_noise), with the surrounding random streams left untouched."""
    device = images.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(pool_seed(seed, 0, pool_index))
        noise = torch.randn_like(images)
    return noise[assign_noise(images, noise, labels)]


def perturb(images: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, vp: VPTime, t_min: float):
    """(x = y + sigma(t) z, sigma(t)) for importance-sampled VP times t = sample_time(u): EDM's VE form of the
    reference's alpha(t) y + std(t) z."""
    sigma = vp.sigma(vp.sample_time(u, t_min)).to(images.device)
    x = images.to(torch.float64) + sigma.reshape(-1, 1, 1, 1) * noise.to(torch.float64)
    return x.to(torch.float32), sigma


def _bin_index(sigma: torch.Tensor) -> torch.Tensor:
    edges = torch.tensor(SIGMA_BINS[1:-1], dtype=sigma.dtype, device=sigma.device)
    return torch.bucketize(sigma, edges, right=True)


def _bin_names() -> list[str]:
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(SIGMA_BINS[:-1], SIGMA_BINS[1:])]


class _EpochStats:
    """Sums on the device (no host sync per batch): loss, correct, count, per target and per sigma bin."""

    def __init__(self, device):
        self.loss = torch.zeros([], dtype=torch.float64, device=device)
        self.correct = torch.zeros([2, len(SIGMA_BINS) - 1], dtype=torch.float64, device=device)
        self.count = torch.zeros_like(self.correct)

    def add(self, loss, logit, target, sigma):
        self.loss += loss.detach().to(torch.float64) * target.shape[0]
        row = target.to(torch.int64)
        column = _bin_index(sigma.to(logit.device))
        hit = ((logit.detach() > 0).to(target.dtype) == target).to(torch.float64)
        self.correct.index_put_((row, column), hit, accumulate=True)
        self.count.index_put_((row, column), torch.ones_like(hit), accumulate=True)

    def summary(self) -> dict:
        correct, count = self.correct.cpu(), self.count.cpu()
        total = float(count.sum())

        def rate(c, n):
            return round(float(c) / float(n), 4) if float(n) else None

        return dict(loss=round(float(self.loss) / max(total, 1), 5), accuracy=rate(correct.sum(), total),
                    accuracy_real=rate(correct[1].sum(), count[1].sum()),
                    accuracy_fake=rate(correct[0].sum(), count[0].sum()),
                    accuracy_by_sigma={name: rate(correct[:, k].sum(), count[:, k].sum())
                                       for k, name in enumerate(_bin_names())})


def train_epoch(disc: Discriminator, optimizer, images, is_real, labels, opts: DGTrainingOptions, epoch: int,
                device) -> dict:
    """One epoch over the rows of `images` (uint8 [N, C, H, W], CPU) with targets `is_real` [N]."""
    disc.train()
    vp = disc.vp
    num = images.shape[0]
    order = torch.randperm(num, generator=torch.Generator().manual_seed(stream_seed(opts.seed, _EPOCH_TAG, epoch)))
    unit = opts.aot or opts.batch
    pools = num // unit
    if pools == 0:
        raise DiscriminatorError(f"{num} images in all are fewer than one {'--aot pool' if opts.aot else '--batch'} "
                                 f"({unit})")
    stats = _EpochStats(device)
    batches_per_unit = unit // opts.batch
    for pool in range(pools):
        rows = order[pool * unit:(pool + 1) * unit]
        pool_images = images[rows].to(device).to(torch.float32) / 127.5 - 1
        pool_labels = labels[rows].to(device) if labels is not None else None
        pool_noise = pool_paired_noise(pool_images, pool_labels, opts.seed, epoch * pools + pool) if opts.aot \
            else None
        for k in range(batches_per_unit):
            part = slice(k * opts.batch, (k + 1) * opts.batch)
            generator = _batch_generator(opts.seed, epoch, pool * batches_per_unit + k)
            u = torch.rand([opts.batch], generator=generator, dtype=torch.float64)
            y = pool_images[part]
            noise = pool_noise[part] if pool_noise is not None else \
                torch.randn(y.shape, generator=generator).to(device)
            x, sigma = perturb(y, noise, u, vp, opts.t_min)
            target = is_real[rows[part]].to(device).to(torch.float32)
            batch_labels = pool_labels[part] if pool_labels is not None else None
            logit = disc.logit(x, sigma, batch_labels)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stats.add(loss, logit, target, sigma)
    return stats.summary()


@torch.no_grad()
def accuracy_by_noise_level(disc: Discriminator, real: torch.Tensor, fake: torch.Tensor, sigmas, *,
                            real_labels=None, fake_labels=None, batch: int = 256, seed: int = 0, device="cpu") -> dict:
    """Accuracy of the discriminator (logit > 0 means real) at fixed noise levels, on real and generated uint8
    images perturbed with seeded noise: {sigma: {'real': ..., 'fake': ..., 'mean': ...}}."""
    disc.eval()
    result = {}
    for level in sigmas:
        rates = {}
        for name, images, labels, target in (("real", real, real_labels, 1), ("fake", fake, fake_labels, 0)):
            generator = torch.Generator().manual_seed(stream_seed(seed, 0xACC, int(level * 1e6), target))
            correct = 0
            for start in range(0, images.shape[0], batch):
                y = images[start:start + batch].to(device).to(torch.float32) / 127.5 - 1
                noise = torch.randn(y.shape, generator=generator).to(device)
                x = y + float(level) * noise
                lab = labels[start:start + batch].to(device) if labels is not None else None
                logit = disc.logit(x, torch.full([y.shape[0]], float(level), device=device), lab)
                correct += int(((logit > 0).to(torch.int64) == target).sum())
            rates[name] = correct / images.shape[0]
        rates["mean"] = 0.5 * (rates["real"] + rates["fake"])
        result[float(level)] = rates
    return result


def _state_path(outdir: str) -> str:
    return os.path.join(outdir, STATE_FILE)


def _save_state(outdir: str, disc: Discriminator, optimizer, epoch: int, opts: DGTrainingOptions,
                data: dict) -> None:
    state = dict(format=STATE_FORMAT, version=STATE_VERSION, epoch=int(epoch), options=opts.record(), data=data,
                 head={k: v.detach().cpu() for k, v in disc.head.state_dict().items()},
                 optimizer=optimizer.state_dict())
    with util.atomic_output(_state_path(outdir), "wb") as f:
        torch.save(state, f)


def _load_state(path: str) -> dict:
    try:
        state = persistence.safe_torch_load(path)
    except Exception as err:  # many error types for a file of the wrong kind; name the file
        raise DiscriminatorError(f"--resume: cannot read {path}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise DiscriminatorError(f"--resume: {path} is not a DG training state (version {STATE_VERSION})")
    return state


def _keep_stats_until(outdir: str, epoch: int) -> None:
    """Drop the stats lines of epochs after `epoch` (a run killed between its stats line and its state repeats the
    epoch on resume), and a last line that does not parse (the one being written when the run was killed)."""
    path = os.path.join(outdir, STATS_FILE)

    def up_to_epoch(record, number, is_last):
        if record is None:
            if is_last:
                return False
            raise DiscriminatorError(f"--resume: {path}: line {number} is not a stats record; repair or remove it")
        return record.get("epoch", 0) <= epoch

    training_stats.filter_jsonl(path, up_to_epoch)


def _previous_run_files(outdir: str) -> list[str]:
    """The files of an earlier run in `outdir` (state first: with it gone, nothing is resumed from a half-cleared
    folder)."""
    names = [STATE_FILE, STATS_FILE, OPTIONS_FILE]
    found = [os.path.join(outdir, name) for name in names if os.path.isfile(os.path.join(outdir, name))]
    return found + sorted(glob.glob(os.path.join(glob.escape(outdir), "discriminator-*.pkl")))


# Options that may change on resume (they do not change what was trained so far).
_RESUMABLE = ("epochs",)


def resume_point(outdir: str, resume: str | None, overwrite: bool = False) -> str | None:
    """The training state to resume from: `resume` ('auto': the outdir's, if any; a path; None: none). A fresh run
    into an outdir that holds files of an earlier run (its state, stats, discriminator pickles) is refused unless
    `overwrite`: its pickles and stats would be replaced or mixed with the new run's."""
    if overwrite and resume is not None:
        raise DiscriminatorError("--overwrite starts a fresh run; it cannot be combined with --resume")
    existing = _state_path(outdir)
    if resume is None:
        if os.path.isfile(existing) and not overwrite:
            raise DiscriminatorError(f"{outdir} already holds a DG training state; pass --resume=auto to continue it, "
                                     f"--overwrite to start afresh, or choose another --outdir")
    elif resume == "auto":
        if os.path.isfile(existing):
            return existing
    else:
        resume = os.path.expanduser(resume)
        if os.path.isdir(resume):
            resume = _state_path(resume)
        if not os.path.isfile(resume):
            raise DiscriminatorError(f"--resume: no such training state: {resume}")
        return resume
    earlier = _previous_run_files(outdir)
    if earlier and not overwrite:
        shown = ", ".join(os.path.basename(path) for path in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise DiscriminatorError(f"--outdir: {outdir} holds files of an earlier run ({shown}) but no training state "
                                 f"to resume; pass --overwrite to replace them, or choose another --outdir")
    return None


def train_discriminator(opts: DGTrainingOptions, outdir: str, *, resume: str | None = None, overwrite: bool = False,
                        device=None, log=print) -> Discriminator:
    """Train (or resume) a DG discriminator into `outdir`; returns it after the last epoch. overwrite: start afresh
    in an outdir that holds an earlier run, removing its state, stats and pickles first."""
    check_options(opts)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    outdir = os.path.expanduser(outdir)
    util.check_output_path(os.path.join(outdir, STATE_FILE), "--outdir")
    state_path = resume_point(outdir, resume, overwrite)
    state = _load_state(state_path) if state_path else None
    if state is not None:
        saved = {k: v for k, v in state["options"].items() if k not in _RESUMABLE}
        for name in _PATH_FIELDS:  # states written before paths were recorded absolute: relative to this folder
            if saved.get(name) and "://" not in str(saved[name]):
                saved[name] = _absolute(saved[name])
        current = {k: v for k, v in opts.record().items() if k not in _RESUMABLE}
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise DiscriminatorError(f"--resume: {state_path} was trained with other {', '.join(changed)} "
                                     f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)})")

    encoder, resolution, channels, encoder_label_dim = build_encoder(opts, device)
    use_labels = bool(opts.cond or encoder_label_dim)
    real = load_image_set(opts.real, use_labels=use_labels, max_images=opts.max_images, option="--real",
                          resolution=resolution)
    fake = load_image_set(opts.fake, use_labels=use_labels, max_images=opts.max_images, option="--fake",
                          resolution=resolution)
    for image_set, option in ((real, "--real"), (fake, "--fake")):
        if image_set.images.shape[1] != channels:
            raise DiscriminatorError(f"{option}: {image_set.source} has {image_set.images.shape[1]} channels; the "
                                     f"encoder takes {channels}")
    label_dim = 0
    if use_labels:
        label_dim = encoder_label_dim or int(max(real.classes.max(), fake.classes.max())) + 1
        for image_set, option in ((real, "--real"), (fake, "--fake")):
            if int(image_set.classes.max()) >= label_dim:
                raise DiscriminatorError(f"{option}: {image_set.source} has class {int(image_set.classes.max())}; "
                                         f"the encoder network has label_dim = {label_dim}")
        if opts.cond:
            check_class_coverage(real, fake)
    data = {name: image_set_fingerprint(path, image_set.images.shape[0])
            for name, path, image_set in (("real", opts.real, real), ("fake", opts.fake, fake))}
    # The frozen encoder's file by content: the options record its path only, and another file there (a classifier
    # fetched again, a snapshot overwritten) would train the head on other features.
    encoder_option, encoder_path = ("--network", opts.network) if opts.network else ("--adm-classifier",
                                                                                      opts.adm_classifier)
    data["encoder_sha256"] = util.file_sha256(encoder_path) if encoder_path else None
    if state is not None and "data" in state:  # states of older versions did not record their images
        changed = [f"--{name}" for name in ("real", "fake") if state["data"].get(name) != data[name]]
        if changed:
            raise DiscriminatorError(f"--resume: the images of {' and '.join(changed)} differ from those {state_path} "
                                     f"was trained on (file list or count); resume with the same sets")
        saved_sha = state["data"].get("encoder_sha256")  # recorded since 2026-12-03
        if saved_sha and data["encoder_sha256"] and saved_sha != data["encoder_sha256"]:
            raise DiscriminatorError(f"--resume: {encoder_option} {encoder_path} is not the file {state_path} was "
                                     f"trained with (sha256 {data['encoder_sha256'][:12]}... here, {saved_sha[:12]}... "
                                     f"then); resume with the same encoder")

    num_images, unit = real.images.shape[0] + fake.images.shape[0], opts.aot or opts.batch
    if num_images < unit:  # before anything is written (train_epoch says the same, for a library caller)
        raise DiscriminatorError(f"{num_images} images in all are fewer than one "
                                 f"{'--aot pool' if opts.aot else '--batch'} ({unit})")

    torch.manual_seed(opts.seed)  # the head's initial weights
    disc = build_discriminator(encoder, opts.encoder, img_resolution=resolution, img_channels=channels,
                               label_dim=label_dim, conditional=opts.cond, width=opts.width, depth=opts.depth,
                               head_channels=opts.head_channels,
                               record=dict(encoder_source=opts.network or opts.adm_classifier))
    disc.head.to(device)
    optimizer = torch.optim.Adam(disc.head.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    start_epoch = 0
    if state is not None:
        disc.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        log(f"Resuming {state_path} after epoch {start_epoch}.")
        if start_epoch >= opts.epochs:
            log(f"Nothing to train: {start_epoch} epochs are done and --epochs={opts.epochs}; raise --epochs to "
                f"continue.")
    if state is None:
        for path in _previous_run_files(outdir):  # only with overwrite (resume_point refused the folder otherwise)
            os.remove(path)
    os.makedirs(outdir, exist_ok=True)
    if state is None:
        with util.atomic_output(os.path.join(outdir, OPTIONS_FILE), "w") as f:
            json.dump(opts.record(), f, indent=2)
    _keep_stats_until(outdir, start_epoch)

    images = torch.cat([real.images, fake.images])
    is_real = torch.cat([torch.ones(real.images.shape[0]), torch.zeros(fake.images.shape[0])])
    labels = torch.eye(label_dim)[torch.cat([real.classes, fake.classes])] if use_labels else None
    log(f"DG discriminator: {opts.encoder} encoder, features {disc.head.in_channels}x{disc.head.image_size}^2, "
        f"head {sum(p.numel() for p in disc.head.parameters()):,} parameters; {real.images.shape[0]} real + "
        f"{fake.images.shape[0]} generated images; {'AOT pools of ' + str(opts.aot) if opts.aot else 'unpaired noise'}")
    for epoch in range(start_epoch, opts.epochs):
        tick = time.time()
        stats = train_epoch(disc, optimizer, images, is_real, labels, opts, epoch, device)
        stats.update(epoch=epoch + 1, seconds=round(time.time() - tick, 2))
        save_discriminator(os.path.join(outdir, f"discriminator-{epoch + 1:06d}.pkl"), disc,
                           training=dict(opts.record(), epoch=epoch + 1))
        stats_path = os.path.join(outdir, STATS_FILE)
        try:
            with open(stats_path, "a") as f:
                f.write(json.dumps(stats) + "\n")
        except OSError as err:  # a full disk: name the file (a cut line is dropped on resume, _keep_stats_until)
            raise util.write_error(stats_path, err) from err
        _save_state(outdir, disc, optimizer, epoch + 1, opts, data)
        log(f"epoch {epoch + 1}/{opts.epochs}: BCE {stats['loss']:.4f}, accuracy {stats['accuracy']:.3f} (real "
            f"{stats['accuracy_real']:.3f}, generated {stats['accuracy_fake']:.3f}), {stats['seconds']:.1f} s")
    return disc
