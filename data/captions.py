"""Conditioning, in one place: every caption training can draw, the held-out wordings and (digit,
attribute) pairs, the table of caption rows a training step draws from, and the plans by which
evaluation prompts the model.

Two caption sets (the config key ``captions``):

- ``digits``: the digit alone, in eight wordings ("7", "seven", "the digit 7", "a handwritten seven", ...).
  What checkpoints from before the style captions were trained with.
- ``styles`` (default): those, plus captions that say how the digit is written, from Morpho-MNIST
  measurements of each training image (``data/morphometry.py``): the attributes in which it lies in
  the outer quarters *of its own digit class*: "thin"/"thick" stroke, "narrow"/"wide", "slanted
  left"/"slanted right". An image is captioned, uniformly, by any subset of its unusual attributes
  (the empty subset gives the plain wordings, so "7" keeps meaning every 7), in several wordings
  ("a thin 7 slanted left", "a thin seven slanted left", "thin 7 slanted left", and without the
  digit, "thin slanted left", which gives negative prompts such as "thick" their meaning).

Held out: some (digit, attribute value) pairs appear in no caption ("thick" with 4, "wide" with 1,
...). Those images are still trained on, under their other words, so a held-out prompt joins a word
and a digit the model has only seen apart: evaluation tests composition, not memory.

Every caption fits the text encoder's 8 tokens (start and end included); captions that would not
are never produced. Adding an attribute: its measure in ``data/morphometry.py``, an ``Attribute``
below, its held-out pair, and tests.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from data.morphometry import MEASURES
from data.shapes import NUM_DIGITS, TEXT_TOKENS

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# "{d}" is the numeral, "{word}" the English word.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{d}", "{word}", "the digit {d}", "the digit {word}", "the number {d}", "the number {word}",
    "a handwritten {d}", "a handwritten {word}",
)  # fmt: skip
HELDOUT_TEMPLATES: tuple[str, ...] = ("a handwritten number {word}", "the numeral {d}", "a picture of {word}")
EMPTY_PROMPT = ""  # the unconditional prompt for classifier-free guidance
CAPTION_SETS = ("digits", "styles")


@dataclass(frozen=True)
class Attribute:
    """A way a digit can be unusually written: its measure, its words for the low and the high outer
    quarter, and whether the word goes before the digit ("a thick 7") or after it ("a 7 slanted left")."""

    measure: str
    low: str
    high: str
    before: bool

    def word(self, value: int) -> str:
        return self.high if value > 0 else self.low

    @property
    def column(self) -> int:
        return MEASURES.index(self.measure)


ATTRIBUTES = (
    Attribute("thickness", "thin", "thick", before=True),
    Attribute("width", "narrow", "wide", before=True),
    Attribute("slant", "slanted left", "slanted right", before=False),  # positive slant: the top leans right
)
OUTER_QUANTILE = 0.25  # below it within the digit's class: the low word; above 1 - it: the high word
HELD_OUT_PAIRS = frozenset(
    {(4, "thick"), (5, "thin"), (1, "wide"), (0, "narrow"), (9, "slanted left"), (3, "slanted right")}
)
Style = tuple[int, ...]  # per attribute: -1 low, +1 high, 0 ordinary (or not mentioned)
STYLES: tuple[Style, ...] = tuple(itertools.product((0, -1, 1), repeat=len(ATTRIBUTES)))


# ----------------------------------------------------------------------------- wordings
def prompts_for(digit: int, templates: Sequence[str] = TRAIN_TEMPLATES) -> list[str]:
    """The prompts for one digit, in template order."""
    if digit not in range(NUM_DIGITS):
        raise ValueError(f"digit must be 0..{NUM_DIGITS - 1}, got {digit!r}")
    return [t.format(d=digit, word=DIGIT_WORDS[digit]) for t in templates]


def canonical_prompt(digit: int) -> str:
    """The short label of a digit, e.g. "7", as used for sample-grid rows."""
    return str(digit)


def style_prompt(digit: int | None, style: Style) -> str:
    """The canonical caption of a digit (None: no digit) in ``style``: "a thick 7", "a 7 slanted left"."""
    return _phrase(None if digit is None else str(digit), style, article=digit is not None)


def wordings(digit: int, style: Style) -> list[str]:
    """Every training caption of ``digit`` in ``style`` (0: not mentioned) that fits the text encoder:
    the plain templates when nothing is mentioned."""
    if not any(style):
        return prompts_for(digit)
    forms = [_phrase(str(digit), style, True), _phrase(DIGIT_WORDS[digit], style, True),
             _phrase(str(digit), style, False), _phrase(None, style, False)]  # fmt: skip
    return [form for form in forms if fits(form)]


def fits(prompt: str) -> bool:
    """Whether ``prompt`` fits the text encoder's context, start and end tokens included."""
    from models.text_encoder import prompt_tokens  # open_clip's tokenizer: imported when first needed

    return prompt_tokens(prompt) <= TEXT_TOKENS


