"""Helpers shared by the digits benchmarks (bench_dg.py, bench_spd_digits.py): the newest file of a run folder and
the classifier Frechet distance (NOT FID: the 64-d features of metrics/digits_classifier.py)."""

import os

import numpy as np


def latest(folder: str, prefix: str, suffix: str) -> str | None:
    """The last file of `folder` (name order) that starts with `prefix` and ends with `suffix`, or None."""
    names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(suffix)) \
        if os.path.isdir(folder) else []
    return os.path.join(folder, names[-1]) if names else None


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N, D]."""
    from metrics.frechet import frechet_distance
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
