"""One pass over images (a folder/ZIP, or a network sampled in memory) computing every requested metric.

Metrics (names as in `--metrics`):
  fid  Fréchet Inception Distance against reference `mu`/`sigma` (EDM's fid.py, float64 sums, unbiased covariance)
  is   Inception Score, 10 ordered splits, Inception head without output bias (StyleGAN2-ADA is50k)
  pr   precision/recall with VGG16 features, k = 3 (StyleGAN2-ADA pr50k3_full); the real features come from the
       reference file (`fid.py ref --metrics fid,pr` stores them as `vgg16_features`)
  kid  Kernel Inception Distance (torch-fidelity / clean-fid: unbiased MMD^2, cubic polynomial kernel, 100 subsets of
       1000, or of the smaller set's size when a set is smaller, as clean-fid; torch-fidelity refuses that); from the
       same Inception features as FID; the real features come from the reference file (`fid.py ref --metrics
       fid,kid` stores them as `inception_features`)

Sharding follows EDM: the N image indices are split into ceil(N / (batch·world))·world near-equal chunks and rank r
takes chunks r, r + world, ...; generated images are indexed by their seed's rank in PNG file-name order. Every
accumulator is keyed by that global index, so results do not depend on the number of ranks beyond floating-point
rounding (FID 4.658270051 vs 4.658269688 on 1 vs 2 CPU ranks; IS and P/R equal). That gap is the detector's: its
float32 features change in the last bits with the thread count (torchrun gives each rank one; the stand-in's by up to
4.8e-7), while the statistics' summation order alone moves FID by about 1e-15 (an audit on equal features, 1-3
ranks, measured 2026-12-02). Memory is constant in N
for FID and IS; precision/recall keep the float16 VGG16 features they need, KID the float32 Inception features.
"""

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import tqdm

from torch_utils import distributed

from . import detectors as detectors_lib
from .frechet import (
    DEFAULT_FRECHET_ROUTE,
    FRECHET_ROUTES,
    FeatureMoments,
    ReferenceStatsError,
    file_sha256,
    load_reference,
    save_reference,
)
from .inception_score import InceptionScoreAccumulator
from .kid import kernel_inception_distance
from .precision_recall import precision_recall

PR_NHOOD_SIZE = 3  # precision/recall's k (StyleGAN2-ADA's pr50k3): a set needs k + 1 points
PR_REFERENCE_KEY = "vgg16_features"
KID_REFERENCE_KEY = "inception_features"
# detector: the feature network; reads: which of its outputs ("features" or "probabilities"; one detector pass serves
# all); reference: needs --ref; reference_key: the array beyond mu/sigma it reads from the reference file.
METRICS: dict[str, dict] = {
    "fid": dict(detector="inception", reads="features", label="fid{n}_full",
                description="Frechet Inception Distance (EDM)", reference=True),
    "is": dict(detector="inception", reads="probabilities", label="is{n}",
               description="Inception Score (StyleGAN2-ADA, 10 splits)"),
    "pr": dict(detector="vgg16", reads="features", label="pr{n}_3_full",
               description="precision/recall (StyleGAN2-ADA, VGG16, k=3)", reference=True,
               reference_key=PR_REFERENCE_KEY),
    "kid": dict(detector="inception", reads="features", label="kid{n}_full",
                description="Kernel Inception Distance (torch-fidelity)", reference=True,
                reference_key=KID_REFERENCE_KEY),
}


def metrics_needing_reference(metrics: Sequence[str]) -> list[str]:
    """The metrics of `metrics` that compare with reference statistics (--ref), in the order given."""
    return [m for m in metrics if METRICS[m].get("reference")]


class MetricsError(ValueError):
    """Bad input to the metrics pipeline (too few images, unknown metric, incompatible reference, ...)."""


