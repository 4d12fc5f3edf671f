"""Metric math (FID, IS, precision/recall), reference files, detectors and the single feature pass."""

import json
import math
import os
import pickle
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

from dnnlib import util
from metrics import detectors as detectors_lib
from metrics import evaluate, frechet, inception_score, precision_recall

# ---------------------------------------------------------------------------------------------------------------------
# FID


def _random_features(rng, num, dim, scale, shift):
    mixing = rng.standard_normal((dim, dim)) * scale / np.sqrt(dim)
    return rng.standard_normal((num, dim)) @ mixing + shift


def _moments_of(features, batch_size):
    moments = frechet.FeatureMoments()
    for start in range(0, len(features), batch_size):
        moments.update(torch.as_tensor(features[start:start + batch_size], dtype=torch.float32))
    moments.reduce_(features.shape[1], torch.device("cpu"))
    return moments.mean_cov()


def _fid_by_symmetric_eigh(mu1, s1, mu2, s2):
    """Independent route: Tr sqrtm(S1 S2) = Tr sqrtm(S1^½ S2 S1^½), the latter symmetric PSD."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))


def test_moments_equal_numpy_mean_and_unbiased_cov():
    rng = np.random.default_rng(0)
    features = _random_features(rng, 300, 24, 2.0, 0.5).astype(np.float32)
    mu, sigma = _moments_of(features, batch_size=37)
    ref = features.astype(np.float64)
    np.testing.assert_allclose(mu, ref.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False, ddof=1), rtol=1e-9, atol=1e-11)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64


def test_chunked_cpu_moments_equal_edm_per_batch_gemm():
    """The CPU route (float64 rows gathered into chunks, one symmetric rank-k update per chunk) against EDM's
    per-batch float64 GEMM: Σf bit for bit, Σffᵀ to a relative 1e-14 (only the order of the additions differs),
    exactly symmetric, with many chunks, one chunk, or none before reduce_()."""
    rng = np.random.default_rng(7)
    features = np.abs(_random_features(rng, 1000, 48, 1.0, 0.3)).astype(np.float32)
    feature_sum, outer_sum = torch.zeros(48, dtype=torch.float64), torch.zeros(48, 48, dtype=torch.float64)
    for start in range(0, 1000, 37):  # EDM: per batch, on the features' device
        batch = torch.from_numpy(features[start:start + 37]).to(torch.float64)
        feature_sum += batch.sum(0)
        outer_sum += batch.T @ batch
    for chunk_bytes in (1, 48 * 8 * 100, 64 << 20):  # a chunk per batch, ~every 3 batches, all in reduce_()
        moments = frechet.FeatureMoments(chunk_bytes=chunk_bytes)
        for start in range(0, 1000, 37):
            moments.update(torch.from_numpy(features[start:start + 37]))
        moments.reduce_(48, torch.device("cpu"))
        assert torch.equal(moments.feature_sum, feature_sum) and moments.num_total == 1000
        assert torch.equal(moments.outer_sum, moments.outer_sum.T)
        torch.testing.assert_close(moments.outer_sum, outer_sum, rtol=1e-14, atol=0)
    # float64 input rows are kept as copies: changing the caller's array afterwards changes nothing.
    rows = torch.ones(4, 3, dtype=torch.float64)
    moments = frechet.FeatureMoments()
    moments.update(rows)
    rows.fill_(5)
    moments.reduce_(3, torch.device("cpu"))
    assert torch.equal(moments.outer_sum, torch.full((3, 3), 4.0, dtype=torch.float64))


def test_fid_matches_eigenvalue_computation():
    rng = np.random.default_rng(1)
    for trial in range(3):
        dim = 16 + 16 * trial
        mu1, s1 = _moments_of(_random_features(rng, 400, dim, 1.0, 0.0).astype(np.float32), 64)
        mu2, s2 = _moments_of(_random_features(rng, 350, dim, 1.7, 0.3).astype(np.float32), 50)
        fid = frechet.frechet_distance(mu1, s1, mu2, s2)
        expected = _fid_by_symmetric_eigh(mu1, s1, mu2, s2)
        assert fid > 0.1
        assert abs(fid - expected) <= 1e-6 * expected
        assert abs(frechet.frechet_distance_eigvals(mu1, s1, mu2, s2) - expected) <= 1e-6 * expected


def test_fid_eigvals_route_is_close_to_edm_sqrtm_on_full_rank_and_singular_statistics():
    """The --fid-route eigvals distance against EDM's sqrtm route: within 1e-12 relative for well-conditioned
    statistics; for singular ones (fewer images than features) within 1e-7, the accuracy a square root of a singular
    matrix has at all (~sqrt(machine epsilon): sqrtm's own error is of that order); and the same refusal of
    statistics of different sizes."""
    rng = np.random.default_rng(7)
    for num, dim, rel in ((300, 48, 1e-12), (20, 48, 1e-7)):
        mu1, s1 = _moments_of(_random_features(rng, num, dim, 1.0, 0.0).astype(np.float32), 64)
        mu2, s2 = _moments_of(_random_features(rng, num, dim, 1.3, 0.2).astype(np.float32), 64)
        edm = frechet.frechet_distance(mu1, s1, mu2, s2)
        assert edm > 1
        assert frechet.frechet_distance_eigvals(mu1, s1, mu2, s2) == pytest.approx(edm, rel=rel, abs=0)
    assert frechet.FRECHET_ROUTES["eigvals"] is frechet.frechet_distance_eigvals
    with pytest.raises(ValueError, match=r"statistics do not match: mu \(48,\) vs reference \(4,\)"):
        frechet.frechet_distance_eigvals(mu1, s1, mu1[:4], s1[:4, :4])


def test_calc_metrics_refuses_an_unknown_fid_route_before_any_image():
    """calc_metrics' own check (the library path, without fid.py's click.Choice): before the source is touched."""
    with pytest.raises(evaluate.MetricsError, match=r"--fid-route: expected one of sqrtm, eigvals, got 'eigh'"):
        evaluate.calc_metrics(None, None, ["fid"], fid_route="eigh")


def test_fid_closed_form_for_diagonal_covariances():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 0 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_is_zero_for_identical_statistics():
    rng = np.random.default_rng(2)
    mu, sigma = _moments_of(_random_features(rng, 200, 32, 1.0, 1.0).astype(np.float32), 64)
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def _edm_fid(mu, sigma, mu_ref, sigma_ref):
    """EDM's fid.py `calculate_fid_from_inception_stats`, line for line (a TypeError on SciPy >= 1.18: no disp)."""
    m = np.square(mu - mu_ref).sum()
    s, _ = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref), disp=False)
    fid = m + np.trace(sigma + sigma_ref - s * 2)
    fid = float(np.real(fid))
    return fid


def _scipy_accepts_sqrtm_disp():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # SciPy 1.16 and 1.17
            scipy.linalg.sqrtm(np.eye(2), disp=False)
    except TypeError:
        return False
    return True


