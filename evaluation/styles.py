"""Whether the words of a prompt change how the digit is written, measured.

For every digit and every attribute value of the vocabulary the model was trained on ("a thick 7",
"a 7 slanted left", ...; data/captions.py's ``style_plan``) the model samples ``per_prompt`` images,
with the same seeds for every prompt so that only the words differ. The images are measured with the
morphometrics the training captions came from (data/morphometry.py) and reported, for trained and
held-out (digit, word) pairs apart:

- digit accuracy: the judge reads the prompted digit, attribute words and all;
- attribute accuracy: the share whose measured value lies in the prompted outer quarter of the
  digit's class (thresholds from the training set), beside chance: that quarter's share among real
  test digits of the class (about 25%);
- the median shift: median("a thick 7") - median("7"), beside the same contrast among real digits
  (median of the class's thick quarter - median of the class);
- negative prompts: "7" with the negative prompt "thick" against plain "7", in the attribute's unit.

A new attribute of a vocabulary (its measure, unit and words) is reported with no edit here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.captions import StylePrompt, Vocabulary, canonical_prompt, style_plan, style_thresholds
from data.mnist import MNIST
from data.morphometry import cached_measures, measure_digits
from data.shapes import NUM_DIGITS
from evaluation.judge import Judge, judge_images
from evaluation.report import markdown_table, percent

# (prompts, images per prompt, negative prompt) -> uint8 [prompts, per prompt, 28, 28], image j of
# every prompt drawn from the same seed.
SampleFn = Callable[[list[str], int, str], np.ndarray]
PICTURE_DIGITS = (1, 4, 7)


@dataclass(frozen=True)
class StyleReference:
    """Real MNIST's side of the comparison for one vocabulary's attributes: the outer-quantile
    thresholds of the training set (what the captions used) and the test set's measures."""

    vocabulary: Vocabulary  # the one the model was trained on
    thresholds: np.ndarray  # [NUM_DIGITS, len(vocabulary.attributes), 2]
    measures: np.ndarray  # test set [N, len(MEASURES)]
    labels: np.ndarray

    @classmethod
    def from_mnist(cls, vocabulary: Vocabulary, mnist: MNIST, cache_dir: Path) -> StyleReference:
        train = cached_measures(mnist.train_images, cache_dir)
        test = cached_measures(mnist.test_images, cache_dir)
        return cls(vocabulary, style_thresholds(vocabulary, train, mnist.train_labels), test, mnist.test_labels)

    def in_bin(self, measures: np.ndarray, digit: int, attribute: int, value: int) -> np.ndarray:
        column = measures[:, self.vocabulary.attributes[attribute].column]
        low, high = self.thresholds[digit, attribute]
        return column > high if value > 0 else column < low

    def real(self, digit: int) -> np.ndarray:
        return self.measures[self.labels == digit]

    def chance(self, digit: int, attribute: int, value: int) -> float:
        return float(self.in_bin(self.real(digit), digit, attribute, value).mean())

    def real_shift(self, digit: int, attribute: int, value: int) -> float:
        real = self.real(digit)
        column = real[:, self.vocabulary.attributes[attribute].column]
        return float(np.nanmedian(column[self.in_bin(real, digit, attribute, value)]) - np.nanmedian(column))


def evaluate_styles(
    sample: SampleFn, reference: StyleReference, judge: Judge, per_prompt: int, negatives: bool = True
) -> dict:
    """Sample and measure every prompt of the reference's vocabulary's ``style_plan`` and, with ``negatives``
    (a model that reads negative prompts: not a student distilled without them), the negative prompts; the
    report's numbers."""
    plan = style_plan(reference.vocabulary)
    images = sample([p.prompt for p in plan], per_prompt, "")
    measures = measure_digits(images.reshape(-1, *images.shape[2:])).reshape(len(plan), per_prompt, -1)
    logits, _ = judge_images(judge, images.reshape(-1, *images.shape[2:]))
    correct = (logits.argmax(1).reshape(len(plan), per_prompt) == np.array([p.digit for p in plan])[:, None]).mean(1)
    plain = {p.digit: measures[i] for i, p in enumerate(plan) if p.attribute is None}
    pairs = [_pair(p, measures[i], plain[p.digit], float(correct[i]), reference) for i, p in enumerate(plan)]
    return {
        "per_prompt": per_prompt,
        "plain_digit_accuracy": float(np.mean([correct[i] for i, p in enumerate(plan) if p.attribute is None])),
        "pairs": [pair for pair in pairs if pair["word"] is not None],
        "negative": negative_prompts(sample, plain, per_prompt, reference.vocabulary) if negatives else [],
    }


