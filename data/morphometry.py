"""Morpho-MNIST's handwriting measures for 28x28 uint8 digits.

Follows Castro et al., "Morpho-MNIST: Quantitative Assessment and Diagnostics for Representation
Learning" (JMLR 2019) and their ``morphomnist.measure.measure_image``, with one deliberate
change: the skeleton is ``skimage.morphology.skeletonize`` instead of ``medial_axis``, which
costs ~0.2 ms instead of ~30 ms a digit. On 1000 MNIST test digits, against their code: area,
slant, width and height are identical (to 1e-3); thickness has r = 0.996 and the same median
(2.56 vs 2.56); length has r = 0.984 but is ~2 px (4%) shorter, as medial_axis grows more spurs.
All of it costs ~1.1 ms a digit on one core, so all 70,000 MNIST digits take ~40 s on two.

The pipeline for one digit, as in Morpho-MNIST:

1. Upscale 4x with ``skimage.transform.pyramid_expand(order=3)`` (bicubic spline, then a
   Gaussian of sigma 4/3 hi-res pixels) and truncate 255x it to whole grey levels: the measures
   are sub-pixel, on 112x112.
2. Binarise the upscaled image at half way between its minimum and maximum.
3. Measure: area and skeleton length/thickness on the binary image; slant, width and height on
   the upscaled *grey* image (intensity-weighted moments and mass percentiles).

All lengths are reported in pixels of the 28x28 image, areas in its square pixels, and the slant
in degrees (Morpho-MNIST reports radians).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import filters, morphology, transform
from tqdm import tqdm

from data.shapes import IMAGE_SIZE, MEASURES
from runtime.files import atomic_write

MEASURE_VERSION: int = 1  # a cache key: bump whenever a definition below changes

SCALE = 4  # upscaling factor for the sub-pixel measures
THRESHOLD = 0.5  # binarisation level, relative to the upscaled image's range
BOUND_FRAC = 0.02  # mass trimmed along each axis of the bounding parallelogram (half per side)
_CHUNK = 250  # digits per task sent to a worker
POOL_MIN_DIGITS = 4096  # smaller batches are measured in the calling process by default


def measure_digits(images: np.ndarray, workers: int | None = None, progress: bool = False) -> np.ndarray:
    """Measures uint8 [N, 28, 28] digits: float32 [N, len(MEASURES)], a row per digit, in ``MEASURES`` order.

    - area: ink area (binarised), in square pixels.
    - length: skeleton length, counting 1 per straight and sqrt(2) per diagonal step, in pixels.
    - thickness: twice the mean distance to the background along the skeleton, in pixels.
    - slant: arctan(-mu11 / mu02) of the grey image's central moments, with y the row index
      (pointing down), in degrees. Positive means slanted right: the top of the digit lies to
      the right of its bottom, like ``/``.
    - width: the horizontal extent of the slant-corrected (sheared) bounding parallelogram
      between the 1% and 99% mass percentiles along the sheared x axis, in pixels. It is taken
      on the blurred grey image, whose tails outlast the 1% trim: a bar w pixels wide measures
      about w + 1 (w + 1.2 at w = 3, w + 0.8 at w = 6), as in Morpho-MNIST.
    - height: the vertical extent between the 1% and 99% mass percentiles along y, in pixels.

    An image without ink (or without contrast) gives NaN for every measure.

    ``workers`` processes each take chunks of digits; 1 measures in this process. By default
    (None) batches under POOL_MIN_DIGITS are measured here (an evaluation's 500 digits take half
    a second) and larger ones on every core. Workers come from a fork server, a fresh
    single-threaded process that forks them, never by forking the caller: a caller with threads
    (training's, torch's OpenMP pool) may hold a lock at the moment of the fork, and the forked
    worker then waits on it for ever (it did, in an evaluation during training). Like spawn, this
    re-imports the caller's ``__main__`` in the workers, so scripts need a ``__main__`` guard.
    """
    _check_images(images)
    if workers is None:
        workers = 1 if len(images) < POOL_MIN_DIGITS else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    # About four chunks per worker, so that a small batch is spread too; at most _CHUNK digits.
    size = _CHUNK if workers == 1 else min(_CHUNK, max(1, math.ceil(len(images) / (4 * workers))))
    chunks = [images[i : i + size] for i in range(0, len(images), size)]
    out = np.empty((len(images), len(MEASURES)), np.float32)
    with tqdm(total=len(images), unit="digit", disable=not progress, desc="morphometry") as bar:
        if workers == 1 or len(chunks) <= 1:
            results = map(_measure_chunk, chunks)
            _collect(results, out, bar)
        else:
            server = "forkserver" in multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if server else "spawn")
            with context.Pool(min(workers, len(chunks))) as pool:
                _collect(pool.imap(_measure_chunk, chunks), out, bar)
    return out


def cached_measures(images: np.ndarray, cache_dir: Path) -> np.ndarray:
    """``measure_digits(images)``, computed once and cached in ``cache_dir/morphometry/``, keyed by the
    images' md5 and ``MEASURE_VERSION``, so neither other data nor a changed definition is read stale."""
    key = hashlib.md5(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    path = Path(cache_dir) / "morphometry" / f"measures_v{MEASURE_VERSION}_{key}_{len(images)}.npy"
    if path.is_file():
        return np.load(path)
    print(f"Measuring {len(images)} digits once (Morpho-MNIST's measures), into {path} ...", file=sys.stderr)
    measures = measure_digits(images, progress=True)
    buffer = io.BytesIO()
    np.save(buffer, measures)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return measures


def _collect(results, out: np.ndarray, bar: tqdm) -> None:
    """Writes the chunks' rows into ``out`` in order, ticking the progress bar."""
    start = 0
    for rows in results:
        out[start : start + len(rows)] = rows
        start += len(rows)
        bar.update(len(rows))


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"expected a uint8 numpy array [N, 28, 28], got {kind}")
    if images.ndim != 3 or images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected shape [N, 28, 28], got {list(images.shape)}")


