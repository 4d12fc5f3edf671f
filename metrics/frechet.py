"""Fréchet distance between Gaussian fits of detector features (FID), computed exactly as EDM's fid.py.

Statistics: float64 running sums Σf and Σffᵀ on each rank, summed across ranks, then μ = Σf/N and the unbiased
covariance Σ = (Σffᵀ − N·μμᵀ)/(N − 1). Distance: ‖μ − μ_ref‖² + Tr(Σ + Σ_ref − 2·sqrtm(Σ·Σ_ref)), real part
(FRECHET_ROUTES: EDM's sqrtm by default, or the sum of the square roots of the product's eigenvalues).
Reference statistics are EDM's `.npz` (keys `mu`, `sigma`); EDM2's pickled {'fid': {mu, sigma}} also loads.

Speed on the CPU: EDM adds fᵀf of every batch (a float64 GEMM over the whole D x D sum per batch: 59-60 s for 50k x
2048 in batches of 64 on one thread, against 8.5-10 s here; docs/performance.md says how it was measured).
FeatureMoments gathers the float64 rows of ~64 MiB of batches and adds them with one symmetric rank-k update (BLAS
dsyrk: the upper triangle only, half the multiply-adds, the sum read once per chunk), as np.cov's XXᵀ does; Σf stays
EDM's per-batch sum. Only the order of the float64 additions of Σffᵀ changes, by a relative ~1e-16 per entry
(tests/test_metrics.py); on the GPU the per-batch GEMM is kept.
"""

import io
import pickle
import zipfile
import zlib

import numpy as np
import scipy.linalg
import torch

from dnnlib import util
from torch_utils import distributed, persistence


class FeatureMoments:
    """Running float64 Σf and Σffᵀ of feature vectors on the features' device (EDM's accumulation; on the CPU, Σffᵀ by
    chunked symmetric rank-k updates, see the module notes).

    chunk_bytes: float64 rows gathered before a CPU update (the last chunk is added by reduce_()).
    """

    def __init__(self, chunk_bytes: int = 64 << 20):
        self.feature_sum: torch.Tensor | None = None  # [D] float64
        self.outer_sum: torch.Tensor | None = None  # [D, D] float64 (on the CPU: complete after reduce_())
        self.num_local = 0  # rows seen on this rank (a host int: batch sizes are known without a device sync)
        self.num_total: int | None = None  # set by reduce_()
        self.chunk_bytes = int(chunk_bytes)
        self._pending: list[torch.Tensor] = []  # CPU float64 rows not yet in the upper triangle
        self._pending_rows = 0
        self._upper: np.ndarray | None = None  # CPU: Fortran-ordered [D, D] whose upper triangle holds Σffᵀ

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        if features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {list(features.shape)}")
        given, features = features, features.to(torch.float64)
        dim = features.shape[1]
        if self.feature_sum is None:
            self.feature_sum = torch.zeros([dim], dtype=torch.float64, device=features.device)
            if features.device.type != "cpu":
                self.outer_sum = torch.zeros([dim, dim], dtype=torch.float64, device=features.device)
        elif dim != self.feature_sum.shape[0]:
            raise ValueError(f"feature dimension changed from {self.feature_sum.shape[0]} to {dim}")
        self.feature_sum += features.sum(0)
        if features.device.type == "cpu":
            self._pending.append(features.clone() if features is given else features)  # kept: not the caller's
            self._pending_rows += features.shape[0]
            if self._pending_rows * dim * 8 >= self.chunk_bytes:
                self._add_pending()
        else:
            self.outer_sum += features.T @ features
        self.num_local += features.shape[0]

    def _add_pending(self) -> None:
        """Σffᵀ += FᵀF of the gathered CPU rows F [n, D], upper triangle only (one dsyrk call)."""
        if not self._pending:
            return
        from scipy.linalg import blas

        rows = torch.cat(self._pending).numpy()  # C-ordered [n, D]: its transpose is a Fortran-ordered [D, n]
        self._pending, self._pending_rows = [], 0
        if self._upper is None:
            self._upper = np.zeros([rows.shape[1]] * 2, dtype=np.float64, order="F")
        # C = A·Aᵀ + C with A = Fᵀ (no copy); overwrite_c updates the Fortran-ordered sum in place.
        self._upper = blas.dsyrk(1.0, rows.T, beta=1.0, c=self._upper, trans=0, lower=0, overwrite_c=1)

    def _complete_cpu_sum(self) -> None:
        """outer_sum from the upper triangle (mirrored), after the last gathered rows."""
        if self.feature_sum is None or self.feature_sum.device.type != "cpu":
            return
        self._add_pending()
        dim = self.feature_sum.shape[0]
        upper = self._upper if self._upper is not None else np.zeros([dim, dim], dtype=np.float64)
        full = np.triu(upper) + np.triu(upper, 1).T
        self.outer_sum = torch.from_numpy(full)
        self._upper = None

    @torch.no_grad()
    def reduce_(self, feature_dim: int, device: torch.device) -> None:
        """Sum across ranks (every rank calls it; a rank that saw no images contributes zeros of `feature_dim`)."""
        self._complete_cpu_sum()
        if self.feature_sum is None:
            self.feature_sum = torch.zeros([feature_dim], dtype=torch.float64, device=device)
            self.outer_sum = torch.zeros([feature_dim, feature_dim], dtype=torch.float64, device=device)
        count = torch.tensor([self.num_local], dtype=torch.float64, device=self.feature_sum.device)
        distributed.all_reduce_sum_(self.feature_sum)
        distributed.all_reduce_sum_(self.outer_sum)
        distributed.all_reduce_sum_(count)
        self.num_total = int(count.item())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu float64[D], sigma float64[D, D]) after reduce_(), with EDM's exact sequence of operations."""
        if self.num_total is None:
            raise RuntimeError("call reduce_() before mean_cov()")
        num = self.num_total
        if num < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {num}")
        mu = self.feature_sum.clone()
        sigma = self.outer_sum.clone()
        mu /= num
        sigma -= mu.ger(mu) * num
        sigma /= num - 1
        return mu.cpu().numpy(), sigma.cpu().numpy()


