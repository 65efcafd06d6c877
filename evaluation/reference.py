"""Real-MNIST reference for the Fréchet MNIST distance, and the real-vs-real floor beside it.

The MNIST test set is split per digit, by a fixed permutation, into halves A and B. Generated
samples are compared with half B's feature statistics. The floor is the distance from half A to
half B with as many images per digit as the generated set has, so it carries the same
small-sample bias: it is the score of a perfect generator, and the number to read a score against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.morphometry import MEASURES
from data.shapes import NUM_DIGITS
from evaluation.judge import Judge, judge_images
from evaluation.metrics import conditional_accuracy, frechet_distance, gaussian_stats
from evaluation.specks import speck_rate

SPLIT_SEED = 0  # fixed, so every evaluation uses the same halves
SHAPE_MEASURES = ("thickness", "width")


@dataclass(frozen=True)
class RealReference:
    mu: np.ndarray  # judge features of test half B: mean [D]
    sigma: np.ndarray  # and covariance [D, D]
    floor_features: np.ndarray  # judge features of test half A [N_A, D]
    floor_labels: np.ndarray  # their labels [N_A]
    judge_accuracy: float  # the judge's accuracy on half A: the ceiling for conditional accuracy
    reference_images: int  # size of half B
    shape: dict[str, float]  # median Morpho-MNIST thickness and width of the whole test set
    speck_rate: float  # the share of the whole test set's digits with a stray speck (evaluation/specks.py)

    def distance(self, features: np.ndarray) -> float:
        """Fréchet MNIST distance of generated features [N, D] to half B."""
        return frechet_distance(*gaussian_stats(features), self.mu, self.sigma)

    def floor(self, per_digit: int) -> tuple[float, int]:
        """(distance, images used) of ``per_digit`` real images of each digit from half A to half B.

        Half A holds about 450 images of each digit; a larger ``per_digit`` is capped there.
        """
        take = np.concatenate([np.flatnonzero(self.floor_labels == d)[:per_digit] for d in range(NUM_DIGITS)])
        return self.distance(self.floor_features[take]), len(take)


def split_halves(labels: np.ndarray, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices of halves A and B: each digit's images permuted, its first half to A, the rest to B."""
    rng = np.random.default_rng(seed)
    halves = [rng.permutation(np.flatnonzero(labels == d)) for d in range(NUM_DIGITS)]
    return (np.concatenate([h[: len(h) // 2] for h in halves]), np.concatenate([h[len(h) // 2 :] for h in halves]))


def shape_medians(measures: np.ndarray) -> dict[str, float]:
    """Median thickness and width (Morpho-MNIST's, in pixels) of measured digits [N, len(MEASURES)]."""
    return {name: float(np.nanmedian(measures[:, MEASURES.index(name)])) for name in SHAPE_MEASURES}


def real_reference(
    judge: Judge, test_images: np.ndarray, test_labels: np.ndarray, test_measures: np.ndarray
) -> RealReference:
    """Judge the MNIST test set once and keep what the distance and its floor need, its shape medians and
    its speck rate."""
    logits, features = judge_images(judge, test_images)
    half_a, half_b = split_halves(test_labels)
    mu, sigma = gaussian_stats(features[half_b])
    return RealReference(
        mu,
        sigma,
        features[half_a],
        test_labels[half_a],
        conditional_accuracy(logits[half_a], test_labels[half_a]),
        len(half_b),
        shape_medians(test_measures),
        speck_rate(test_images),
    )