def _measure_chunk(images: np.ndarray) -> np.ndarray:
    """``measure_digits`` without the checks, in this process: float64 [N, len(MEASURES)]."""
    out = np.full((len(images), len(MEASURES)), np.nan)
    inked = images.reshape(len(images), -1).any(axis=1)
    for row, grey in zip(np.flatnonzero(inked), _upscale(images[inked])):
        out[row] = _measure_upscaled(grey)
    return out


def _measure_upscaled(grey: np.ndarray) -> np.ndarray:
    """The measures of one digit from its upscaled grey image: steps 2 and 3 of the docstring."""
    low, high = grey.min(), grey.max()
    if high <= low:
        return np.full(len(MEASURES), np.nan)
    ink = _crop(grey >= low + THRESHOLD * (high - low))
    skeleton = morphology.skeletonize(ink)
    distance = ndimage.distance_transform_edt(ink)
    area = ink.sum() / SCALE**2
    length = _skeleton_length(skeleton) / SCALE
    thickness = 2.0 * distance[skeleton].mean() / SCALE if skeleton.any() else np.nan
    slant, width, height = _slant_and_box(grey)
    return np.array([area, length, thickness, slant, width, height])


def _upscale(images: np.ndarray) -> np.ndarray:
    """Morpho-MNIST's upscaling of [N, 28, 28] uint8: floor(255 * pyramid_expand(order=3)).

    pyramid_expand is a bicubic-spline resize, a clip to the input's range, then a Gaussian.
    The resize is linear and separable, so it is applied as a [112, 28] matrix on each side
    (``_zoom_operator``), and the Gaussian with skimage on the whole batch: 0.5 ms instead of
    1.3 ms a digit, and bit-identical to pyramid_expand after the truncation on all 10,000 MNIST
    test digits (tests/test_morphometry.py checks a sample). The products use einsum, not
    matmul, on purpose: OpenBLAS threads them, and its spinning threads made two worker
    processes on two cores no faster than one.
    """
    zoom = _zoom_operator()
    x = images / 255.0
    resized = np.einsum("ij,njl->nil", zoom, np.einsum("njk,lk->njl", x, zoom))
    resized = np.clip(resized, x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True))
    # Morpho-MNIST truncates 255x the result to uint8; that also zeroes the faint (< 1/255)
    # tails the spline and the Gaussian spread around a digit, which the trimmed width sees.
    sigma = 2 * SCALE / 6  # pyramid_expand's default
    return np.floor(255.0 * filters.gaussian(resized, sigma=(0, sigma, sigma), mode="reflect"))


