"""Generate the land-cover example that ``nllloss eval`` runs on in the README.

A made-up but typical evaluation set: 6 land-cover classes, pixels described by 4 spectral
bands, and a linear softmax classifier trained (with nllloss's loss and gradient) on a
training set drawn the same way. The validation predictions are saved as logits beside their
targets:

* ``landcover_logits.npy``: float32 logits, shape (5000, 6);
* ``landcover_targets.npy``: int64 class indices, shape (5000,), -100 for the pixels
  under cloud, which have no label.

The story the per-class table tells: wetland (class 5) is rare (3% of the pixels) and its
spectrum lies between water's and grassland's, so the classifier, trained on the same
imbalance, rarely bets on it; cropland and grassland overlap too. Run it as
``python examples/make_landcover.py`` (a fixed seed: same files every run on one machine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nllloss import nll_loss, nll_loss_backward

CLASSES = ("water", "forest", "grassland", "cropland", "urban", "wetland")
PRIOR = np.array([0.20, 0.30, 0.22, 0.18, 0.07, 0.03])
# Mean reflectance per class in 4 bands (blue, green, red, near infrared), made up to look
# plausible; wetland sits between water and grassland.
MEANS = np.array(
    [
        [0.08, 0.06, 0.04, 0.03],  # water
        [0.03, 0.06, 0.03, 0.40],  # forest
        [0.05, 0.10, 0.07, 0.32],  # grassland
        [0.06, 0.11, 0.09, 0.28],  # cropland
        [0.14, 0.15, 0.16, 0.22],  # urban
        [0.06, 0.09, 0.06, 0.21],  # wetland
    ]
)
SPREAD = 0.025  # standard deviation of every band around its class mean
CLOUD = 0.02  # fraction of validation pixels without a label
IGNORE = -100

TRAIN, VALIDATION = 20_000, 5_000
STEPS, LEARNING_RATE = 1500, 0.5


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.choice(len(CLASSES), size=n, p=PRIOR)
    bands = MEANS[labels] + SPREAD * rng.standard_normal((n, MEANS.shape[1]))
    return bands, labels


def features(bands: np.ndarray) -> np.ndarray:
    """The bands, two normalised differences (NDVI, NDWI) and a bias column, all O(1)."""
    _blue, green, red, nir = bands.T
    ndvi = (nir - red) / (nir + red + 1e-3)
    ndwi = (green - nir) / (green + nir + 1e-3)
    columns = np.column_stack([bands / 0.1, ndvi, ndwi, np.ones(len(bands))])
    return columns.astype(np.float32)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def train(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Softmax regression by gradient descent on nllloss's mean NLL."""
    weights = np.zeros((x.shape[1], len(CLASSES)), dtype=np.float32)
    for _ in range(STEPS):
        log_probs = log_softmax(x @ weights)
        grad_log_probs = nll_loss_backward(1.0, log_probs, y)
        # Through the log-softmax: dL/dz = g - softmax(z) * sum(g) per row.
        grad_logits = grad_log_probs - np.exp(log_probs) * grad_log_probs.sum(1, keepdims=True)
        weights -= LEARNING_RATE * (x.T @ grad_logits)
    print(f"training loss {float(nll_loss(log_softmax(x @ weights), y)):.4f}")
    return weights


def main() -> None:
    rng = np.random.default_rng(2024)
    train_bands, train_labels = draw(rng, TRAIN)
    weights = train(features(train_bands), train_labels)

    bands, targets = draw(rng, VALIDATION)
    logits = (features(bands) @ weights).astype(np.float32)
    targets = np.where(rng.random(VALIDATION) < CLOUD, IGNORE, targets).astype(np.int64)
    here = Path(__file__).parent
    np.save(here / "landcover_logits.npy", logits)
    np.save(here / "landcover_targets.npy", targets)


if __name__ == "__main__":
    main()