def _checked_statistics(mu, sigma, mu_ref, sigma_ref) -> tuple[np.ndarray, ...]:
    """The four statistics as float64 arrays; a ValueError when the two sets' shapes differ."""
    mu, mu_ref = np.asarray(mu, dtype=np.float64), np.asarray(mu_ref, dtype=np.float64)
    sigma, sigma_ref = np.asarray(sigma, dtype=np.float64), np.asarray(sigma_ref, dtype=np.float64)
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape:
        raise ValueError(f"statistics do not match: mu {mu.shape} vs reference {mu_ref.shape}, "
                         f"sigma {sigma.shape} vs reference {sigma_ref.shape} (different feature detectors?)")
    return mu, sigma, mu_ref, sigma_ref


def frechet_distance(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FID = ‖μ − μ_ref‖² + Tr(Σ + Σ_ref − 2·sqrtm(Σ·Σ_ref)), real part.

    Identical to EDM's `calculate_fid_from_inception_stats` on every SciPy. EDM calls `sqrtm(A, disp=False)[0]`;
    `disp` only ever chose between printing a failure message and also returning an error estimate, and the matrix
    is the one `sqrtm(A)` returns (SciPy <= 1.15: Python Schur method; 1.16 and 1.17: recursive Schur in C, `disp`
    deprecated; 1.18: `disp` removed, so EDM's own call raises TypeError there). We call `sqrtm(A)`, which every
    SciPy accepts without a DeprecationWarning. tests/test_metrics.py checks our float bit for bit against EDM's call
    where SciPy accepts it, and against EDM's recorded value on every SciPy.
    """
    mu, sigma, mu_ref, sigma_ref = _checked_statistics(mu, sigma, mu_ref, sigma_ref)
    m = np.square(mu - mu_ref).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref))
    fid = m + np.trace(sigma + sigma_ref - s * 2)
    return float(np.real(fid))


def frechet_distance_eigvals(mu, sigma, mu_ref, sigma_ref) -> float:
    """The same distance through Tr sqrtm(Σ·Σ_ref) = Σ √λ_i(Σ·Σ_ref), the real part (torch-fidelity's route).

    Only the eigenvalues of the product, no Schur vectors and no matrix square root: 2.8-3.5x faster than `sqrtm`
    at 2048 features on one CPU thread (docs/performance.md), and ~1e-14 relative from EDM's float on full-rank
    statistics, not bit for bit. With fewer images than features (or dead features) Σ is singular, and there a
    matrix square root is accurate to about sqrt(machine epsilon), sqrtm's included: the two routes measured 1e-9 to
    6e-9 relative apart (tests/test_metrics.py, tests/test_fid_cli.py).
    """
    mu, sigma, mu_ref, sigma_ref = _checked_statistics(mu, sigma, mu_ref, sigma_ref)
    eigvals = np.linalg.eigvals(sigma @ sigma_ref).astype(np.complex128)
    trace_sqrt = np.sqrt(eigvals).sum().real
    return float(np.square(mu - mu_ref).sum() + np.trace(sigma) + np.trace(sigma_ref) - 2 * trace_sqrt)


# How the distance takes Tr sqrtm(Σ·Σ_ref) (fid.py calc --fid-route): EDM's float bit for bit by default, the faster
# eigenvalue route on request, as every speed option that changes EDM's numbers.
FRECHET_ROUTES = {"sqrtm": frechet_distance, "eigvals": frechet_distance_eigvals}
DEFAULT_FRECHET_ROUTE = "sqrtm"  # also the route of results recorded before the route was


# ---------------------------------------------------------------------------------------------------------------------
# Reference statistics files.


class ReferenceStatsError(ValueError):
    """A reference-statistics file that is missing, unreadable or lacks what a metric needs."""


def save_reference(path: str, mu: np.ndarray, sigma: np.ndarray, **extra: np.ndarray) -> None:
    """np.savez(path, mu=..., sigma=..., **extra), uncompressed as EDM, written atomically.

    EDM's fid.py reads only `mu` and `sigma`; extra arrays (e.g. `vgg16_features` for precision/recall,
    `num_images`) ride along without breaking it.
    """
    arrays = dict(mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    arrays.update({key: np.asarray(value) for key, value in extra.items()})
    # np.savez's archive, written by hand: NumPy < 2.1's np.savez does not close its ZipFile when a write fails (full
    # disk), which is then closed during garbage collection and prints a traceback after our one error line.
    with util.atomic_output(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, value)


class _NumpyOnlyUnpickler(persistence.GuardedUnpickler):
    """Unpickles EDM2's reference pickles (dicts of numpy arrays) without running arbitrary code (and with pickle's
    BUILD checked: a forged dtype state could otherwise make raw bytes object pointers)."""

    _allowed = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "dict"), ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"reference pickle refers to {module}.{name}, which is not a numpy array type")


FEATURE_KEYS = ("vgg16_features", "inception_features")  # per-image features some metrics keep in a reference

# A compressed .npz member that inflates more than this many times its stored size is refused: features and
# covariances compress by 1-2x (np.savez_compressed), a 1 MB member of zeros could fill the memory of every rank.
MAX_COMPRESSION_RATIO = 50


def load_reference(path_or_url: str, verbose: bool = True, keys=None) -> dict[str, np.ndarray]:
    """Load reference statistics: EDM's `.npz` (mu, sigma, ...) or EDM2's `.pkl` ({'fid': {mu, sigma}, ...}).

    Returns a dict of numpy arrays with at least `mu` and `sigma`; with `keys`, an .npz's other arrays are read only
    when named there (e.g. the feature arrays of P/R and KID, gigabytes for a large reference, stay on disk for FID).
    Raises ReferenceStatsError naming the file.
    """
    wanted = None if keys is None else {"mu", "sigma", "num_images", "image_shape", *keys}
    try:
        f = util.open_url(path_or_url, verbose=verbose)
    except (OSError, ValueError) as err:
        raise ReferenceStatsError(f"cannot open reference statistics {path_or_url!r}: {err}") from err
    try:
        with f:
            head = f.read(4)
            if head == b"PK\x03\x04":  # .npz is a zip archive (truncated or damaged: BadZipFile, zlib.error, ...)
                f.seek(0)
                ref = _read_npz(f, wanted, path_or_url)
            elif head[:1] == b"\x80":  # a pickle (EDM2's reference format)
                obj = _NumpyOnlyUnpickler(io.BytesIO(head + f.read())).load()
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a dict, got {type(obj).__name__}")
                ref = dict(obj.get("fid", obj))
                if not all(isinstance(key, str) for key in ref):
                    raise ValueError("expected a dict of named arrays")
                if "num_images" in obj:
                    ref["num_images"] = np.asarray(obj["num_images"])
            else:
                raise ValueError("neither an .npz archive nor a pickle")
    except ReferenceStatsError:
        raise
    except (ValueError, OSError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
            AttributeError, TypeError, IndexError, MemoryError, RecursionError, LookupError) as err:
        # The ways a truncated or bit-flipped file fails; MemoryError: an .npy header declaring 1e11 values.
        raise ReferenceStatsError(f"cannot read reference statistics {path_or_url!r} (truncated or damaged file?): "
                                  f"{type(err).__name__}: {err}") from err
    validate_reference(ref, path_or_url)
    return ref


def _read_npz(f, wanted, where: str) -> dict[str, np.ndarray]:
    with np.load(f, allow_pickle=False) as npz:
        ref = {}
        for key in npz.files:
            if wanted is not None and key not in wanted:
                continue
            info = npz.zip.getinfo(key + ".npy")
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSION_RATIO * max(
                    info.compress_size, 1 << 20):
                raise ReferenceStatsError(f"reference statistics {where!r}: {key} inflates from {info.compress_size} "
                                          f"to {info.file_size} bytes (more than {MAX_COMPRESSION_RATIO}x: not "
                                          f"statistics)")
            ref[key] = npz[key]
    return ref


def validate_reference(ref: dict, where: str) -> None:
    """Reference statistics must hold finite mu [D] and sigma [D, D], and, when present, finite real feature arrays
    [N, D'] (vgg16_features for P/R, inception_features for KID): checked when loaded, so that a bad file fails
    before the image pass, not after it."""
    missing = [key for key in ("mu", "sigma") if key not in ref]
    if missing:
        raise ReferenceStatsError(f"reference statistics {where!r} lack {', '.join(missing)} "
                                  f"(found: {', '.join(sorted(ref)) or 'nothing'})")
    arrays = {key: np.asarray(ref[key]) for key in ("mu", "sigma", *FEATURE_KEYS) if key in ref}
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ReferenceStatsError(f"reference statistics {where!r}: expected mu [D] and sigma [D, D], "
                                  f"got {list(mu.shape)} and {list(sigma.shape)}")
    for key in FEATURE_KEYS:
        if key in arrays and arrays[key].ndim != 2:
            raise ReferenceStatsError(f"reference statistics {where!r}: expected {key} [N, D], got "
                                      f"{list(arrays[key].shape)}")
    for key, array in arrays.items():
        if array.dtype.kind not in "fiu":
            raise ReferenceStatsError(f"reference statistics {where!r}: {key} has dtype {array.dtype}, expected "
                                      f"floating-point numbers")
        if not np.isfinite(array).all():
            count = int(np.size(array) - np.isfinite(array).sum())
            raise ReferenceStatsError(f"reference statistics {where!r}: {key} has {count} non-finite value(s) "
                                      f"(NaN or inf); rebuild the file with `fid.py ref`")


file_sha256 = util.file_sha256  # kept here for callers of the metrics API