def _phrase(noun: str | None, style: Style, article: bool) -> str:
    before = [a.word(v) for a, v in zip(ATTRIBUTES, style) if v and a.before]
    after = [a.word(v) for a, v in zip(ATTRIBUTES, style) if v and not a.before]
    words = [*before, *([noun] if noun else []), *after]
    if article:
        words.insert(0, "an" if words[0] in ("8", "eight") else "a")
    return " ".join(words)


def mentionable(digit: int, style: Style) -> Style:
    """``style`` without the attribute values held out for ``digit``: they are never said of it."""
    return tuple(0 if v and (digit, a.word(v)) in HELD_OUT_PAIRS else v for a, v in zip(ATTRIBUTES, style))


# ----------------------------------------------------------------------------- the caption table
@dataclass(frozen=True)
class CaptionSet:
    """Every caption of a caption set, and which of them each class of image may be captioned with.

    A class is a digit (``digits``) or a digit and its measured style (``styles``: class = digit *
    len(STYLES) + style index). For class c, ``rows[c, s, w]`` is the table row of wording w of
    subset s of its mentionable attributes; ``subsets[c]`` and ``wordings[c, s]`` count them.
    """

    kind: str
    prompts: list[str]  # row 0 is the empty prompt
    rows: np.ndarray  # int64 [classes, max subsets, max wordings], -1 where unused
    subsets: np.ndarray  # int64 [classes]
    wordings: np.ndarray  # int64 [classes, max subsets]

    def row_of(self, prompt: str) -> int:
        return self.prompts.index(prompt)

    @property
    def fingerprint(self) -> str:
        """16 hex digits of the sha256 of what defines the vocabulary (its prompts, the held-out pairs and
        the held-out templates): checkpoints record it, so a changed vocabulary of the same name is noticed."""
        definition = [self.prompts, sorted(HELD_OUT_PAIRS), list(HELDOUT_TEMPLATES)]
        return hashlib.sha256(json.dumps(definition).encode()).hexdigest()[:16]

    def draw(self, classes: torch.Tensor, generator: torch.Generator, table: CaptionTensors) -> torch.Tensor:
        """A caption row for each image of ``classes`` ([B] on the training device): uniformly one subset
        of its unusual attributes, then uniformly one of that subset's wordings."""
        if self.kind == "digits":  # one draw per image: the same stream as before the style captions
            wording = torch.randint(table.rows.shape[2], (len(classes),), device=classes.device, generator=generator)
            return table.rows[classes, 0, wording]
        u = torch.rand(len(classes), 2, device=classes.device, generator=generator)
        subset = (u[:, 0] * table.subsets[classes]).long()
        wording = (u[:, 1] * table.wordings[classes, subset]).long()
        return table.rows[classes, subset, wording]


@dataclass(frozen=True)
class CaptionTensors:
    """A CaptionSet's index arrays on the training device."""

    rows: torch.Tensor
    subsets: torch.Tensor
    wordings: torch.Tensor

    @classmethod
    def of(cls, captions: CaptionSet, device: torch.device) -> CaptionTensors:
        return cls(*(torch.as_tensor(a, device=device) for a in (captions.rows, captions.subsets, captions.wordings)))


@lru_cache(maxsize=2)
def caption_set(kind: str) -> CaptionSet:
    """The captions of ``kind`` (one of CAPTION_SETS) and how each class of image draws from them."""
    if kind not in CAPTION_SETS:
        raise ValueError(f"captions must be one of {', '.join(CAPTION_SETS)}, got {kind!r}")
    styles = STYLES if kind == "styles" else STYLES[:1]
    classes = [[_subset_wordings(d, style) for style in styles] for d in range(NUM_DIGITS)]
    classes = [c for per_digit in classes for c in per_digit]
    prompts = [EMPTY_PROMPT, *dict.fromkeys(p for c in classes for subset in c for p in subset)]
    row = {p: i for i, p in enumerate(prompts)}
    max_subsets, max_wordings = max(map(len, classes)), max(len(s) for c in classes for s in c)
    rows = np.full((len(classes), max_subsets, max_wordings), -1, np.int64)
    wording_counts = np.zeros((len(classes), max_subsets), np.int64)
    for c, subsets in enumerate(classes):
        for s, subset in enumerate(subsets):
            rows[c, s, : len(subset)] = [row[p] for p in subset]
            wording_counts[c, s] = len(subset)
    return CaptionSet(kind, prompts, rows, np.array([len(c) for c in classes]), wording_counts)


def _subset_wordings(digit: int, style: Style) -> list[list[str]]:
    """For one class: the wordings of each subset of its mentionable attributes, the empty subset first."""
    said = [i for i, v in enumerate(mentionable(digit, style)) if v]
    subsets = [c for k in range(len(said) + 1) for c in itertools.combinations(said, k)]
    return [wordings(digit, tuple(style[i] if i in subset else 0 for i in range(len(style)))) for subset in subsets]


