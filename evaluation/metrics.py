"""Metric functions on judge outputs: conditional accuracy and the Fréchet distance.

The Fréchet distance between N(mu1, S1) and N(mu2, S2) is
    ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
(Heusel et al. 2017, "GANs trained by a two time-scale update rule"). S1 S2 is not symmetric,
but Tr (S1 S2)^(1/2) = Tr (R S2 R)^(1/2) with R = S1^(1/2), and R S2 R is symmetric PSD, so two
symmetric eigendecompositions in float64 give it without scipy's sqrtm.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def conditional_accuracy(logits: np.ndarray, digits: np.ndarray) -> float:
    """Fraction of samples whose arg-max logit is the digit their prompt asked for."""
    if len(logits) == 0:
        raise ValueError("no samples to score")
    return float(np.mean(np.argmax(logits, axis=1) == digits))


def accuracy_by(logits: np.ndarray, digits: np.ndarray, groups: Sequence[Hashable]) -> dict[Hashable, float]:
    """Conditional accuracy of each group of samples (e.g. per digit or per template), in first-seen order."""
    result = {}
    for key in dict.fromkeys(groups):
        mask = np.fromiter((g == key for g in groups), dtype=bool, count=len(groups))
        result[key] = conditional_accuracy(logits[mask], digits[mask])
    return result


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between two Gaussians; see the module docstring."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    root = sqrt_psd(sigma1)
    middle = root @ sigma2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(distance, 0.0))