def parse_metrics(value: str | Sequence[str]) -> list[str]:
    """'fid,is,pr' -> ['fid', 'is', 'pr'] (order kept, duplicates dropped), with a clear error for unknown names."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [name.strip().lower() for name in names if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise MetricsError(f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                           f"choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def metric_label(metric: str, num_images: int) -> str:
    """fid50k_full, is50k, pr50k3_full, kid50k_full for 50,000 images (StyleGAN2-ADA's names: `_full` for metrics
    against a reference of the whole dataset); fid1234_full, pr1234_3_full otherwise."""
    n = f"{num_images // 1000}k" if num_images % 1000 == 0 else str(num_images)
    label = METRICS[metric]["label"].format(n=n)
    return label.replace("k_3", "k3")


def rank_batches(num_items: int, max_batch_size: int, rank: int | None = None,
                 world_size: int | None = None) -> list[torch.Tensor]:
    """EDM's split: ceil(N / (batch·world))·world near-equal chunks of 0..N-1; rank r takes r, r + world, ..."""
    rank = distributed.get_rank() if rank is None else rank
    world_size = distributed.get_world_size() if world_size is None else world_size
    num_batches = ((num_items - 1) // (max_batch_size * world_size) + 1) * world_size
    return list(torch.arange(num_items).tensor_split(num_batches)[rank::world_size])


# ---------------------------------------------------------------------------------------------------------------------
# Image sources: each yields (global indices [B] int64 on CPU, uint8 images [B, C, H, W] on the device).


@dataclasses.dataclass
class ImageSource:
    num_images: int
    batches: Callable[[torch.device], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    num_rank_batches: int  # for the progress bar
    description: dict
    image_shape: tuple[int, int, int] | None = None  # (C, H, W), compared with a reference's when both are known


def _check_detector_channels(channels: int, what: str) -> None:
    """Refuses images the detectors cannot read (RGBA, grey + alpha: what train.py trains on from such PNGs)."""
    if channels not in (1, 3):
        raise MetricsError(f"{what} {channels} channels; the detectors read RGB (or greyscale) images: convert them "
                           f"(e.g. drop the alpha channel) first")


def dataset_source(path: str, num: int | None = None, seed: int = 0, batch_size: int = 64, num_workers: int = 3,
                   prefetch_factor: int = 2) -> ImageSource:
    """Images of a folder or ZIP (sorted names, recursive). With `num`: a random subset of exactly `num` images
    chosen by RandomState(seed) and kept in file order (EDM's max_size/random_seed), error if there are fewer."""
    from training.dataset import DatasetError, ImageFolderDataset, unwrap_worker_error

    dataset = ImageFolderDataset(path=path, max_size=num, random_seed=seed)
    # Every rank lists the folder and draws the subset itself; before the counts are checked (a rank that raised
    # alone would leave the others waiting in this collective), so that each rank sees the same verdict.
    _check_same_images_on_all_ranks(path, dataset)
    if num is not None and len(dataset) < num:
        raise MetricsError(f"found {len(dataset)} image{'' if len(dataset) == 1 else 's'} in {path}, but expected at "
                           f"least {num} (--num-images)")
    if len(dataset) < 2:
        raise MetricsError(f"found {len(dataset)} image(s) in {path}, but need at least 2 to compute statistics")
    _check_detector_channels(dataset.image_shape[0], f"{path}: images have")
    batches = [b.tolist() for b in rank_batches(len(dataset), batch_size) if len(b) > 0]

    def iterate(device: torch.device):
        loader_kwargs = {}
        if num_workers > 0:
            loader_kwargs = dict(num_workers=num_workers, prefetch_factor=prefetch_factor, persistent_workers=False)
            if device.type == "cuda":
                loader_kwargs["multiprocessing_context"] = "spawn"  # as EDM: no forked children of a CUDA process
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, pin_memory=(device.type == "cuda"),
                                             **loader_kwargs)
        try:
            for indices, (images, _labels) in zip(batches, loader):
                yield torch.as_tensor(indices, dtype=torch.int64), images.to(device, non_blocking=True)
        except DatasetError as exc:  # e.g. an image damaged after its header, found when a worker decodes it
            raise unwrap_worker_error(exc) from None

    image_shape = tuple(int(v) for v in dataset.image_shape)
    description = dict(images=str(path), num=len(dataset), seed=seed if num is not None else None,
                       image_shape=list(image_shape))
    network = _generating_network(path)
    if network is not None:  # for the reader of the result, and report.py's kimg
        description["network"] = network
    return ImageSource(len(dataset), iterate, len(batches), description, image_shape)


def _check_same_images_on_all_ranks(path: str, dataset) -> None:
    """Raise MetricsError on every rank together unless all ranks selected the same file names in the same order.

    Sharding assumes one global list: were the listings to differ (node-local paths, a network file system that lags,
    generate.py still writing), images would be counted twice or left out without any error. A sha256 of the
    selected names and two counts per rank are all-gathered: a few bytes, whatever the number of images.
    """
    if not distributed.is_distributed():
        return
    import hashlib

    import torch.distributed as dist

    names = [dataset._image_fnames[i] for i in dataset._raw_idx.tolist()]
    digest = hashlib.sha256("\0".join(names).encode("utf-8")).digest()
    row = [len(dataset._image_fnames), len(names), *np.frombuffer(digest, dtype=np.int64).tolist()]
    device = distributed.device()  # gloo gathers CPU tensors, NCCL CUDA ones
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(distributed.get_world_size())]
    dist.all_gather(gathered, mine)
    rows = [g.tolist() for g in gathered]
    if any(r != rows[0] for r in rows):
        counts = "; ".join(f"rank {rank}: {r[0]} found, {r[1]} selected" for rank, r in enumerate(rows))
        raise MetricsError(f"{path}: the ranks see different images ({counts}; or the same counts but other file "
                           f"names); every rank must read the same complete folder or ZIP: not a node-local copy, "
                           f"nor one still being written or synchronised")


def _generating_network(path: str) -> str | None:
    """The network that generate.py recorded in a folder's generation.json, if any."""
    try:
        with open(os.path.join(path, "generation.json")) as f:
            network = json.load(f).get("network")
    except (OSError, ValueError, AttributeError):
        return None
    return network if isinstance(network, str) else None