def _pair(
    p: StylePrompt, measures: np.ndarray, plain: np.ndarray, digit_accuracy: float, reference: StyleReference
) -> dict:
    result = {"prompt": p.prompt, "digit": p.digit, "digit_accuracy": digit_accuracy, "word": None}
    if p.attribute is None:
        return result
    attribute = reference.vocabulary.attributes[p.attribute]
    column = attribute.column
    return {
        **result,
        "word": attribute.word(p.value),
        "measure": attribute.measure,
        "held_out": p.held_out,
        "attribute_accuracy": float(reference.in_bin(measures, p.digit, p.attribute, p.value).mean()),
        "chance": reference.chance(p.digit, p.attribute, p.value),
        "shift": float(np.nanmedian(measures[:, column]) - np.nanmedian(plain[:, column])),
        "real_shift": reference.real_shift(p.digit, p.attribute, p.value),
    }


def negative_prompts(
    sample: SampleFn, plain: dict[int, np.ndarray], per_prompt: int, vocabulary: Vocabulary
) -> list[dict]:
    """Each digit's plain prompt with the word of each attribute value as the negative prompt: the
    median change of that attribute's measure against the plain prompt, averaged over the digits."""
    results = []
    for attribute in vocabulary.attributes:
        for value in (-1, 1):
            word = attribute.word(value)
            images = sample([canonical_prompt(d) for d in range(NUM_DIGITS)], per_prompt, word)
            measured = measure_digits(images.reshape(-1, *images.shape[2:])).reshape(NUM_DIGITS, per_prompt, -1)
            column = attribute.column
            shifts = [
                np.nanmedian(measured[d, :, column]) - np.nanmedian(plain[d][:, column]) for d in range(NUM_DIGITS)
            ]
            results.append({"negative_prompt": word, "measure": attribute.measure, "shift": float(np.mean(shifts))})
    return results


def style_picture_rows(vocabulary: Vocabulary, digits: tuple[int, ...] = PICTURE_DIGITS) -> list[str]:
    """The picture's prompts: per digit and attribute, the low word, the plain digit and the high word."""
    rows = []
    for digit in digits:
        for i in range(len(vocabulary.attributes)):
            low, high = (vocabulary.style_prompt(digit, vocabulary.one_attribute(i, v)) for v in (-1, 1))
            rows += [low, canonical_prompt(digit), high]
    return rows


# ----------------------------------------------------------------------------- report
def summary(report: dict) -> dict[str, dict[str, float]]:
    """Digit and attribute accuracy and chance over the trained and over the held-out pairs."""
    groups = {
        "trained pairs": [p for p in report["pairs"] if not p["held_out"]],
        "held-out pairs": [p for p in report["pairs"] if p["held_out"]],
    }
    return {
        name: {
            key: float(np.mean([p[key] for p in pairs])) for key in ("digit_accuracy", "attribute_accuracy", "chance")
        }
        for name, pairs in groups.items()
    }


def style_tables(report: dict, vocabulary: Vocabulary) -> str:
    """Markdown: the summary, one row per word of ``vocabulary`` (the one the report was made with;
    trained and held-out pairs apart), the negative prompts."""
    overall = markdown_table(
        ["pairs", "prompts", "digit accuracy", "attribute accuracy", "chance"],
        [
            [
                name,
                sum(p["held_out"] == (name == "held-out pairs") for p in report["pairs"]),
                percent(s["digit_accuracy"]),
                percent(s["attribute_accuracy"]),
                percent(s["chance"]),
            ]
            for name, s in summary(report).items()
        ],
        "lrrrr",
    )
    rows = []
    unit = {attribute.word(v): attribute.unit for attribute in vocabulary.attributes for v in (-1, 1)}
    for word in unit:
        for held_out in (False, True):
            pairs = [p for p in report["pairs"] if p["word"] == word and p["held_out"] == held_out]
            if pairs:
                rows.append(_word_row(word, held_out, pairs, unit[word]))
    by_word = markdown_table(
        ["word", "digits", "digit accuracy", "attribute accuracy", "chance", "median shift", "real median shift"],
        rows,
        "llrrrrr",
    )
    negative = markdown_table(
        ["plain digit, negative prompt", "measure", "median change against the plain prompt"],
        [
            [f'"{n["negative_prompt"]}"', n["measure"], f"{n['shift']:+.2f} {unit[n['negative_prompt']]}"]
            for n in report["negative"]
        ],
        "llr",
    )
    plain = f"plain digit prompts: digit accuracy {percent(report['plain_digit_accuracy'])}"
    return (
        f"### style prompts ({report['per_prompt']} images each)\n\n{overall}\n\n{by_word}\n\n{negative}\n\n{plain}\n"
    )


def _word_row(word: str, held_out: bool, pairs: list[dict], unit: str) -> list[str]:
    digits = ", ".join(str(p["digit"]) for p in pairs) if held_out else f"{len(pairs)} trained"
    mean = lambda key: float(np.mean([p[key] for p in pairs]))
    return [
        f'"{word}"',
        digits,
        percent(mean("digit_accuracy")),
        percent(mean("attribute_accuracy")),
        percent(mean("chance")),
        f"{mean('shift'):+.2f} {unit}",
        f"{mean('real_shift'):+.2f} {unit}",
    ]
