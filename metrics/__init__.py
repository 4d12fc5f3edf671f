"""Evaluation metrics: FID (as EDM), Inception Score and precision/recall (as StyleGAN2-ADA), in one pass.

Library entry points (fid.py is a thin CLI over them):
  dataset_source(path, num, seed, batch_size)        images of a folder/ZIP (random subset of `num` by `seed`)
  network_source(net, seeds, batch_size, **sampler)  images sampled in memory, no PNGs
  calc_metrics(source, ref_path, metrics)            -> result record (every rank gets it)
  compute_reference(source, dest, metrics)           -> EDM-format .npz with mu, sigma (+ vgg16_features for pr)
Building blocks: frechet (FeatureMoments, frechet_distance, load/save_reference), inception_score,
precision_recall, detectors (DETECTORS registry, load_detector, stand-in detectors for tests).
"""

from .detectors import DETECTORS, DetectorUnavailableError, load_detector
from .evaluate import (
    METRICS,
    MetricsError,
    calc_metrics,
    compute_reference,
    dataset_source,
    metrics_needing_reference,
    network_source,
    parse_metrics,
)
from .frechet import FRECHET_ROUTES, ReferenceStatsError, frechet_distance, load_reference, save_reference

__all__ = [
    "DETECTORS", "FRECHET_ROUTES", "METRICS", "DetectorUnavailableError", "MetricsError", "ReferenceStatsError",
    "calc_metrics",
    "compute_reference", "dataset_source", "frechet_distance", "load_detector", "load_reference",
    "metrics_needing_reference", "network_source", "parse_metrics", "save_reference",
]