def test_fid_identical_to_edm_sqrtm_disp_false():
    """Where SciPy still accepts EDM's `sqrtm(..., disp=False)` (<= 1.17), our FID is EDM's float, bit for bit: for a
    well-conditioned pair of statistics and for a singular one (fewer images than feature dimensions)."""
    if not _scipy_accepts_sqrtm_disp():
        pytest.skip(f"SciPy {scipy.__version__} has no sqrtm(disp=), so EDM's own call cannot run here "
                    "(test_fid_equals_edm_recorded_values covers this SciPy)")
    rng = np.random.default_rng(3)
    for num, dim in ((200, 20), (12, 20)):
        mu1, s1 = _moments_of(_random_features(rng, num, dim, 1.0, 0.0).astype(np.float32), 64)
        mu2, s2 = _moments_of(_random_features(rng, num, dim, 1.3, 0.2).astype(np.float32), 64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            fid_edm = _edm_fid(mu1, s1, mu2, s2)
        assert np.isfinite(fid_edm) and fid_edm > 1
        assert frechet.frechet_distance(mu1, s1, mu2, s2) == fid_edm


def _legacy_random_stats(seed, num, dim, scale, shift):
    """(mu, sigma) of features from np.random.RandomState, whose stream NumPy keeps fixed across releases."""
    rs = np.random.RandomState(seed)
    mixing = rs.standard_normal((dim, dim)) * scale / np.sqrt(dim)
    features = rs.standard_normal((num, dim)) @ mixing + shift
    return features.mean(0), np.cov(features, rowvar=False)


# EDM's calculate_fid_from_inception_stats (_edm_fid above) on _legacy_random_stats(10, num, dim, 1.0, 0.0) against
# _legacy_random_stats(11, num, dim, 1.4, 0.25): the same float on SciPy 1.11.2 (NumPy 1.26.1), 1.15.3 and 1.16.0
# (NumPy 2.2.6) and 1.17.1 (NumPy 2.4.6). Recorded so that SciPy >= 1.18, where EDM's call no longer runs, is held to
# EDM's number as well.
EDM_FID_RECORDED = {(400, 32): 31.00855766244179, (300, 48): 47.44460356237203}


def test_fid_equals_edm_recorded_values():
    for (num, dim), fid_edm in EDM_FID_RECORDED.items():
        mu1, s1 = _legacy_random_stats(10, num, dim, 1.0, 0.0)
        mu2, s2 = _legacy_random_stats(11, num, dim, 1.4, 0.25)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # no deprecated SciPy argument on our path
            fid = frechet.frechet_distance(mu1, s1, mu2, s2)
        assert fid == pytest.approx(fid_edm, rel=1e-12, abs=0)
        if _scipy_accepts_sqrtm_disp():  # and here EDM's own call gives it again
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                assert _edm_fid(mu1, s1, mu2, s2) == fid


def test_fid_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="different feature detectors"):
        frechet.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------------------------------------------------
# Reference files


def test_reference_npz_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(8), rng.standard_normal((8, 8))
    features = rng.standard_normal((5, 6)).astype(np.float16)
    path = str(tmp_path / "refs" / "ref.npz")
    frechet.save_reference(path, mu, sigma, vgg16_features=features, num_images=np.int64(5))
    assert os.listdir(tmp_path / "refs") == ["ref.npz"]  # no temporary left behind
    with np.load(path) as npz:  # EDM reads it exactly like this
        assert set(npz.files) == {"mu", "sigma", "vgg16_features", "num_images"}
        assert npz["mu"].dtype == np.float64 and npz["sigma"].shape == (8, 8)
    ref = frechet.load_reference(path)
    np.testing.assert_array_equal(ref["mu"], mu)
    np.testing.assert_array_equal(ref["sigma"], sigma)
    np.testing.assert_array_equal(ref["vgg16_features"], features)
    assert ref["vgg16_features"].dtype == np.float16 and int(ref["num_images"]) == 5


def test_reference_edm2_pickle_loads_and_rejects_code(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    good = tmp_path / "ref.pkl"
    good.write_bytes(pickle.dumps(dict(num_images=7, fid=dict(mu=mu, sigma=sigma))))
    ref = frechet.load_reference(str(good))
    np.testing.assert_array_equal(ref["mu"], mu)
    assert int(ref["num_images"]) == 7

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(dict(fid=dict(mu=Evil(), sigma=sigma))))
    with pytest.raises(frechet.ReferenceStatsError, match="not a numpy array type"):
        frechet.load_reference(str(bad))


def test_reference_errors_name_the_file(tmp_path):
    with pytest.raises(frechet.ReferenceStatsError, match="cannot open reference statistics.*missing.npz"):
        frechet.load_reference(str(tmp_path / "missing.npz"))
    partial = tmp_path / "partial.npz"
    np.savez(partial, mu=np.zeros(3))
    with pytest.raises(frechet.ReferenceStatsError, match="lack sigma"):
        frechet.load_reference(str(partial))
    junk = tmp_path / "junk.npz"
    junk.write_text("not an archive")
    with pytest.raises(frechet.ReferenceStatsError, match="neither an .npz archive nor a pickle"):
        frechet.load_reference(str(junk))