def prompt_table(captions: CaptionSet, encode: Callable[[list[str]], torch.Tensor], encoder_key: Sequence,
                 cache_dir: Path) -> torch.Tensor:  # fmt: skip
    """The text tokens [len(prompts), 8, 512] of every caption: encoded once, then read from
    ``cache_dir/prompt_tables/``, keyed by the captions and ``encoder_key`` (the text encoder's
    fingerprint and the device it ran on, whose kernels round differently)."""
    key = hashlib.sha256(json.dumps([captions.prompts, list(encoder_key)]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "prompt_tables" / f"{captions.kind}_{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    table = encode(captions.prompts).cpu()
    if len(captions.prompts) > 100:  # more than a second or so of encoding: worth keeping
        from runtime.files import atomic_write

        atomic_write(path, lambda f: torch.save(table, f))
    return table


# ----------------------------------------------------------------------------- styles of real images
def style_thresholds(measures: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per digit and attribute, the measure's (low, high) quantiles among that digit's images:
    float64 [NUM_DIGITS, len(ATTRIBUTES), 2]."""
    columns = [a.column for a in ATTRIBUTES]
    return np.stack([np.nanquantile(measures[labels == d][:, columns], [OUTER_QUANTILE, 1 - OUTER_QUANTILE], axis=0).T
                     for d in range(NUM_DIGITS)])  # fmt: skip


def styles_of(measures: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Each image's style: int64 [N, len(ATTRIBUTES)], -1 / +1 in its class's low / high outer quarter."""
    values = measures[:, [a.column for a in ATTRIBUTES]]
    low, high = thresholds[labels, :, 0], thresholds[labels, :, 1]
    return np.where(values < low, -1, np.where(values > high, 1, 0)).astype(np.int64)


def style_classes(labels: np.ndarray, styles: np.ndarray) -> np.ndarray:
    """The CaptionSet class of each image of the ``styles`` set."""
    index = {style: i for i, style in enumerate(STYLES)}
    return labels.astype(np.int64) * len(STYLES) + np.array([index[tuple(s)] for s in styles], np.int64)


# ----------------------------------------------------------------------------- evaluation plans
@dataclass(frozen=True)
class PromptPlan:
    """One entry per sample, set-major, then digit-major."""

    prompts: list[str]
    digits: np.ndarray
    template_index: np.ndarray  # index into the set's templates
    templates: list[str]
    sets: list[str]


PROMPT_SETS = {"seen": TRAIN_TEMPLATES, "held-out": HELDOUT_TEMPLATES}


def plan_prompts(per_digit: int, prompt_sets: dict[str, Sequence[str]] = PROMPT_SETS) -> PromptPlan:
    """``per_digit`` samples of each digit per set, cycling through the set's K templates across
    digits (sample i of digit d uses template (d * per_digit + i) mod K), so every template is used
    and, when per_digit >= K, every digit gets every template."""
    prompts, digits, index, templates, sets = [], [], [], [], []
    for name, set_templates in prompt_sets.items():
        for digit in range(NUM_DIGITS):
            digit_prompts = prompts_for(digit, set_templates)
            for i in range(per_digit):
                k = (digit * per_digit + i) % len(set_templates)
                prompts.append(digit_prompts[k])
                digits.append(digit)
                index.append(k)
                templates.append(set_templates[k])
                sets.append(name)
    return PromptPlan(prompts, np.array(digits), np.array(index), templates, sets)


@dataclass(frozen=True)
class StylePrompt:
    """One prompt of the style evaluation: a digit, and one attribute value (attribute None: plain)."""

    prompt: str
    digit: int
    attribute: int | None
    value: int
    held_out: bool


def style_plan() -> list[StylePrompt]:
    """The plain prompt of every digit, then every digit with every attribute value, held-out pairs marked."""
    plan = [StylePrompt(canonical_prompt(d), d, None, 0, False) for d in range(NUM_DIGITS)]
    for d, (i, attribute), value in itertools.product(range(NUM_DIGITS), enumerate(ATTRIBUTES), (-1, 1)):
        style = tuple(value if j == i else 0 for j in range(len(ATTRIBUTES)))
        plan.append(StylePrompt(style_prompt(d, style), d, i, value, (d, attribute.word(value)) in HELD_OUT_PAIRS))
    return plan


def training_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) pairs of the training templates, digit-major, in a fixed order."""
    return [(p, d) for d in range(NUM_DIGITS) for p in prompts_for(d)]


def heldout_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) pairs of the held-out templates, digit-major, in a fixed order."""
    return [(p, d) for d in range(NUM_DIGITS) for p in prompts_for(d, HELDOUT_TEMPLATES)]
