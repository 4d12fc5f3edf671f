"""The digit classifier behind the quick start's offline Frechet distance."""

import numpy as np
import torch

from metrics import digits_classifier as dc


def test_digits_as_uint8_matches_sklearn_at_native_resolution():
    from sklearn.datasets import load_digits

    images, labels = dc.digits_as_uint8(resolution=8)
    raw = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 0], np.round(raw.images * 255.0 / 16.0).astype(np.uint8))
    np.testing.assert_array_equal(labels, raw.target)


def test_split_is_disjoint_and_complete():
    train, test = dc.split_indices(1797, seed=0)
    assert len(test) == 449 and len(train) == 1348
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))


def test_classifier_reaches_95_percent_held_out(tmp_path):
    model, info = dc.train_classifier(seed=0, epochs=12)
    assert info["test_acc"] >= 0.95, info
    path = tmp_path / "digits_classifier.pt"
    dc.save_classifier(model, info, str(path))
    loaded, loaded_info = dc.load_classifier(str(path))
    assert loaded_info == info
    images, labels = dc.digits_as_uint8(resolution=32)  # Any resolution: resized inside.
    feats = dc.extract_features(loaded, images[:50])
    assert feats.shape == (50, dc.FEATURE_DIM) and feats.dtype == np.float64
    with torch.no_grad():
        ref = model.features(torch.as_tensor(images[:50])).double().numpy()
    np.testing.assert_allclose(feats, ref, rtol=0, atol=0)


def test_training_leaves_the_callers_random_stream_alone():
    # train_classifier is the README's Python API: it reseeded the global torch RNG, so a notebook's draws after it
    # depended on its seed. The initial weights are still those of torch.manual_seed(seed) (the README's accuracy).
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model, _ = dc.train_classifier(seed=0, epochs=0)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(0)
    torch.testing.assert_close(model.state_dict(), dc.DigitsClassifier().state_dict(), rtol=0, atol=0)
