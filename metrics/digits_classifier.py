"""A small digit classifier whose features give an offline Frechet distance for the `digits` quick start.

The standard FID needs the Inception network, which cannot be downloaded everywhere. For the built-in `digits`
data set the quick start therefore also reports a Frechet distance in the penultimate-layer feature space of this
classifier, trained reproducibly (fixed seed, fixed split) on scikit-learn's bundled 8x8 digits. It is NOT FID and
is labelled as such; its floor is the same distance between two disjoint halves of the real data.

Images of any resolution are resized to 16x16 (area averaging down, bilinear up) and converted to one channel,
so the classifier serves datasets made by `dataset_tool.py --source=digits` at any power-of-two resolution.
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import dnnlib
from torch_utils import persistence

CLASSIFIER_RESOLUTION = 16
FEATURE_DIM = 64


class DigitsClassifier(torch.nn.Module):
    """Three conv layers and two linear layers; `forward(images_uint8)` returns logits, `features()` the 64-d layer."""

    def __init__(self):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.fc0 = torch.nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc1 = torch.nn.Linear(FEATURE_DIM, 10)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] (C = 1 or 3, any H = W) -> float [N, 1, 16, 16] in [-1, 1]."""
        x = images.to(torch.float32)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-1] > CLASSIFIER_RESOLUTION:
            x = F.interpolate(x, size=(CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION), mode="area")
        elif x.shape[-1] < CLASSIFIER_RESOLUTION:  # As the training digits were made from 8x8.
            x = F.interpolate(x, size=(CLASSIFIER_RESOLUTION, CLASSIFIER_RESOLUTION), mode="bilinear",
                              align_corners=False)
        return x / 127.5 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        x = F.max_pool2d(F.silu(self.conv0(x)), 2)  # 8x8
        x = F.max_pool2d(F.silu(self.conv1(x)), 2)  # 4x4
        x = F.silu(self.conv2(x))
        return F.silu(self.fc0(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.features(images))


def digits_as_uint8(resolution: int = CLASSIFIER_RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 [1797, 1, R, R] (values 0..16 scaled to 0..255, bilinear resize) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).numpy()
    return images, digits.target.astype(np.int64)


def split_indices(num: int, seed: int = 0, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.RandomState(seed).permutation(num)
    num_test = int(round(num * test_fraction))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def train_classifier(seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3,
                     verbose: bool = False) -> tuple[DigitsClassifier, dict]:
    """Train on a fixed 75/25 split of the 1,797 digits; returns the model and {train_acc, test_acc, ...}."""
    images, labels = digits_as_uint8()
    train_idx, test_idx = split_indices(len(images), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    # The initial weights from the seed, as torch.manual_seed(seed) gave them, without reseeding the caller's stream
    # (a notebook's torch.randn after this call depended on this seed, not on its own).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x_train = torch.as_tensor(images[train_idx])
    y_train = torch.as_tensor(labels[train_idx])
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_idx), generator=generator)
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            x = x_train[idx]
            # Light augmentation: random shifts of up to 1 classifier pixel make features robust to small offsets.
            shift = torch.randint(-1, 2, (2,), generator=generator)
            x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = F.cross_entropy(model(x), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        train_acc = (model(x_train).argmax(1) == y_train).float().mean().item()
        test_acc = (model(torch.as_tensor(images[test_idx])).argmax(1) == torch.as_tensor(labels[test_idx]))
        test_acc = test_acc.float().mean().item()
    info = dict(seed=seed, epochs=epochs, train_acc=train_acc, test_acc=test_acc,
                num_train=len(train_idx), num_test=len(test_idx))
    return model, info


def save_classifier(model: DigitsClassifier, info: dict, path: str) -> None:
    """state_dict + training info in one torch file (loads with weights_only=True), written atomically."""
    with dnnlib.util.atomic_output(path, "wb") as f:
        torch.save(dict(state_dict=model.state_dict(), info=json.dumps(info)), f)


def load_classifier(path: str) -> tuple[DigitsClassifier, dict]:
    data = persistence.safe_torch_load(path)
    model = DigitsClassifier()
    model.load_state_dict(data["state_dict"])
    return model.eval().requires_grad_(False), json.loads(data["info"])


@torch.no_grad()
def extract_features(model: DigitsClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """uint8 [N, C, H, W] -> float64 [N, 64] features."""
    images = torch.as_tensor(images)
    feats = [model.features(images[i:i + batch_size]).to(torch.float64) for i in range(0, len(images), batch_size)]
    return torch.cat(feats).numpy()


def main(argv=None) -> None:
    """python -m metrics.digits_classifier --out PATH [--epochs N] [--seed S]: train, report accuracy, save."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Where to save the classifier (.pt)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, info = train_classifier(seed=args.seed, epochs=args.epochs)
    save_classifier(model, info, args.out)
    print(f"digit classifier: held-out accuracy {info['test_acc']:.4f} on {info['num_test']} digits "
          f"(train {info['train_acc']:.4f}); saved to {args.out}")


if __name__ == "__main__":
    main()