def test_reference_reads_only_the_arrays_asked_for_and_refuses_compression_bombs(tmp_path):
    # FID needs mu and sigma: a reference's per-image features (gigabytes for 200k images) stay on disk, on every rank.
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(2), sigma=np.eye(2), vgg16_features=np.ones((3, 2)), inception_features=np.ones((3, 2)),
             num_images=np.int64(3))
    assert set(frechet.load_reference(str(path), keys=[])) == {"mu", "sigma", "num_images"}
    assert set(frechet.load_reference(str(path), keys=["inception_features"])) == {"mu", "sigma", "num_images",
                                                                                   "inception_features"}
    assert len(frechet.load_reference(str(path))) == 5
    # np.savez_compressed of real statistics loads; 512 MB of zeros in a 0.5 MB member does not.
    compressed = tmp_path / "compressed.npz"
    rng = np.random.default_rng(0)
    np.savez_compressed(compressed, mu=rng.standard_normal(4), sigma=np.eye(4) + 0.1)
    assert frechet.load_reference(str(compressed))["sigma"].shape == (4, 4)
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in (("mu", np.zeros(2)), ("sigma", np.eye(2))):
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array)
        with archive.open("vgg16_features.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, dict(descr="<f8", fortran_order=False, shape=(1 << 16, 1024)))
            zeros = bytes(1 << 24)
            for _ in range(32):
                member.write(zeros)
    assert bomb.stat().st_size < (1 << 20)
    assert set(frechet.load_reference(str(bomb), keys=[])) == {"mu", "sigma"}  # not asked for: not inflated
    with pytest.raises(frechet.ReferenceStatsError,
                       match=r"bomb.npz': vgg16_features inflates from \d+ to 5368\d{5} bytes"):
        frechet.load_reference(str(bomb), keys=["vgg16_features"])
    # A stored member whose header declares 1e11 values (745 GiB): one line, not a MemoryError traceback.
    huge = tmp_path / "huge.npz"
    with zipfile.ZipFile(huge, "w", zipfile.ZIP_STORED) as archive:
        with archive.open("mu.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, dict(descr="<f8", fortran_order=False, shape=(10 ** 11,)))
            member.write(bytes(64))
        with archive.open("sigma.npy", "w") as member:
            np.lib.format.write_array(member, np.eye(2))
    with pytest.raises(frechet.ReferenceStatsError, match=r"huge.npz' \(truncated or damaged file\?\): "
                                                          r"(MemoryError|ValueError)"):
        frechet.load_reference(str(huge))


def _npz_bytes(**arrays):
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_damaged_or_non_finite_references_fail_when_loaded(tmp_path):
    """Checked before any image is processed: truncated, bit-flipped, NaN/inf, non-numeric."""
    good = _npz_bytes(mu=np.arange(4.0), sigma=np.eye(4), vgg16_features=np.ones((3, 2), np.float16))
    cases = {
        "truncated": (good[: len(good) // 2], r"truncated\.npz' \(truncated or damaged file\?\): BadZipFile"),
        "empty": (b"", r"empty\.npz'.*neither an \.npz archive nor a pickle"),
        "mu-nan": (_npz_bytes(mu=np.array([0, np.nan, 0, 0]), sigma=np.eye(4)),
                   r"mu-nan\.npz': mu has 1 non-finite value\(s\) \(NaN or inf\)"),
        "sigma-inf": (_npz_bytes(mu=np.zeros(4), sigma=np.diag([1, np.inf, 1, -np.inf])),
                      r"sigma-inf\.npz': sigma has 2 non-finite value\(s\)"),
        "vgg-nan": (_npz_bytes(mu=np.zeros(2), sigma=np.eye(2), vgg16_features=np.full((2, 3), np.nan, np.float16)),
                    r"vgg-nan\.npz': vgg16_features has 6 non-finite"),
        "text": (_npz_bytes(mu=np.array(["a", "b"]), sigma=np.eye(2)), r"text\.npz': mu has dtype <U1"),
        "kid-nan": (_npz_bytes(mu=np.zeros(2), sigma=np.eye(2), inception_features=np.array([[0, np.nan]])),
                    r"kid-nan\.npz': inception_features has 1 non-finite"),
        "kid-complex": (_npz_bytes(mu=np.zeros(2), sigma=np.eye(2), inception_features=np.ones((2, 2), np.complex64)),
                        r"kid-complex\.npz': inception_features has dtype complex64"),
        "kid-1d": (_npz_bytes(mu=np.zeros(2), sigma=np.eye(2), inception_features=np.ones(2)),
                   r"kid-1d\.npz': expected inception_features \[N, D\], got \[2\]"),
    }
    flipped = bytearray(good)
    flipped[bytes(good).index(np.eye(4).tobytes()) + 8 * 5 + 7] ^= 0x40  # one bit of sigma[1, 1]
    cases["bit-flipped"] = (bytes(flipped), r"bit-flipped\.npz' \(truncated or damaged file\?\): BadZipFile: Bad CRC")
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(data)
        with pytest.raises(frechet.ReferenceStatsError, match=message):
            frechet.load_reference(str(path))
    (tmp_path / "good.npz").write_bytes(good)
    assert frechet.load_reference(str(tmp_path / "good.npz"))["mu"].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------------
# Inception Score


def _direct_is(probs, num_splits):
    """exp(E_x KL(p(y|x) || p(y))) per split, straight from the definition."""
    scores = []
    n = len(probs)
    for i in range(num_splits):
        part = probs[i * n // num_splits:(i + 1) * n // num_splits]
        marginal = part.mean(0)
        kl = [np.sum(p * (np.log(p) - np.log(marginal))) for p in part]
        scores.append(np.exp(np.mean(kl)))
    return np.array(scores)


def test_inception_score_streaming_equals_direct_per_split():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((103, 12)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = _direct_is(probs, 10)
    acc = inception_score.InceptionScoreAccumulator(len(probs), num_splits=10)
    order = rng.permutation(len(probs))  # ranks deliver images in any order; the global index decides the split
    for chunk in np.array_split(order, 7):
        acc.update(torch.as_tensor(probs[chunk], dtype=torch.float32), torch.as_tensor(chunk))
    acc.reduce_(12, torch.device("cpu"))
    mean, std, scores = acc.compute()
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert mean == pytest.approx(expected.mean(), rel=1e-6)
    assert std == pytest.approx(expected.std(), rel=1e-4)  # population std (numpy default), as StyleGAN2-ADA
    lib_mean, lib_std = inception_score.inception_score(probs, 10)
    assert lib_mean == pytest.approx(expected.mean(), rel=1e-12) and lib_std == pytest.approx(expected.std())


def test_inception_score_hand_made_tables():
    uniform = np.full((20, 5), 0.2)
    acc = inception_score.InceptionScoreAccumulator(20, num_splits=2)
    acc.update(torch.as_tensor(uniform), torch.arange(20))
    acc.reduce_(5, torch.device("cpu"))
    assert acc.compute()[0] == pytest.approx(1.0, abs=1e-12)
    # One-hot, all classes distinct within a split -> IS = number of classes in the split (underflowed zeros are fine).
    one_hot = np.tile(np.eye(4), (2, 1))
    acc = inception_score.InceptionScoreAccumulator(8, num_splits=2)
    acc.update(torch.as_tensor(one_hot), torch.arange(8))
    acc.reduce_(4, torch.device("cpu"))
    mean, std, scores = acc.compute()
    assert scores == pytest.approx([4.0, 4.0]) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_needs_one_image_per_split():
    with pytest.raises(ValueError, match="at least 10 images"):
        inception_score.InceptionScoreAccumulator(9, num_splits=10)


# ---------------------------------------------------------------------------------------------------------------------
# Precision / recall


def _line_features(values, dim=4):
    features = torch.zeros([len(values), dim])
    features[:, 0] = torch.tensor(values, dtype=torch.float32)
    return features


def test_precision_recall_identical_and_far_apart_sets():
    rng = torch.Generator().manual_seed(0)
    real = torch.randn([60, 8], generator=rng)
    assert precision_recall.precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_hand_computed_case():
    # k = 1: a point's radius is the distance to its nearest other point.
    # real {0, 1, 2, 10}: radii 1, 1, 1, 8.  gen {0.5, 2.5, 5, 20}: radii 2, 2, 2.5, 15.
    # precision: 0.5 (yes), 2.5 (yes), 5 (|5-10| = 5 <= 8 yes), 20 (|20-10| = 10 > 8 no) -> 3/4.
    # recall: 0, 1, 2 are within 2 of 0.5 or 2.5; 10 is within 15 of 20 -> 4/4.
    real, gen = _line_features([0, 1, 2, 10]), _line_features([0.5, 2.5, 5, 20])
    assert precision_recall.precision_recall(real, gen, nhood_size=1) == (0.75, 1.0)
    # k = 2: real radii 2, 1, 2, 9; gen radii 4.5, 2.5, 4.5, 17.5 -> precision 3/4 (20 is 10 > 9 from 10),
    # recall 4/4 (10 is 5 > 4.5 from 5, but 10 <= 17.5 from 20).
    assert precision_recall.precision_recall(real, gen, nhood_size=2) == (0.75, 1.0)
    # A probe exactly on a radius counts (<=, StyleGAN2-ADA's): gen 18 is 8 from real 10, whose radius is 8; just
    # beyond it (18.01) it does not. gen radii 2, 2, 2, 2: real 10 is 8 from 18 -> recall 3/4.
    boundary = precision_recall.precision_recall(real, _line_features([0.5, 2.5, 18, 20]), nhood_size=1)
    beyond = precision_recall.precision_recall(real, _line_features([0.5, 2.5, 18.01, 20]), nhood_size=1)
    assert boundary == (0.75, 0.75) and beyond == (0.5, 0.75)


def _brute_force_pr(real, gen, k):
    real, gen = real.to(torch.float16).double(), gen.to(torch.float16).double()

    def radii(points):
        return torch.cdist(points, points).kthvalue(k + 1, dim=1).values

    def covered(probes, manifold):
        return (torch.cdist(probes, manifold) <= radii(manifold)[None, :]).any(1).double().mean().item()

    return covered(gen, real), covered(real, gen)


def test_precision_recall_blocked_equals_brute_force():
    rng = torch.Generator().manual_seed(1)
    real = torch.randn([97, 6], generator=rng)
    gen = torch.randn([83, 6], generator=rng) * 1.4 + 0.3
    blocked = precision_recall.precision_recall(real, gen, nhood_size=3, row_batch_size=10, col_batch_size=7,
                                                dtype=torch.float32)
    expected = _brute_force_pr(real.to(torch.float16).float(), gen.to(torch.float16).float(), 3)
    assert blocked == pytest.approx(expected, abs=1e-12)
    assert 0.2 < blocked[0] < 1.0 and 0.2 < blocked[1] < 1.0
    default = precision_recall.precision_recall(real, gen, row_batch_size=10, col_batch_size=7)  # float16 as StyleGAN
    assert default == pytest.approx(expected, abs=2.5 / 83)  # float16 rounding may flip a borderline point


def test_precision_recall_needs_k_plus_one_points():
    with pytest.raises(ValueError, match="at least 4 points"):
        precision_recall.precision_recall(torch.randn(3, 4), torch.randn(10, 4))


# ---------------------------------------------------------------------------------------------------------------------
# Detectors


@pytest.fixture
def standin_paths(tmp_path):
    inception = detectors_lib.save_standin(detectors_lib.StandinInception(), str(tmp_path / "inception.pt"))
    vgg = detectors_lib.save_standin(detectors_lib.StandinVGG16(), str(tmp_path / "vgg16.pt"))
    detectors_lib._loaded.clear()
    return dict(inception=inception, vgg16=vgg)


def test_standin_detector_loads_and_follows_the_calling_convention(standin_paths):
    det = detectors_lib.load_detector("inception", standin_paths["inception"], device="cpu")
    images = torch.randint(0, 256, [5, 3, 20, 24], dtype=torch.uint8)
    features = det.features(images)
    probs = det.probabilities(images)
    assert features.shape == (5, 16) and det.feature_dim == 16 and det.num_classes == 10
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    with_bias = det.module(images)
    assert not torch.allclose(with_bias, probs)  # no_output_bias really drops the bias
    reference = detectors_lib.StandinInception()
    torch.testing.assert_close(features, reference(images, return_features=True))  # seeded: same weights
    assert det.sha256 == util._hash_file(standin_paths["inception"], "sha256")


def test_a_detector_file_replaced_at_the_same_path_is_read_again(standin_paths):
    # A notebook runs fid.py with --detector inception=PATH, then replaces PATH (another detector, a repaired copy):
    # the cache by path measured the next run with the first file and recorded that file's sha256 for the new one.
    path = standin_paths["inception"]
    first = detectors_lib.load_detector("inception", path, device="cpu")
    assert detectors_lib.load_detector("inception", path, device="cpu") is first  # the same file: cached
    detectors_lib.save_standin(detectors_lib.StandinInception(seed=5), path)
    second = detectors_lib.load_detector("inception", path, device="cpu")
    assert second.sha256 == util._hash_file(path, "sha256") != first.sha256
    images = torch.randint(0, 256, [3, 3, 16, 16], dtype=torch.uint8)
    torch.testing.assert_close(second.features(images),
                               detectors_lib.StandinInception(seed=5)(images, return_features=True))
    detectors_lib._loaded.clear()


def test_torch_jit_deprecation_is_silenced_for_detector_files_only(tmp_path, monkeypatch):
    """torch 2.14.1 and 2.15.0 warn (FutureWarning) on every torch.jit.script/save/load; the detector files are
    TorchScript, so reading or writing one must not warn users, while other FutureWarnings still pass. Simulated on
    any torch."""
    real_load, real_save = torch.jit.load, torch.jit.save

    def deprecated(real, name):
        def call(*args, **kwargs):
            warnings.warn(f"`torch.jit.{name}` is deprecated. Please switch to `torch.export`.", FutureWarning,
                          stacklevel=2)
            warnings.warn("another future change", FutureWarning, stacklevel=2)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(torch.jit, "load", deprecated(real_load, "load"))
    monkeypatch.setattr(torch.jit, "save", deprecated(real_save, "save"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = detectors_lib.save_standin(detectors_lib.StandinInception(), str(tmp_path / "inception.pt"))
        detectors_lib._loaded.clear()
        det = detectors_lib.load_detector("inception", path, device="cpu")
    assert det.feature_dim == 16
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert messages == ["another future change"] * 2  # save and load each passed the unrelated one on
    detectors_lib._loaded.clear()


def test_pickled_detector_format_loads(tmp_path):
    path = tmp_path / "vgg16.pkl"
    with open(path, "wb") as f:
        pickle.dump(detectors_lib.StandinVGG16(feature_dim=7), f)
    detectors_lib._loaded.clear()
    det = detectors_lib.load_detector("vgg16", str(path), device="cpu")
    assert det.feature_dim == 7
    assert det.features(torch.zeros([2, 3, 8, 8], dtype=torch.uint8)).shape == (2, 7)


def test_canonical_detector_is_read_from_the_download_cache(standin_paths, monkeypatch):
    url = detectors_lib.DETECTORS["vgg16"].url
    cache_path = os.path.join(util.make_cache_dir_path("downloads"), util._cache_file_name(url))
    os.makedirs(os.path.dirname(cache_path))
    with open(standin_paths["vgg16"], "rb") as src, open(cache_path, "wb") as dst:
        dst.write(src.read())
    monkeypatch.setattr(util, "_download", lambda *a, **k: pytest.fail("must not download a cached detector"))
    det = detectors_lib.load_detector("vgg16", device="cpu")
    assert det.source == url and det.feature_dim == 16


def test_unfetchable_detector_is_a_clear_error(monkeypatch, tmp_path):
    detectors_lib._loaded.clear()
    monkeypatch.setattr(util.time, "sleep", lambda s: None)
    spec = detectors_lib.DETECTORS["inception"]
    monkeypatch.setitem(detectors_lib.DETECTORS, "inception",
                        detectors_lib.DetectorSpec("http://127.0.0.1:9/inception-2015-12-05.pkl",
                                                   ("http://127.0.0.1:9/inception-2015-12-05.pt",), None,
                                                   spec.feature_kwargs, spec.probability_kwargs))
    with pytest.raises(detectors_lib.DetectorUnavailableError) as info:
        detectors_lib.load_detector("inception", device="cpu")
    message = str(info.value)
    assert "could not fetch the inception detector from http://127.0.0.1:9/" in message
    assert "--detector inception=PATH" in message and "inception-2015-12-05.pt" in message
    # The hint names the exact file the cache looks for; placing a copy there works offline.
    cache_file = util.url_cache_path("http://127.0.0.1:9/inception-2015-12-05.pkl")
    assert cache_file.endswith("_inception-2015-12-05.pkl") and "\n" not in message
    assert f"save http://127.0.0.1:9/inception-2015-12-05.pkl as {cache_file} " in message
    detectors_lib.save_standin(detectors_lib.StandinInception(), cache_file)
    assert detectors_lib.load_detector("inception", device="cpu").feature_dim == 16
    detectors_lib._loaded.clear()
    with pytest.raises(detectors_lib.DetectorUnavailableError, match="no such file"):
        detectors_lib.load_detector("inception", str(tmp_path / "nope.pt"), device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(detectors_lib.DetectorUnavailableError, match="neither a TorchScript archive nor a pickle"):
        detectors_lib.load_detector("inception", str(junk), device="cpu")


def test_detector_with_wrong_signature_is_rejected(tmp_path):
    class NoKwargs(torch.nn.Module):
        def forward(self, img: torch.Tensor) -> torch.Tensor:
            return img.float().mean([2, 3])

    path = detectors_lib.save_standin(NoKwargs(), str(tmp_path / "bad.pt"))
    detectors_lib._loaded.clear()
    with pytest.raises(detectors_lib.DetectorUnavailableError, match="calling convention"):
        detectors_lib.load_detector("inception", path, device="cpu")


def test_detector_returning_logits_is_rejected(tmp_path):
    class Logits(torch.nn.Module):
        def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                    no_output_bias: bool = False) -> torch.Tensor:
            return img.float().mean([2, 3]) + 5.0

    path = detectors_lib.save_standin(Logits(), str(tmp_path / "logits.pt"))
    detectors_lib._loaded.clear()
    with pytest.raises(detectors_lib.DetectorUnavailableError, match="expected softmax probabilities"):
        detectors_lib.load_detector("inception", path, device="cpu")


class _NaNForWhiteImages(detectors_lib.StandinInception):
    """The stand-in, but NaN features for all-white images (the probe's blank image passes)."""

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        out = super().forward(img, return_features=return_features, no_output_bias=no_output_bias)
        white = (img == 255).flatten(1).all(1)
        return torch.where(white[:, None], torch.full_like(out, math.nan), out)


def test_detector_or_images_giving_nan_features_are_refused(tmp_path):
    # Damaged weights: fid.py ref wrote NaN statistics (which calc refused, saying to rebuild them with fid.py ref),
    # calc stopped with scipy's "Internal error in scipy.linalg.sqrtm: -102", and IS passed its sum-to-1 check.
    damaged = detectors_lib.StandinInception()
    with torch.no_grad():
        damaged.trunk.layers[0].weight.fill_(math.nan)
    path = detectors_lib.save_standin(damaged, str(tmp_path / "damaged.pt"))
    detectors_lib._loaded.clear()
    with pytest.raises(detectors_lib.DetectorUnavailableError, match="gives NaN or inf for a blank image: its "
                                                                     "weights are damaged"):
        detectors_lib.load_detector("inception", path, device="cpu")
    # NaN for some images only: the statistics are refused, not returned (nor saved as a reference).
    detector = _inception(_NaNForWhiteImages())
    images = torch.randint(0, 256, [8, 3, 12, 12], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[3] = 255
    with pytest.raises(evaluate.MetricsError, match="gave NaN or inf features for some of the images"):
        _run_feature_pass(["fid"], {"inception": detector}, images)
    images[3] = 0  # the same detector on images it handles: statistics as before
    stats = _run_feature_pass(["fid"], {"inception": detector}, images)
    with torch.no_grad():
        features = detectors_lib.StandinInception()(images, return_features=True).double().numpy()
    np.testing.assert_allclose(stats["mu"], features.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["sigma"], np.cov(features, rowvar=False), rtol=1e-5, atol=1e-7)


class _VGGNaNForWhiteImages(detectors_lib.StandinVGG16):
    def forward(self, img, resize_images: bool = True, return_features: bool = False, return_lpips: bool = False):
        out = super().forward(img)
        return torch.where((img == 255).flatten(1).all(1)[:, None], torch.full_like(out, math.nan), out)


def test_nan_features_of_some_images_are_refused_for_kid_and_pr():
    # The rows KID and P/R keep: a NaN row's distances compare False, so both gave numbers (and a reference kept them).
    vgg = detectors_lib.Detector("vgg16", _VGGNaNForWhiteImages(), "test", "0" * 64, detectors_lib.DETECTORS["vgg16"])
    detectors_lib._probe(vgg, torch.device("cpu"))
    detectors = {"inception": _inception(_NaNForWhiteImages()), "vgg16": vgg}
    images = torch.randint(0, 256, [8, 3, 12, 12], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for metric, detector in [("kid", "inception"), ("pr", "vgg16")]:
        stats = _run_feature_pass([metric], detectors, images)  # finite: the rows as the detector gives them
        with torch.no_grad():
            expected = detectors[detector].features(images).to(stats[f"{metric}_features"].dtype)
        torch.testing.assert_close(stats[f"{metric}_features"], expected, rtol=1e-3, atol=1e-5)
        white = images.clone()
        white[5] = 255
        with pytest.raises(evaluate.MetricsError, match=f"the {detector} detector .* gave NaN or inf features for "
                                                        f"some of the images"):
            _run_feature_pass([metric], detectors, white)


def test_parse_detector_overrides():
    assert detectors_lib.parse_detector_overrides(["inception=a.pt", "vgg16=https://x/y.pkl"]) == {
        "inception": "a.pt", "vgg16": "https://x/y.pkl"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        detectors_lib.parse_detector_overrides(["a.pt"])
    with pytest.raises(ValueError, match="NAME=PATH"):
        detectors_lib.parse_detector_overrides(["resnet=a.pt"])


# ---------------------------------------------------------------------------------------------------------------------
# Sharding and the single pass


def test_rank_batches_follow_edm_split():
    for num, batch, world in [(10, 3, 1), (10, 3, 2), (5, 4, 3), (64, 8, 4)]:
        per_rank = [evaluate.rank_batches(num, batch, rank, world) for rank in range(world)]
        expected = torch.arange(num).tensor_split(((num - 1) // (batch * world) + 1) * world)
        assert all(len(b) == len(per_rank[0]) for b in per_rank)  # every rank runs the same number of iterations
        for rank in range(world):
            for got, want in zip(per_rank[rank], expected[rank::world]):
                assert torch.equal(got, want) and len(got) <= batch
        assert sorted(torch.cat([b for bs in per_rank for b in bs]).tolist()) == list(range(num))


def test_parse_metrics_and_labels():
    assert evaluate.parse_metrics("FID, is,pr,fid") == ["fid", "is", "pr"]
    with pytest.raises(evaluate.MetricsError, match="unknown metric.*fdd"):
        evaluate.parse_metrics("fid,fdd")
    assert evaluate.parse_metrics("kid,fid") == ["kid", "fid"] and evaluate.metric_label("kid", 50000) == "kid50k_full"
    assert [evaluate.metric_label(m, 50000) for m in ("fid", "is", "pr")] == ["fid50k_full", "is50k", "pr50k3_full"]
    assert evaluate.metric_label("pr", 1234) == "pr1234_3_full"
    assert evaluate.format_int_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def _structured_images(rng, num, channels=3, size=12):
    """Noise around a per-image colour: features then vary between images far more than within (like photos)."""
    levels = rng.integers(20, 236, (num, channels, 1, 1))
    return np.clip(levels + rng.integers(-20, 21, (num, channels, size, size)), 0, 255).astype(np.uint8)


def _write_images(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image.transpose(1, 2, 0).squeeze(2) if image.shape[0] == 1 else
                            image.transpose(1, 2, 0)).save(os.path.join(folder, f"{i:06d}.png"))


def test_dataset_pass_matches_direct_computation_folder_zip_and_subset(tmp_path, standin_paths):
    rng = np.random.default_rng(6)
    images = _structured_images(rng, 30)
    _write_images(tmp_path / "imgs", images)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(os.listdir(tmp_path / "imgs")):
            zf.write(tmp_path / "imgs" / name, arcname=name)
    detectors = evaluate.load_detectors(["fid", "is", "pr"], standin_paths, torch.device("cpu"))
    net = detectors_lib.StandinInception()
    vgg = detectors_lib.StandinVGG16()

    # Exactly EDM's subset rule: RandomState(seed) shuffle of 0..N-1, first `num`, sorted.
    chosen = np.arange(30)
    np.random.RandomState(7).shuffle(chosen)
    chosen = np.sort(chosen[:20])
    subset = torch.as_tensor(images[chosen])
    with torch.no_grad():
        features = net(subset, return_features=True).double().numpy()
        probs = net(subset, no_output_bias=True).double().numpy()
        vgg_features = vgg(subset, return_features=True).to(torch.float16)

    for path in [tmp_path / "imgs", tmp_path / "imgs.zip"]:
        source = evaluate.dataset_source(str(path), num=20, seed=7, batch_size=6, num_workers=0)
        stats = evaluate.run_pass(source, ["fid", "is", "pr"], detectors, torch.device("cpu"), progress=False)
        np.testing.assert_allclose(stats["mu"], features.mean(0), rtol=1e-6)
        expected_sigma = np.cov(features, rowvar=False)
        np.testing.assert_allclose(stats["sigma"], expected_sigma, rtol=0, atol=1e-5 * np.abs(expected_sigma).max())
        np.testing.assert_allclose(stats["is_scores"], _direct_is(probs, 10), rtol=1e-5)
        torch.testing.assert_close(stats["pr_features"], vgg_features, rtol=1e-3, atol=1e-3)


def test_pr_features_are_limited_to_the_first_max_items(standin_paths):
    detectors = evaluate.load_detectors(["pr"], standin_paths, torch.device("cpu"))
    images = torch.randint(0, 256, [10, 3, 8, 8], dtype=torch.uint8)
    feature_pass = evaluate.FeaturePass(["pr"], detectors, 10, pr_max_items=4)
    for chunk in [torch.tensor([5, 1, 7]), torch.tensor([3, 0, 9, 2]), torch.tensor([4, 6, 8])]:
        feature_pass.update(chunk, images[chunk])
    features = feature_pass.finalize(torch.device("cpu"))["pr_features"]
    expected = detectors["vgg16"].features(images[:4]).to(torch.float16)  # indices 0..3, in index order
    assert features.dtype == torch.float16
    torch.testing.assert_close(features, expected, rtol=1e-3, atol=1e-3)


def test_kid_reference_keeps_a_seeded_uniform_subset_when_capped(standin_paths):
    """P/R keep the first max_items images (StyleGAN2-ADA); KID a uniform subset of that size, so that a class-sorted
    dataset (ImageNet's folders) is not cut down to its first classes."""
    detectors = evaluate.load_detectors(["kid"], standin_paths, torch.device("cpu"))
    images = torch.randint(0, 256, [10, 3, 8, 8], dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    keep = np.sort(np.random.RandomState(0).choice(10, 4, replace=False))  # the rule, written out
    assert not np.array_equal(keep, np.arange(4))
    feature_pass = evaluate.FeaturePass(["kid"], detectors, 10, pr_max_items=4)
    for chunk in [torch.tensor([5, 1, 7]), torch.tensor([3, 0, 9, 2]), torch.tensor([4, 6, 8])]:
        feature_pass.update(chunk, images[chunk])
    features = feature_pass.finalize(torch.device("cpu"))["kid_features"]
    expected = detectors["inception"].features(images[torch.as_tensor(keep)])  # in index order
    torch.testing.assert_close(features, expected.to(torch.float32))
    assert evaluate.kid_reference_rows(10, 10) is None and evaluate.kid_reference_rows(10, None) is None
    big = evaluate.kid_reference_rows(100_000, 20_000)
    assert int(big.sum()) == 20_000 and abs(big[:50_000].float().mean().item() - 0.2) < 0.01  # uniform


def test_kid_reference_of_another_detector_fails_before_the_pass(tmp_path, standin_paths):
    def no_pass(device):
        raise AssertionError("the image pass must not start")

    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(16), sigma=np.eye(16), inception_features=np.zeros((5, 8), dtype=np.float32))
    source = evaluate.ImageSource(num_images=4, batches=no_pass, num_rank_batches=1, description={})
    with pytest.raises(evaluate.ReferenceStatsError, match=r"Inception features in .* have shape \[5, 8\], but the "
                                                           r"inception detector .* gives 16-d features"):
        evaluate.calc_metrics(source, str(ref), ["kid"], detector_paths=standin_paths, device=torch.device("cpu"))


def test_images_with_alpha_are_a_clear_error(tmp_path):
    folder = tmp_path / "rgba"
    folder.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full((8, 8, 4), 60 * i, dtype=np.uint8), "RGBA").save(folder / f"{i}.png")
    with pytest.raises(evaluate.MetricsError, match=r"rgba: images have 4 channels; the detectors read RGB"):
        evaluate.dataset_source(str(folder), num_workers=0)


def test_compute_reference_checks_dest_before_the_pass(tmp_path):
    def no_pass(device):
        raise AssertionError("the image pass must not start")

    source = evaluate.ImageSource(num_images=4, batches=no_pass, num_rank_batches=1, description={})
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(util.OutputPathError, match=r"^dest: cannot create .*file\.txt/ref\.npz: .*file\.txt is a file"):
        evaluate.compute_reference(source, str(tmp_path / "file.txt" / "ref.npz"), detector_paths={})


def test_too_few_images_is_a_clear_error(tmp_path):
    _write_images(tmp_path / "few", np.zeros((3, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(evaluate.MetricsError,
                       match=r"found 3 images in .*few, but expected at least 5 \(--num-images\)"):
        evaluate.dataset_source(str(tmp_path / "few"), num=5, num_workers=0)
    _write_images(tmp_path / "one", np.zeros((1, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(evaluate.MetricsError, match=r"found 1 image in .*one, but expected at least 2 "):
        evaluate.dataset_source(str(tmp_path / "one"), num=2, num_workers=0)


def test_grayscale_images_are_repeated_to_rgb(standin_paths):
    detectors = evaluate.load_detectors(["fid"], standin_paths, torch.device("cpu"))
    gray = torch.randint(0, 256, [6, 1, 10, 10], dtype=torch.uint8)
    fp_gray = evaluate.FeaturePass(["fid"], detectors, 6)
    fp_gray.update(torch.arange(6), gray)
    fp_rgb = evaluate.FeaturePass(["fid"], detectors, 6)
    fp_rgb.update(torch.arange(6), gray.repeat(1, 3, 1, 1))
    assert torch.equal(fp_gray.moments.feature_sum, fp_rgb.moments.feature_sum)


class _CountingDetector(torch.nn.Module):
    """A detector module that counts its calls (delegating to `inner`)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.output = getattr(inner, "output", None)
        self.calls = []

    def forward(self, img, return_features=False, use_fp16=False, no_output_bias=False):
        self.calls.append("features" if return_features else "probabilities")
        return self.inner(img, return_features=return_features, no_output_bias=no_output_bias)


class _TemperedInception(detectors_lib.StandinInception):
    """Probabilities that are NOT softmax(features x output.weight^T): the one-pass route must not be used."""

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        features = self.trunk(img)
        if return_features:
            return features
        return torch.softmax(features @ self.output.weight.t() / 2, dim=1)


def _inception(module):
    spec = detectors_lib.DETECTORS["inception"]
    detector = detectors_lib.Detector("inception", module, "test", "0" * 64, spec)
    detectors_lib._probe(detector, torch.device("cpu"))
    return detector


def _run_feature_pass(metrics, detectors, images, batch=7):
    feature_pass = evaluate.FeaturePass(metrics, detectors, len(images), is_splits=2)
    for lo in range(0, len(images), batch):
        feature_pass.update(torch.arange(lo, min(lo + batch, len(images))), images[lo:lo + batch])
    return feature_pass.finalize(torch.device("cpu"))


def test_fid_and_is_take_one_detector_pass_with_the_same_numbers():
    images = torch.randint(0, 256, [30, 3, 12, 12], dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    one_pass = _inception(_CountingDetector(detectors_lib.StandinInception()))
    assert one_pass.head_weight is not None and one_pass.describe()["probabilities"].startswith(
        "from the features (one pass: softmax of features x output.weight^T; max difference 0.0e+00")
    one_pass.module.calls.clear()
    stats = _run_feature_pass(["fid", "is", "kid"], {"inception": one_pass}, images)
    assert one_pass.module.calls == ["features"] * 5  # 30 images in batches of 7: one call per batch

    # Against the detector's own probability call, made separately (the route without the head), and direct values.
    two_passes = _inception(_CountingDetector(detectors_lib.StandinInception()))
    two_passes.head_weight = None
    two_passes.module.calls.clear()
    expected = _run_feature_pass(["fid", "is", "kid"], {"inception": two_passes}, images)
    assert two_passes.module.calls == ["features", "probabilities"] * 5
    for key in ("mu", "sigma", "is_mean", "is_std", "is_scores", "kid_features"):
        assert np.array_equal(np.asarray(stats[key]), np.asarray(expected[key])), key
    net = detectors_lib.StandinInception()
    with torch.no_grad():
        probs = net(images, no_output_bias=True).double().numpy()
    np.testing.assert_allclose(stats["is_scores"], _direct_is(probs, 2), rtol=1e-6)


def test_a_detector_whose_head_does_not_match_keeps_two_passes():
    images = torch.randint(0, 256, [14, 3, 12, 12], dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    tempered = _inception(_CountingDetector(_TemperedInception()))
    route = tempered.describe()["probabilities"]
    assert tempered.head_weight is None and route.startswith(
        "separate pass (softmax of features x output.weight^T differs by ") and "from the detector's" in route
    tempered.module.calls.clear()
    stats = _run_feature_pass(["fid", "is"], {"inception": tempered}, images)
    assert tempered.module.calls == ["features", "probabilities"] * 2
    with torch.no_grad():
        probs = _TemperedInception()(images, no_output_bias=True).double().numpy()
    np.testing.assert_allclose(stats["is_scores"], _direct_is(probs, 2), rtol=1e-6)

    class NoHead(torch.nn.Module):  # probabilities from somewhere the suite cannot see
        def __init__(self):
            super().__init__()
            self.net = detectors_lib.StandinInception()

        def forward(self, img, return_features=False, use_fp16=False, no_output_bias=False):
            return self.net(img, return_features=return_features, no_output_bias=no_output_bias)

    no_head = _inception(NoHead())
    assert no_head.head_weight is None
    assert no_head.describe()["probabilities"] == "separate pass (the detector has no output.weight)"
    wrong_shape = _CountingDetector(detectors_lib.StandinInception())
    wrong_shape.output = torch.nn.Linear(3, 10)
    wrong = _inception(wrong_shape)
    assert wrong.head_weight is None
    assert wrong.describe()["probabilities"] == "separate pass (output.weight is [10, 3], not [10, 16])"

    class HalfFeatures(_CountingDetector):  # features in float16: the head (float32) cannot take them
        def forward(self, img, return_features=False, use_fp16=False, no_output_bias=False):
            out = super().forward(img, return_features, use_fp16, no_output_bias)
            return out.half() if return_features else out

    half = _inception(HalfFeatures(detectors_lib.StandinInception()))
    assert half.head_weight is None and half.describe()["probabilities"].startswith(
        "separate pass (the head route failed: RuntimeError: ")
    vgg = detectors_lib.Detector("vgg16", detectors_lib.StandinVGG16(), "test", "0" * 64,
                                 detectors_lib.DETECTORS["vgg16"])
    detectors_lib._probe(vgg, torch.device("cpu"))
    assert "probabilities" not in vgg.describe()


# ---------------------------------------------------------------------------------------------------------------------
# KID.


def _mmd2_by_pairs(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, summed pair by pair (independent of the matrix form)."""
    m, d = len(x), len(x[0])

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_against_pairwise_computation():
    from metrics.kid import kernel_inception_distance, mmd2_unbiased

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(loc=0.3, size=(9, 5))
    assert mmd2_unbiased(torch.as_tensor(x[:6]), torch.as_tensor(y[:6])) == pytest.approx(
        _mmd2_by_pairs(x[:6].tolist(), y[:6].tolist()), rel=1e-12)
    # Subsets as torch-fidelity draws them: RandomState(seed), generated rows then real rows, without replacement.
    mean, std = kernel_inception_distance(torch.as_tensor(x), torch.as_tensor(y), num_subsets=4, subset_size=5, seed=3)
    chooser = np.random.RandomState(3)
    values = []
    for _ in range(4):
        rows_x, rows_y = chooser.choice(7, 5, replace=False), chooser.choice(9, 5, replace=False)
        values.append(_mmd2_by_pairs(x[rows_x].tolist(), y[rows_y].tolist()))
    assert mean == pytest.approx(np.mean(values), rel=1e-12) and std == pytest.approx(np.std(values), rel=1e-9)
    # The same distribution gives about 0; subsets are capped by the smaller set.
    same = torch.as_tensor(rng.normal(size=(400, 8)))
    assert abs(kernel_inception_distance(same[:200], same[200:], num_subsets=10)[0]) < 0.02
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(same[:1], same)


def test_kid_through_fid_py_ref_and_calc(tmp_path, standin_paths):
    from click.testing import CliRunner

    import fid
    from metrics.kid import kernel_inception_distance

    rng = np.random.default_rng(5)
    real, generated = _structured_images(rng, 24), _structured_images(rng, 16)
    _write_images(tmp_path / "real", real)
    _write_images(tmp_path / "gen", generated)
    detector_args = ["--detector", f"inception={standin_paths['inception']}", "--detector",
                     f"vgg16={standin_paths['vgg16']}", "--workers", "0", "--batch", "5"]
    result = CliRunner().invoke(fid.main, ["ref", "--data", str(tmp_path / "real"), "--dest",
                                           str(tmp_path / "ref.npz"), "--metrics", "fid,kid", *detector_args])
    assert result.exit_code == 0, result.output
    gen = str(tmp_path / "gen")
    result = CliRunner().invoke(fid.main, ["calc", "--images", gen, "--ref", str(tmp_path / "ref.npz"),
                                           "--num-images", "16", "--metrics", "fid,kid", "--out",
                                           str(tmp_path / "r.json"), *detector_args])
    assert result.exit_code == 0, result.output
    record = json.load(open(tmp_path / "r.json"))
    net = detectors_lib.StandinInception()
    with torch.no_grad():
        f_real = net(torch.as_tensor(real), return_features=True).double()
        f_gen = net(torch.as_tensor(generated), return_features=True).double()
    with np.load(tmp_path / "ref.npz") as ref:
        np.testing.assert_allclose(ref["inception_features"], f_real.numpy(), rtol=1e-5, atol=1e-6)
    expected = kernel_inception_distance(f_gen, f_real)
    assert record["results"]["kid"] == pytest.approx(expected[0], rel=1e-5, abs=1e-9)
    assert record["results"]["kid_std"] == pytest.approx(expected[1], rel=1e-4, abs=1e-9)
    assert record["labels"]["kid"] == "kid16_full" and "kid16_full " in result.output
    # An EDM reference (mu/sigma only) cannot serve KID: one clear line before the pass.
    np.savez(tmp_path / "edm.npz", mu=np.zeros(16), sigma=np.eye(16))
    result = CliRunner().invoke(fid.main, ["calc", "--images", gen, "--ref", str(tmp_path / "edm.npz"),
                                           "--metrics", "kid", "--num-images", "16", *detector_args])
    assert result.exit_code == 1 and "hold no Inception features for KID" in result.output


def test_feature_pass_batches_make_no_blocking_copy_and_read_nothing_back(monkeypatch):
    """Per batch, the pass neither reads a device value on the host nor makes a blocking host-to-device copy (on a
    GPU both wait for the batch's detector pass). Run on the meta device, where reading a value back raises, with
    every CPU-to-device copy logged; KID's and P/R's indices stay on the host until finalize (two and one blocking
    copies per batch before)."""
    from metrics.evaluate import FeaturePass
    meta = torch.device("meta")

    class MetaDetector:
        feature_dim, num_classes = 16, 10

        def features(self, images):
            return torch.empty(images.shape[0], self.feature_dim, device=meta)

        def probabilities(self, images):
            return torch.empty(images.shape[0], self.num_classes, device=meta)

        def features_and_probabilities(self, images):
            return self.features(images), self.probabilities(images)

    blocking, to = [], torch.Tensor.to

    def logged_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu" and not kwargs.get("non_blocking", False):
            blocking.append(self.shape)
        return out

    monkeypatch.setattr(torch.Tensor, "to", logged_to)
    detectors = {"inception": MetaDetector(), "vgg16": MetaDetector()}
    for metrics, cap in ((["fid", "is", "kid", "pr"], None), (["kid", "pr"], 40)):
        feature_pass = FeaturePass(metrics, detectors, num_images=64, pr_max_items=cap)
        for start in range(0, 64, 16):
            feature_pass.update(torch.arange(start, start + 16), torch.zeros(16, 3, 8, 8, dtype=torch.uint8,
                                                                             device=meta))
        assert blocking == [], (metrics, cap, blocking)


def test_network_source_indexes_images_in_png_file_name_order(monkeypatch):
    """Image i of `calc --network` is the i-th PNG generate.py writes for those seeds, read in sorted name order (as
    `calc --images` reads them), whatever order --seeds gives; sampling keeps the given order (generate.py's
    batches)."""
    import samplers.generation

    sampled_batches = []

    def fake_generate_images(net, seeds, batch_size, device, **kwargs):
        for batch in evaluate.rank_batches(len(seeds), batch_size):
            batch_seeds = [seeds[i] for i in batch.tolist()]
            sampled_batches.append(batch_seeds)
            yield batch_seeds, torch.tensor(batch_seeds, dtype=torch.int64)  # the "image" is its seed

    monkeypatch.setattr(samplers.generation, "generate_images", fake_generate_images)
    for seeds, expected in [([*range(14, 26), *range(3, 14)], list(range(3, 26))),
                            # 7-digit names sort before 6-digit ones that start with a higher digit, as in the folder
                            ([999999, 1000000, 5], [5, 1000000, 999999])]:
        sampled_batches.clear()
        source = evaluate.network_source(None, seeds, batch_size=4)
        by_index = {}
        for indices, images in source.batches(torch.device("cpu")):
            by_index.update(zip(indices.tolist(), images.tolist()))
        assert [by_index[i] for i in range(len(seeds))] == expected
        assert sampled_batches == [seeds[i:i + 4] for i in range(0, len(seeds), 4)]  # generated in the given order
        names = [os.path.basename(samplers.generation.image_path("out", s)) for s in expected]
        assert names == sorted(names)


def test_kid_defaults_are_torch_fidelitys():
    """The defaults the evaluation uses (no test passed them implicitly): 100 subsets of 1000 rows drawn by
    RandomState(2020), against an independent loop."""
    from metrics import kid

    assert (kid.KID_SUBSETS, kid.KID_SUBSET_SIZE, kid.KID_SEED) == (100, 1000, 2020)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1200, 16)), rng.normal(loc=0.1, size=(1100, 16))
    mean, std = kid.kernel_inception_distance(torch.as_tensor(x), torch.as_tensor(y))
    chooser, values = np.random.RandomState(2020), []
    for _ in range(100):
        a, b = x[chooser.choice(1200, 1000, replace=False)], y[chooser.choice(1100, 1000, replace=False)]
        k_xx, k_yy, k_xy = ((p @ q.T / 16 + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
        values.append((k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (1000 * 999)
                      - 2 * k_xy.mean())
    assert mean == pytest.approx(np.mean(values), rel=1e-10) and std == pytest.approx(np.std(values), rel=1e-8)
    assert mean == pytest.approx(0.02472810301027006, rel=1e-9)


def test_precision_recall_compares_float16_distances_on_the_cpu():
    """StyleGAN2-ADA compares float16 distances (its CUDA cdist); the CPU path rounds float32 distances to float16:
    a probe at 3.00065 from the nearest point, which rounds to 3.0, lies within that point's radius of exactly 3."""
    from metrics.precision_recall import coverage, manifold_radii

    manifold = torch.tensor([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0]], dtype=torch.float16)
    radii = manifold_radii(manifold, 3)
    assert radii.tolist() == [3, 2, 2, 2, 3]
    probe = torch.tensor([[-3, 0.0625]], dtype=torch.float16)
    assert torch.linalg.norm(probe.float()).item() == pytest.approx(3.00065, abs=1e-5)
    assert coverage(probe, manifold, radii) == 1.0


def test_inception_score_default_splits_is_ten():
    import inspect

    from metrics.inception_score import inception_score
    assert inspect.signature(inception_score).parameters["num_splits"].default == 10


def test_kept_feature_rows_come_in_image_order_and_the_batch_lists_are_let_go():
    # P/R and KID keep their features per batch; joined at the end in image-index order (batches arrive in any order
    # across ranks and workers), and the batch lists are emptied then, not held beside the joined copy.
    from metrics import evaluate
    index_batches = [torch.tensor([2, 3]), torch.tensor([0, 1]), torch.tensor([4])]
    feature_batches = [torch.full([len(i), 3], 0.0) + i[:, None].float() for i in index_batches]
    rows = evaluate._rows_in_image_order(index_batches, feature_batches, 3, torch.float32, torch.device("cpu"))
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4] and rows.shape == (5, 3)
    assert index_batches == [] and feature_batches == []
    in_order = evaluate._rows_in_image_order([torch.tensor([0, 1])], [torch.eye(2)], 2, torch.float32,
                                             torch.device("cpu"))
    assert torch.equal(in_order, torch.eye(2))
    empty = evaluate._rows_in_image_order([], [], 4, torch.float16, torch.device("cpu"))
    assert empty.shape == (0, 4) and empty.dtype == torch.float16


def test_an_added_metric_of_inception_features_runs_alone_and_prints(standin_paths, monkeypatch):
    """A metric added by its METRICS entry (docs/design.md §6) that reads the Inception features gets them even when
    it is the only one requested (the pass decided from FID/KID by name before: an UnboundLocalError), and its one
    number is printed under its label; `metrics_needing_reference` reads the entries."""
    monkeypatch.setitem(evaluate.METRICS, "mfn", dict(detector="inception", reads="features", label="mfn{n}",
                                                      description="mean feature norm (test)"))
    detectors = evaluate.load_detectors(["mfn"], standin_paths, torch.device("cpu"))
    calls = []
    features = detectors["inception"].features
    monkeypatch.setattr(detectors["inception"], "features", lambda images: calls.append(len(images)) or
                        features(images))
    images = torch.randint(0, 256, [9, 3, 8, 8], dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    _run_feature_pass(["mfn"], detectors, images, batch=4)
    assert calls == [4, 4, 1]
    record = dict(results={"fid": 1.5, "mfn": 2.25}, labels={"fid": "fid9_full", "mfn": "mfn9"})
    assert evaluate.format_results(record) == ["fid9_full 1.5", "mfn9 2.25"]
    assert evaluate.metrics_needing_reference(["is", "mfn", "kid", "fid"]) == ["kid", "fid"]
    assert [m for m, entry in evaluate.METRICS.items() if entry.get("reference")] == ["fid", "pr", "kid"]
    assert {m: entry.get("reference_key") for m, entry in evaluate.METRICS.items() if entry.get("reference_key")} == \
        {"pr": "vgg16_features", "kid": "inception_features"}