@functools.cache
def _zoom_operator() -> np.ndarray:
    """pyramid_expand's 1-D bicubic resize from 28 to 112 samples, as a [112, 28] matrix.

    It is skimage's own resize applied to an identity along one axis only (the other axis is
    "resized" from 28 to 28, which leaves it exactly as it is).
    """
    return transform.resize(
        np.eye(IMAGE_SIZE), (SCALE * IMAGE_SIZE, IMAGE_SIZE), order=3, mode="reflect", anti_aliasing=False, clip=False
    )


def _crop(ink: np.ndarray) -> np.ndarray:
    """The ink's bounding box plus one background pixel each side (where the image has one).

    Skeleton and distance map are unchanged by this crop (each ink pixel's nearest background
    pixel is inside the box or on its margin) and cost 0.3 ms instead of 0.7 ms on a digit.
    """
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return ink[max(rows[0] - 1, 0) : rows[-1] + 2, max(cols[0] - 1, 0) : cols[-1] + 2]


def _skeleton_length(skeleton: np.ndarray) -> float:
    """Sums the steps between 8-connected skeleton pixels, each pair once: 1 or sqrt(2)."""
    straight = (skeleton[:, :-1] & skeleton[:, 1:]).sum() + (skeleton[:-1] & skeleton[1:]).sum()
    diagonal = (skeleton[:-1, :-1] & skeleton[1:, 1:]).sum() + (skeleton[:-1, 1:] & skeleton[1:, :-1]).sum()
    return float(straight + math.sqrt(2.0) * diagonal)


def _slant_and_box(grey: np.ndarray) -> tuple[float, float, float]:
    """Slant (degrees) and trimmed bounding-parallelogram width, height (28x28 pixels).

    Moments use x = column and y = row of the grey image, both weighted by intensity. The shear
    s = mu11 / mu02 is how far x moves per row down; undoing it (x - s * (y - y_mean)) turns a
    slanted stroke upright, so the width is measured across the slant, not across the page.
    """
    rows, cols = np.nonzero(grey > 0)
    mass = grey[rows, cols]
    x = cols + 0.5  # pixel centres: pixel i covers [i, i + 1)
    y = rows + 0.5
    total = mass.sum()
    x_mean, y_mean = (mass * x).sum() / total, (mass * y).sum() / total
    mu11 = (mass * (x - x_mean) * (y - y_mean)).sum() / total
    mu02 = (mass * (y - y_mean) ** 2).sum() / total
    shear = mu11 / mu02
    slant = math.degrees(math.atan(-shear))
    width = _trimmed_extent(x - shear * (y - y_mean), mass)
    height = _trimmed_extent(y, mass)
    return slant, width / SCALE, height / SCALE


def _trimmed_extent(coord: np.ndarray, mass: np.ndarray) -> float:
    """Distance between the BOUND_FRAC/2 and 1 - BOUND_FRAC/2 mass percentiles of ``coord``.

    As Morpho-MNIST: the mass CDF is taken at integer positions t (mass of the pixels whose
    centre lies below t), then interpolated linearly. That spreads each pixel's mass evenly over
    its own width: mass spread evenly over W whole pixels measures 0.98 W.
    """
    step = np.floor(coord).astype(np.int64) + 1  # the first integer t that counts each pixel
    first = step.min() - 1
    cdf = np.cumsum(np.bincount(step - first, weights=mass))  # cdf[k]: mass below first + k
    cdf /= cdf[-1]
    low, high = np.interp([BOUND_FRAC / 2, 1 - BOUND_FRAC / 2], cdf, first + np.arange(len(cdf)))
    return float(high - low)