def network_source(net, seeds: Sequence[int], batch_size: int = 64, network_description: str | None = None,
                   sampler_description: str | None = None, process_description: dict | None = None,
                   network_sha256: str | None = None, **sampler_kwargs) -> ImageSource:
    """Images sampled in memory from `net` (a loaded network) for `seeds`; nothing is written to disk.
    process_description: the snapshot's process record (generation.json's "process"; None for EDM's pickles), kept
    in the result's source: the sampler options alone read as EDM's for an SPD or flow snapshot.
    network_sha256: the pickle's sha256, kept in the result's source (earlier_result compares it).

    Uses samplers.generation.generate_images, which splits the seeds over ranks exactly as generate.py does and
    yields the same uint8 pixels that generate.py writes as PNGs. Image i is the one whose PNG file name
    ({seed:06d}.png) comes i-th in sorted order, as `dataset_source` reads that folder, whatever order `seeds` are in.
    """
    from samplers.generation import generate_images, image_path

    seeds = [int(s) for s in seeds]
    if len(seeds) < 2:
        raise MetricsError(f"need at least 2 seeds to compute statistics, got {len(seeds)}")
    if getattr(net, "img_channels", None) is not None:  # before the sampling, which would end in the detector
        _check_detector_channels(int(net.img_channels), f"{network_description or 'the network'}: its images have")
    # generate_images splits the seeds with EDM's rule, so splitting their positions the same way gives each
    # yielded batch its positions in `seeds` (also right for repeated seeds); the seeds are checked against them.
    position_batches = [b for b in rank_batches(len(seeds), batch_size) if len(b) > 0]
    # The global index of an image is its seed's rank in file-name order: IS's ordered splits and KID's subsets pick
    # images by index, so `--seeds=14-25,3-13` must index them as the sorted PNGs of those seeds do. Sampling keeps
    # the given order (the batches generate.py would form): only the labels change, never the pixels.
    order = sorted(range(len(seeds)), key=lambda p: image_path("", seeds[p]))  # stable: repeated seeds keep order
    index_of_position = torch.empty(len(seeds), dtype=torch.int64)
    index_of_position[torch.as_tensor(order, dtype=torch.int64)] = torch.arange(len(seeds))

    def iterate(device: torch.device):
        batches = generate_images(net, seeds, batch_size=batch_size, device=device, **sampler_kwargs)
        for positions, (batch_seeds, images) in zip(position_batches, batches, strict=True):
            if [seeds[p] for p in positions.tolist()] != [int(s) for s in batch_seeds]:
                raise RuntimeError("generate_images split the seeds differently from metrics.evaluate.rank_batches")
            yield index_of_position[positions], images.to(device)

    options = {k: v for k, v in sampler_kwargs.items() if k != 'sampling'}
    resolution, channels = getattr(net, "img_resolution", None), getattr(net, "img_channels", None)
    image_shape = (int(channels), int(resolution), int(resolution)) if resolution and channels else None
    description = dict(network=network_description, network_sha256=network_sha256,
                       process=_jsonable(process_description), seeds=format_int_list(seeds), num=len(seeds),
                       sampler=sampler_description, sampler_options=_jsonable(options),
                       image_shape=None if image_shape is None else list(image_shape))
    return ImageSource(len(seeds), iterate, len(position_batches), description, image_shape)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def format_int_list(values: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (the inverse of generate.py's --seeds parsing)."""
    parts, start, prev = [], None, None
    for value in values:
        if start is not None and value == prev + 1:
            prev = value
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = value
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# The single pass.


def kid_reference_rows(num_images: int, max_items: int | None, seed: int = 0) -> torch.Tensor | None:
    """Which images' features a KID reference keeps when the dataset has more than `max_items`: a uniform random
    subset (RandomState(seed)), as a bool mask over the global indices; None keeps all. KID draws at most 100 subsets of
    1000 real rows, so a uniform subset of 200k serves as well as all of them; the first 200k in file order would not
    (a class-sorted dataset such as ImageNet's folders: its first ~160 classes only). P/R keep StyleGAN2-ADA's first
    max_real images in file order (pr50k3_full)."""
    if max_items is None or num_images <= max_items:
        return None
    mask = torch.zeros(num_images, dtype=torch.bool)
    mask[torch.from_numpy(np.random.RandomState(seed).choice(num_images, max_items, replace=False))] = True
    return mask


class FeaturePass:
    """Accumulates, batch by batch, what each requested metric needs from uint8 images and their global indices."""

    def __init__(self, metrics: Sequence[str], detectors: dict[str, detectors_lib.Detector], num_images: int,
                 is_splits: int = 10, pr_max_items: int | None = None):
        self.metrics = list(metrics)
        self.detectors = detectors
        self.num_images = num_images
        self.moments = FeatureMoments() if "fid" in self.metrics else None
        self.inception_score = InceptionScoreAccumulator(num_images, is_splits) if "is" in self.metrics else None
        self.pr_max_items = pr_max_items
        self._kid_keep = kid_reference_rows(num_images, pr_max_items) if "kid" in self.metrics else None
        self._pr_indices: list[torch.Tensor] = []
        self._pr_features: list[torch.Tensor] = []
        self._kid_indices: list[torch.Tensor] = []
        self._kid_features: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, indices: torch.Tensor, images: torch.Tensor) -> None:
        if images.shape[1] == 1:
            images = images.repeat([1, 3, 1, 1])  # grayscale -> RGB, as EDM
        inception = self.detectors.get("inception")
        # One call serves every metric of the Inception features (FID, KID, ...); IS reads its probabilities.
        needs_features = any(METRICS[m]["detector"] == "inception" and METRICS[m]["reads"] == "features"
                             for m in self.metrics)
        needs_probs = self.inception_score is not None
        if needs_features and needs_probs:  # one detector pass where the file allows it (its describe() says)
            inception_features, probs = inception.features_and_probabilities(images)
        elif needs_features:
            inception_features = inception.features(images)
        elif needs_probs:
            probs = inception.probabilities(images)
        if needs_features:
            if self.moments is not None:
                self.moments.update(inception_features)
            if "kid" in self.metrics:  # a seeded subset when capped (a reference of 1.2M images would not fit)
                # Indices stay on the host until finalize; a host-to-device copy that blocks would wait for this
                # batch's detector pass (pageable memory: non_blocking stages it without waiting).
                features = inception_features
                if self._kid_keep is not None:
                    keep = torch.nonzero(self._kid_keep[indices]).flatten()  # host-side indices: no sync
                    indices_kept = indices[keep]
                    features = features[keep.to(features.device, non_blocking=True)]
                else:
                    indices_kept = indices
                self._kid_indices.append(indices_kept)
                self._kid_features.append(features.to(torch.float32))
        if needs_probs:
            self.inception_score.update(probs, indices.to(probs.device, non_blocking=True))
        if "pr" in self.metrics:
            if self.pr_max_items is not None and bool((indices >= self.pr_max_items).any()):
                keep = torch.nonzero(indices < self.pr_max_items).flatten()  # host-side: no device sync
                indices, images = indices[keep], images[keep.to(images.device, non_blocking=True)]
            if len(indices) > 0:
                # float16 as StyleGAN2-ADA: the features P/R keep are the one thing that grows with N.
                features = self.detectors["vgg16"].features(images).to(torch.float16)
                self._pr_indices.append(indices)  # on the host until finalize (no blocking copy per batch)
                self._pr_features.append(features)

    def finalize(self, device: torch.device) -> dict:
        """Reduce across ranks (every rank must call it). Returns mu/sigma, IS scores, gathered P/R features."""
        out = {}
        if self.moments is not None:
            self.moments.reduce_(self.detectors["inception"].feature_dim, device)
            out["mu"], out["sigma"] = self.moments.mean_cov()
            if not (np.isfinite(out["mu"]).all() and np.isfinite(out["sigma"]).all()):  # the same sums on every rank
                raise MetricsError(f"the inception detector ({self.detectors['inception'].source}) gave NaN or inf "
                                   f"features for some of the images: no statistics (a reference would be unusable, "
                                   f"FID undefined)")
        if self.inception_score is not None:
            self.inception_score.reduce_(self.detectors["inception"].num_classes, device)
            out["is_mean"], out["is_std"], out["is_scores"] = self.inception_score.compute()
        if "pr" in self.metrics:
            out["pr_features"] = _rows_in_image_order(self._pr_indices, self._pr_features,
                                                      self.detectors["vgg16"].feature_dim, torch.float16, device)
            self._check_finite(out["pr_features"], "vgg16")
        if "kid" in self.metrics:
            out["kid_features"] = _rows_in_image_order(self._kid_indices, self._kid_features,
                                                       self.detectors["inception"].feature_dim, torch.float32, device)
            self._check_finite(out["kid_features"], "inception")
        return out

    def _check_finite(self, features: torch.Tensor, detector: str) -> None:
        """MetricsError if the gathered rows (the same on every rank) hold NaN or inf: a NaN row's distances compare
        False, so precision/recall and KID came out as numbers, and a reference kept them."""
        if not bool(torch.isfinite(features).all()):  # one host read per pass
            raise MetricsError(f"the {detector} detector ({self.detectors[detector].source}) gave NaN or inf features "
                               f"for some of the images: no statistics (a reference would be unusable, the metrics "
                               f"undefined)")


def _rows_in_image_order(index_batches: list, feature_batches: list, dim: int, dtype: torch.dtype,
                         device: torch.device) -> torch.Tensor:
    """Every rank's kept feature rows, in image-index order. The batch lists are emptied once joined, and the rows
    are reordered only when they came out of order (one process reads in order): the features, 16 KB per image for
    P/R, were held three times over at the end of a pass (1.65 GB peak for 20k images, 312 MB of features)."""
    indices = torch.cat(index_batches) if index_batches else torch.zeros([0], dtype=torch.int64)
    features = torch.cat(feature_batches) if feature_batches else torch.zeros([0, dim], dtype=dtype, device=device)
    index_batches.clear()
    feature_batches.clear()
    indices, features = _all_gather_rows(indices.to(device), features.to(device))
    if len(indices) > 1 and bool((indices[1:] < indices[:-1]).any()):  # one host read per pass
        features = features[torch.argsort(indices)]
    return features


def _all_gather_rows(indices: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's rows (padded to a common length for all_gather)."""
    if not distributed.is_distributed():
        return indices, features
    import torch.distributed as dist

    world_size = distributed.get_world_size()
    counts = [torch.zeros([1], dtype=torch.int64, device=indices.device) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([len(indices)], dtype=torch.int64, device=indices.device))
    counts = [int(c.item()) for c in counts]
    max_count = max(counts)
    # Gloo has no float16 collectives: gather float32 (exact for float16 values) and cast back.
    wire_dtype = torch.float32 if dist.get_backend() == "gloo" else features.dtype
    padded_features = torch.zeros([max_count, features.shape[1]], dtype=wire_dtype, device=features.device)
    padded_features[:len(features)] = features
    padded_indices = torch.zeros([max_count], dtype=torch.int64, device=indices.device)
    padded_indices[:len(indices)] = indices
    gathered_features = [torch.empty_like(padded_features) for _ in range(world_size)]
    gathered_indices = [torch.empty_like(padded_indices) for _ in range(world_size)]
    dist.all_gather(gathered_features, padded_features)
    dist.all_gather(gathered_indices, padded_indices)
    features = torch.cat([f[:n] for f, n in zip(gathered_features, counts)]).to(features.dtype)
    indices = torch.cat([i[:n] for i, n in zip(gathered_indices, counts)])
    return indices, features


def run_pass(source: ImageSource, metrics: Sequence[str], detectors: dict, device: torch.device,
             is_splits: int = 10, pr_max_items: int | None = None, progress: bool = True) -> dict:
    """Feed every image of `source` (this rank's share) to the accumulators; return the reduced statistics."""
    feature_pass = FeaturePass(metrics, detectors, source.num_images, is_splits=is_splits, pr_max_items=pr_max_items)
    bar = tqdm.tqdm(total=source.num_rank_batches, unit="batch", disable=(not progress or distributed.get_rank() != 0))
    with bar:
        for indices, images in source.batches(device):
            if images.dtype != torch.uint8:
                raise MetricsError(f"images must be uint8, got {images.dtype}")
            feature_pass.update(indices, images)
            bar.update(1)
    return feature_pass.finalize(device)


def load_detectors(metrics: Sequence[str], detector_paths: dict[str, str] | None, device: torch.device,
                   verbose: bool = True) -> dict[str, detectors_lib.Detector]:
    detector_paths = detector_paths or {}
    unknown = sorted(set(detector_paths) - set(detectors_lib.DETECTORS))
    if unknown:
        raise MetricsError(f"--detector: unknown detector(s) {', '.join(unknown)}; "
                           f"known: {', '.join(detectors_lib.DETECTORS)}")
    needed = list(dict.fromkeys(METRICS[m]["detector"] for m in metrics))
    loaded = {}
    for name in needed:
        source = detector_paths.get(name, detectors_lib.DETECTORS[name].url)
        distributed.print0(f'Loading {name} detector from "{source}"...')
        loaded[name] = detectors_lib.load_detector(name, detector_paths.get(name), device=device, verbose=verbose)
    return loaded


def _load_reference_all_ranks(ref_path: str, verbose: bool, metrics: Sequence[str]) -> dict:
    """Rank 0 reads (and downloads) first; the others then read the cached copy. Only the arrays the metrics use."""
    keys = [METRICS[m]["reference_key"] for m in metrics if METRICS[m].get("reference_key")]
    if distributed.get_rank() != 0:
        distributed.barrier()
    try:
        ref = load_reference(ref_path, verbose=verbose and distributed.get_rank() == 0, keys=keys)
    finally:
        if distributed.get_rank() == 0:
            distributed.barrier()
    return ref


def calc_metrics(source: ImageSource, ref_path: str | None, metrics: Sequence[str] = ("fid",),
                 detector_paths: dict[str, str] | None = None, device: torch.device | None = None,
                 is_splits: int = 10, pr_nhood_size: int = PR_NHOOD_SIZE, pr_row_batch_size: int = 10000,
                 pr_col_batch_size: int = 10000, progress: bool = True, verbose: bool = True,
                 fid_route: str = DEFAULT_FRECHET_ROUTE) -> dict:
    """Compute `metrics` for the images of `source`; every rank calls it and every rank gets the same result dict.

    The result has `results` (fid, is_mean, is_std, precision, recall as requested), `labels` (fid50k_full, ...),
    `num_images`, `source`, `reference` (path, sha256) and `detectors` (source, sha256) for provenance. `fid_route`
    names the Fréchet distance's route in `frechet.FRECHET_ROUTES` (recorded in `options`).
    """
    metrics = parse_metrics(metrics)
    if fid_route not in FRECHET_ROUTES:
        raise MetricsError(f"--fid-route: expected one of {', '.join(FRECHET_ROUTES)}, got {fid_route!r}")
    device = torch.device(device) if device is not None else distributed.device()
    started = time.time()
    # Counts that make a metric impossible are known before the image pass: refuse them now, not after it.
    if "pr" in metrics and source.num_images < pr_nhood_size + 1:
        raise MetricsError(f"--metrics pr: precision/recall with k = {pr_nhood_size} neighbours needs at least "
                           f"{pr_nhood_size + 1} generated images, got {source.num_images}")
    if "kid" in metrics and source.num_images < 2:
        raise MetricsError(f"--metrics kid: KID needs at least 2 generated images, got {source.num_images}")

    ref = None
    if metrics_needing_reference(metrics):
        if ref_path is None:
            raise MetricsError(f"--ref is required for {', '.join(metrics_needing_reference(metrics))}")
        distributed.print0(f'Loading reference statistics from "{ref_path}"...')
        ref = _load_reference_all_ranks(ref_path, verbose, metrics)
        if "pr" in metrics and PR_REFERENCE_KEY not in ref:
            raise ReferenceStatsError(
                f"reference statistics {ref_path!r} hold no VGG16 features for precision/recall (key "
                f"'{PR_REFERENCE_KEY}'); build them with `fid.py ref --data DATASET --dest REF.npz --metrics fid,pr`")
        if "kid" in metrics and KID_REFERENCE_KEY not in ref:
            raise ReferenceStatsError(
                f"reference statistics {ref_path!r} hold no Inception features for KID (key '{KID_REFERENCE_KEY}'); "
                f"build them with `fid.py ref --data DATASET --dest REF.npz --metrics fid,kid`")
        if "pr" in metrics and ref[PR_REFERENCE_KEY].shape[0] < pr_nhood_size + 1:
            raise MetricsError(
                f"--metrics pr: reference statistics {ref_path!r} hold VGG16 features of "
                f"{ref[PR_REFERENCE_KEY].shape[0]} images, but precision/recall with k = {pr_nhood_size} neighbours "
                f"needs at least {pr_nhood_size + 1}")
        if "kid" in metrics and ref[KID_REFERENCE_KEY].shape[0] < 2:
            raise MetricsError(
                f"--metrics kid: reference statistics {ref_path!r} hold Inception features of "
                f"{ref[KID_REFERENCE_KEY].shape[0]} image(s), but KID needs at least 2")

    ref_shape = _reference_image_shape(ref)
    if ref_shape is not None and source.image_shape is not None and ref_shape != tuple(source.image_shape):
        # Not refused: comparing across resolutions can be meant (upsampled samples); mostly it is a wrong --ref.
        distributed.warn0(f"the reference statistics {ref_path!r} were computed from {_shape_text(ref_shape)} images, "
                          f"but the images evaluated are {_shape_text(source.image_shape)}: is --ref the right "
                          f"dataset?", stacklevel=2)  # every rank sees it alike: said once
    detectors = load_detectors(metrics, detector_paths, device, verbose=verbose)
    if ref is not None and "fid" in metrics and ref["mu"].shape[0] != detectors["inception"].feature_dim:
        raise ReferenceStatsError(
            f"reference statistics {ref_path!r} have {ref['mu'].shape[0]}-d features, but the inception detector "
            f"({detectors['inception'].source}) gives {detectors['inception'].feature_dim}-d features")
    if ref is not None and "kid" in metrics and ref[KID_REFERENCE_KEY].shape[1:] != (
            detectors["inception"].feature_dim,):
        raise ReferenceStatsError(
            f"reference Inception features in {ref_path!r} have shape {list(ref[KID_REFERENCE_KEY].shape)}, but the "
            f"inception detector ({detectors['inception'].source}) gives {detectors['inception'].feature_dim}-d "
            f"features")
    if ref is not None and "pr" in metrics and ref[PR_REFERENCE_KEY].shape[1:] != (detectors["vgg16"].feature_dim,):
        raise ReferenceStatsError(
            f"reference VGG16 features in {ref_path!r} have shape {list(ref[PR_REFERENCE_KEY].shape)}, but the vgg16 "
            f"detector ({detectors['vgg16'].source}) gives {detectors['vgg16'].feature_dim}-d features")

    distributed.print0(f"Computing {', '.join(metrics)} for {source.num_images} images...")
    stats = run_pass(source, metrics, detectors, device, is_splits=is_splits, progress=progress)

    results: dict[str, float] = {}
    if "pr" in metrics:
        real_features = torch.as_tensor(ref[PR_REFERENCE_KEY]).to(device)
        results["precision"], results["recall"] = precision_recall(
            real_features, stats["pr_features"], nhood_size=pr_nhood_size, row_batch_size=pr_row_batch_size,
            col_batch_size=pr_col_batch_size)
    if "is" in metrics:
        results["is_mean"], results["is_std"] = stats["is_mean"], stats["is_std"]
    if "kid" in metrics:
        results["kid"], results["kid_std"] = kernel_inception_distance(
            stats["kid_features"], torch.as_tensor(ref[KID_REFERENCE_KEY]).to(device))
    if "fid" in metrics:
        fid = FRECHET_ROUTES[fid_route](stats["mu"], stats["sigma"], ref["mu"], ref["sigma"]) \
            if distributed.get_rank() == 0 else None
        results["fid"] = distributed.broadcast_object(fid)
    ordered = {key: results[key] for key in ("fid", "is_mean", "is_std", "precision", "recall", "kid", "kid_std")
               if key in results}
    ordered.update({key: value for key, value in results.items() if key not in ordered})  # added metrics, after

    record = dict(
        results=ordered,
        labels={m: metric_label(m, source.num_images) for m in metrics},
        num_images=source.num_images,
        source=source.description,
        reference=None if ref is None else dict(
            path=ref_path, sha256=file_sha256(ref_path) if distributed.get_rank() == 0 else None,
            num_real_pr=int(ref[PR_REFERENCE_KEY].shape[0]) if "pr" in metrics else None,
            image_shape=None if ref_shape is None else list(ref_shape)),
        detectors={name: det.describe() for name, det in detectors.items()},
        options=dict(is_splits=is_splits if "is" in metrics else None,
                     pr_nhood_size=pr_nhood_size if "pr" in metrics else None,
                     fid_route=fid_route if "fid" in metrics else None),
        is_scores=stats.get("is_scores"),
        world_size=distributed.get_world_size(),
        seconds=round(time.time() - started, 3),
        timestamp=time.time(),
    )
    return distributed.broadcast_object(record)


def _reference_image_shape(ref: dict | None) -> tuple[int, int, int] | None:
    """(C, H, W) of the images a reference was computed from, as `fid.py ref` records it; None for references
    without the record (EDM's and EDM2's published ones) or with a malformed one."""
    shape = None if ref is None else ref.get("image_shape")
    if shape is None:
        return None
    shape = np.asarray(shape)
    if shape.shape != (3,) or shape.dtype.kind not in "iu" or (shape <= 0).any():
        return None
    return tuple(int(v) for v in shape)


def _shape_text(shape) -> str:
    channels, height, width = shape
    return f"{width}x{height} {'greyscale' if channels == 1 else 'RGB' if channels == 3 else f'{channels}-channel'}"


def check_reference_request(dest: str, metrics: str | Sequence[str], dest_option: str = "--dest") -> list[str]:
    """What `compute_reference` refuses, checked without any image: fid.py ref calls it before listing the dataset, so
    a mistake costs no pass over the images. Returns the parsed metric names."""
    from dnnlib import util

    metrics = parse_metrics(metrics)
    if "is" in metrics:
        raise MetricsError("--metrics for ref: 'is' needs no reference statistics; use fid, pr and/or kid")
    # EDM's fid.py writes with np.savez, which appends .npz to any other name: `--dest=refs/x` gives refs/x.npz, and
    # scripts then pass `calc --ref=refs/x.npz`. Writing refs/x instead would break them, and silently appending
    # would make the file differ from the name given: the name must say .npz.
    if not str(dest).endswith(".npz"):
        raise MetricsError(f"{dest_option} {str(dest)!r} must end in .npz (EDM's fid.py would write "
                           f"{str(dest) + '.npz'!r} for it): give the full file name")
    util.check_output_path(dest, dest_option)
    return metrics


def compute_reference(source: ImageSource, dest: str, metrics: Sequence[str] = ("fid",),
                      detector_paths: dict[str, str] | None = None, device: torch.device | None = None,
                      pr_max_real: int = 200000, progress: bool = True, verbose: bool = True) -> dict:
    """Reference statistics of a dataset (all images, no flips) written to `dest` as EDM's .npz by rank 0.

    'fid' is always included (mu, sigma); 'pr' adds `vgg16_features` (float16) of the first `pr_max_real` images
    in file order (StyleGAN2-ADA's pr50k3_full: max_real 200k), 'kid' the float32 `inception_features` of as many
    images chosen uniformly at random (`kid_reference_rows`; all of them up to that size). Returns a small summary
    dict.
    """
    metrics = check_reference_request(dest, metrics, "dest")
    if "fid" not in metrics:
        metrics = ["fid", *metrics]
    # Features calc would refuse (too few rows for P/R's neighbours or KID's pairs): refused before the pass.
    num_real = source.num_images if pr_max_real is None else min(pr_max_real, source.num_images)
    for metric, needed, what in [("pr", PR_NHOOD_SIZE + 1, f"precision/recall with k = {PR_NHOOD_SIZE} neighbours"),
                                 ("kid", 2, "KID")]:
        if metric in metrics and num_real < needed:
            raise MetricsError(f"--metrics {metric}: {what} needs the features of at least {needed} real images, but "
                               f"the reference would keep {num_real} ({source.num_images} images, --max-real "
                               f"{pr_max_real})")
    device = torch.device(device) if device is not None else distributed.device()
    detectors = load_detectors(metrics, detector_paths, device, verbose=verbose)
    distributed.print0(f"Computing reference statistics ({', '.join(metrics)}) for {source.num_images} images...")
    stats = run_pass(source, metrics, detectors, device, pr_max_items=pr_max_real, progress=progress)
    extra = dict(num_images=np.int64(source.num_images))
    if source.image_shape is not None:  # checked against the evaluated images by calc_metrics (EDM ignores it)
        extra["image_shape"] = np.asarray(source.image_shape, dtype=np.int64)
    if "pr" in metrics:
        extra[PR_REFERENCE_KEY] = stats["pr_features"].cpu().numpy()
    if "kid" in metrics:
        extra[KID_REFERENCE_KEY] = stats["kid_features"].cpu().numpy()
    if distributed.get_rank() == 0:
        distributed.print0(f'Saving reference statistics to "{dest}"...')
        save_reference(dest, stats["mu"], stats["sigma"], **extra)
    distributed.barrier()
    return dict(dest=dest, num_images=source.num_images, metrics=metrics,
                detectors={name: det.describe() for name, det in detectors.items()})


_RUN_NETWORK = re.compile(r"network-(?:snapshot|phema)-(\d+)(?:-\d+\.\d+)?\.pkl")


def run_networks(run_dir: str, chain: Sequence[tuple[str, int | None]] | None = None) -> list[str]:
    """The network pickles of a training run folder, in training order (kimg, then name): train.py's
    network-snapshot-KIMG.pkl and phema.py's network-phema-KIMG-STD.pkl. Absolute paths. chain: the folders of
    the runs it continued and their last kimg, the earliest first, ending with run_dir (training.run_chain): their
    pickles up to that kimg come first; a later folder's pickle replaces one of the same name."""
    found = {}
    for directory, limit in chain or [(run_dir, None)]:
        directory = os.path.abspath(os.path.expanduser(directory))
        for name in os.listdir(directory):
            match = _RUN_NETWORK.fullmatch(name)
            if match and os.path.isfile(os.path.join(directory, name)) and (limit is None
                                                                            or int(match.group(1)) <= limit):
                found[name] = (int(match.group(1)), name, os.path.join(directory, name))
    return [path for _, _, path in sorted(found.values())]


def result_path_beside(network_pkl: str, metrics: Sequence[str], num_images: int) -> str:
    """Where the results of `network_pkl` go when a run folder is evaluated: beside it, named by its name and the
    metrics' labels (network-snapshot-000200-fid50k_full.json), so that report.py finds them and another count or
    metric set gets its own file."""
    requested = parse_metrics(metrics)  # in METRICS' order: --metrics=is,fid names the file as fid,is does
    labels = "-".join(metric_label(metric, num_images) for metric in METRICS if metric in requested)
    return f"{os.path.splitext(network_pkl)[0]}-{labels}.json"


def planned_detectors(metrics: Sequence[str], detector_paths: dict[str, str] | None) -> dict[str, dict]:
    """What calc_metrics would measure with, without loading it: for each detector the metrics need, the sources
    it may be read from (an override, else the canonical URL or its alternates) and the sha256 of the file where it
    is on this machine (a local file, a URL's download cache), else None. For earlier_result."""
    from dnnlib import util

    def local_sha256(source):  # never a download (file_sha256 of a URL not in the cache fetches it)
        if util.is_url(source):
            cached = util.cached_path(source)
            return None if cached is None else file_sha256(cached)
        return file_sha256(source)

    planned = {}
    for name in dict.fromkeys(METRICS[m]["detector"] for m in parse_metrics(metrics)):
        spec, override = detectors_lib.DETECTORS[name], (detector_paths or {}).get(name)
        sources = [override] if override is not None else [spec.url, *spec.alternate_urls]
        planned[name] = dict(sources=sources, sha256=local_sha256(sources[0]))
    return planned


def _same_detector(theirs: dict, ours: dict, place) -> bool:
    """By content where both sides know it (a copy of a file under another path is the same detector), else by
    where it came from: a canonical detector is one of its canonical URLs, an override the same path. A result of
    the canonical detector read from its alternate URL (the same network in StyleGAN2-ADA's format, another file) is
    the canonical detector's, as load_detector takes either."""
    canonical = len(ours["sources"]) > 1 or (ours["sources"][0] in [spec.url for spec in
                                                                   detectors_lib.DETECTORS.values()])
    if canonical and place(theirs.get("source")) in [place(source) for source in ours["sources"]]:
        return True
    if theirs.get("sha256") and ours["sha256"]:
        return theirs["sha256"] == ours["sha256"]
    return place(theirs.get("source")) in [place(source) for source in ours["sources"]]


# earlier_result: keys of a result's source that name the network (the sha256 is compared on its own)
_NOT_COMPARED = ("network", "network_sha256", "process")


def earlier_result(path: str, source: "ImageSource | None", ref_path: str | None, ref_sha256: str | None = None,
                   detectors: dict[str, dict] | None = None,
                   network_sha256: str | None = None,
                   fid_route: str = DEFAULT_FRECHET_ROUTE) -> tuple[dict | None, str | None]:
    """A result file left by an earlier evaluation at `path`: (its record, None) when it measured the images this
    source would make (the same seeds, sampler and options; the network is the file's neighbour; not compared when
    `source` is None, a check before any network is loaded) against the same reference (by content when
    `ref_sha256`, the reference's sha256, is given and the record has one; else by path) with the same detectors
    (`detectors`: planned_detectors; not compared when None), of the same network file (by its sha256 where both
    `network_sha256` and the record have one: results written before it was recorded are kept), its FID by the
    same `fid_route` (results written before the route was recorded took EDM's sqrtm); (None, why not) when it
    measured something else; (None, None) when there is none."""
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            record = json.load(f)
        # The network and its process are the file's neighbour's (results written before the process was recorded
        # have none): what the sampler made of them is compared below.
        theirs = {k: v for k, v in record["source"].items() if k not in _NOT_COMPARED}
        their_ref, their_sha = ((record.get("reference") or {}).get(key) for key in ("path", "sha256"))
        if not isinstance(their_ref, (str, type(None))):
            raise TypeError(f"reference path {their_ref!r}")
        their_detectors = record.get("detectors") or {}
        for info in their_detectors.values():
            if not isinstance(info.get("source"), (str, type(None))):
                raise TypeError(f"detector source {info.get('source')!r}")
        # Non-finite values come back as write_json wrote them ("nan", "inf"): numbers again, as calc_metrics gives.
        record["results"] = {key: float(value) if value in ("nan", "inf", "-inf") else value
                             for key, value in record["results"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, f"{path} is not a readable result file ({err})"
    from dnnlib import util

    def place(p):
        return p if p is None or "://" in p else os.path.abspath(os.path.expanduser(p))
    # A pickle written again under its name (phema.py run again, a file replaced by hand) is another network: its
    # neighbour's result would be kept as its own.
    their_network = record["source"].get("network_sha256")
    if network_sha256 and their_network and their_network != network_sha256:
        return None, (f"{path} measured another file of that name (network sha256 {str(their_network)[:12]}... "
                      f"there, {network_sha256[:12]}... here)")
    if source is not None:
        # As write_json stores it (inf as "inf"), so that equal requests compare equal.
        ours = json.loads(json.dumps(util.json_safe(_jsonable({k: v for k, v in source.description.items()
                                                                if k not in _NOT_COMPARED})), allow_nan=False))
        theirs = util.json_safe(theirs)
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key) != ours.get(key):
                return None, (f"{path} measured other images ({key}: {theirs.get(key)!r} there, "
                              f"{ours.get(key)!r} here)")
    # The same reference file: by its content where both sides know it (a path spelled otherwise, or a reference
    # rebuilt in place), else by its path.
    same = ref_sha256 == their_sha if ref_sha256 and their_sha else place(their_ref) == place(ref_path)
    if not same:
        return None, f"{path} measured against another reference ({their_ref!r} there, {ref_path!r} here)"
    their_route = (record.get("options") or {}).get("fid_route") or DEFAULT_FRECHET_ROUTE
    if "fid" in record["results"] and their_route != fid_route:
        return None, f"{path} took FID by another route (--fid-route {their_route} there, {fid_route} here)"
    for name, ours in (detectors or {}).items():
        theirs = their_detectors.get(name)
        if theirs is None or not _same_detector(theirs, ours, place):
            their_source = None if theirs is None else theirs.get("source")
            return None, (f"{path} was measured with another {name} detector ({their_source!r} there, "
                          f"{ours['sources'][0]!r} here)")
    return record, None


def write_json(record: dict, path: str) -> None:
    """Write a result record as JSON, atomically (non-finite numbers as strings, util.json_safe)."""
    from dnnlib import util

    with util.atomic_output(path, "w") as f:
        json.dump(util.json_safe(record), f, indent=2, allow_nan=False)  # a NaN metric as "nan": strict JSON
        f.write("\n")


def format_results(record: dict) -> list[str]:
    """Human-readable lines: 'fid50k_full 2.04321', 'is50k 9.81 ± 0.11', 'pr50k3_full precision 0.71 recall 0.59'."""
    results, labels, lines = record["results"], record["labels"], []
    if "fid" in results:
        lines.append(f"{labels['fid']} {results['fid']:g}")
    if "is_mean" in results:
        lines.append(f"{labels['is']} {results['is_mean']:g} +- {results['is_std']:g}")
    if "precision" in results:
        lines.append(f"{labels['pr']} precision {results['precision']:g} recall {results['recall']:g}")
    if "kid" in results:
        lines.append(f"{labels['kid']} {results['kid']:g} +- {results['kid_std']:g}")
    for metric, label in labels.items():  # an added metric with one number under its own name
        if metric not in ("fid", "is", "pr", "kid") and isinstance(results.get(metric), (int, float)):
            lines.append(f"{label} {results[metric]:g}")
    return lines
