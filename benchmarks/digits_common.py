"""Helpers shared by the digits benchmarks (bench_dg.py, bench_spd_digits.py): the newest file of a run folder, the
settings a reused training run was made with, and the classifier Frechet distance (NOT FID: the 64-d features of
metrics/digits_classifier.py)."""

import json
import os

import numpy as np


def latest(folder: str, prefix: str, suffix: str) -> str | None:
    """The last file of `folder` (name order) that starts with `prefix` and ends with `suffix`, or None."""
    names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(suffix)) \
        if os.path.isdir(folder) else []
    return os.path.join(folder, names[-1]) if names else None


RUN_SETTINGS = "bench-settings.json"


def claim_run(run_dir: str, settings: dict) -> None:
    """Before training into (or reusing) `run_dir`: its recorded settings must be `settings`, else ValueError (a
    benchmark rerun with another --T or --kimg would otherwise reuse the finished run and mix two configurations
    in one table). A new folder gets the record first."""
    path = os.path.join(run_dir, RUN_SETTINGS)
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        try:
            with open(path) as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = None
        if recorded != settings:
            raise ValueError(f"{run_dir} was trained with {recorded or 'unrecorded settings'}, not {settings}: use "
                             f"another --outdir, or delete that folder")
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N, D]."""
    from metrics.frechet import frechet_distance
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
