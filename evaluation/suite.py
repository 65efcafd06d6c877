"""What an evaluation samples and how its images are scored.

Each prompt set (seen = the training wordings, held-out = wordings never trained on) gets
``per_digit`` samples of every digit, cycling through the set's templates. The images are
judged; accuracy is reported per set, per digit and per template, and the Fréchet MNIST
distance per set beside the real-vs-real floor of the same size.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch

from data.captions import PromptPlan, plan_prompts
from data.images import to_uint8
from data.mnist import load_mnist, mnist_cache_dir
from data.morphometry import cached_measures, measure_digits
from data.shapes import NUM_DIGITS
from evaluation.judge import Judge, judge_images, load_judge
from evaluation.metrics import accuracy_by, conditional_accuracy
from evaluation.reference import RealReference, real_reference, shape_medians
from evaluation.specks import speck_flags


def group_scores(
    logits: np.ndarray,
    features: np.ndarray,
    digits: np.ndarray,
    measures: np.ndarray,
    specks: np.ndarray,
    reference: RealReference,
) -> dict:
    """Accuracy overall and per digit, the distance with its floor, and the median stroke thickness and
    width and the speck rate (``specks``: bool per image) against real digits', of one class-balanced group."""
    floor, floor_samples = reference.floor(len(digits) // NUM_DIGITS)
    per_digit = accuracy_by(logits, digits, digits)
    return {
        "samples": len(digits),
        "accuracy": conditional_accuracy(logits, digits),
        "per_digit": [per_digit[d] for d in range(NUM_DIGITS)],
        "fmd": reference.distance(features),
        "fmd_floor": floor,
        "floor_samples": floor_samples,
        "shape": shape_medians(measures),
        "real_shape": reference.shape,
        "speck_rate": float(specks.mean()),
        "real_speck_rate": reference.speck_rate,
    }


def score(images: np.ndarray, plan: PromptPlan, judge: Judge, reference: RealReference) -> dict:
    """Scores of uint8 images [N, 28, 28] sampled by ``plan``: per set (and "all" when several),
    and per template."""
    logits, features = judge_images(judge, images)
    measures, specks = measure_digits(images), speck_flags(images)
    sets = np.array(plan.sets)
    names = list(dict.fromkeys(plan.sets))
    groups = {name: sets == name for name in names}
    if len(names) > 1:
        groups["all"] = np.ones(len(sets), dtype=bool)
    by_set = {
        name: group_scores(logits[m], features[m], plan.digits[m], measures[m], specks[m], reference)
        for name, m in groups.items()
    }
    keys = list(zip(plan.sets, plan.templates))
    counts = Counter(keys)
    per_template = [
        {"set": name, "template": template, "samples": counts[name, template], "accuracy": accuracy}
        for (name, template), accuracy in accuracy_by(logits, plan.digits, keys).items()
    ]
    return {"sets": by_set, "per_template": per_template}


@functools.lru_cache(maxsize=2)
def judge_and_reference(data_dir: str | None, device: torch.device) -> tuple[Judge, RealReference]:
    """The committed judge on ``device`` and the real-MNIST reference, computed once per process."""
    judge = load_judge(device=device)
    mnist = load_mnist(data_dir)
    measures = cached_measures(mnist.test_images, mnist_cache_dir())
    return judge, real_reference(judge, mnist.test_images, mnist.test_labels, measures)


def evaluate_during_training(
    sample: Callable[[list[str]], torch.Tensor],
    templates: Sequence[str],
    per_digit: int,
    data_dir: str | None,
    device: torch.device,
) -> dict[str, float]:
    """A small evaluation of the seen wordings (``templates``, the vocabulary's): ``per_digit`` images of
    each digit, ``sample(prompts)`` giving one image in [-1, 1] per prompt (training samples them as the
    epoch's sample grid, with a fixed seed so epochs are compared on the same noise); the judge and the
    real reference on ``device``, MNIST from ``data_dir``. Returns metrics.jsonl fields."""
    start = time.perf_counter()
    judge, reference = judge_and_reference(data_dir, device)
    plan = plan_prompts(per_digit, {"seen": templates})
    seen = score(to_uint8(sample(plan.prompts)), plan, judge, reference)["sets"]["seen"]
    return {**summary_fields(seen, "eval_"), "eval_seconds": time.perf_counter() - start}


def summary_fields(scores: dict, prefix: str) -> dict[str, float]:
    """One group's scores (:func:`group_scores`) as flat fields named ``prefix``+name: accuracy, the distance
    and its floor, the sample count, the median thickness and width over the real digits', the speck rate."""
    return {
        f"{prefix}accuracy": scores["accuracy"],
        f"{prefix}fmd": scores["fmd"],
        f"{prefix}fmd_floor": scores["fmd_floor"],
        f"{prefix}samples": scores["samples"],
        f"{prefix}thickness_ratio": scores["shape"]["thickness"] / scores["real_shape"]["thickness"],
        f"{prefix}width_ratio": scores["shape"]["width"] / scores["real_shape"]["width"],
        f"{prefix}speck_rate": scores["speck_rate"],
    }
