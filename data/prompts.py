"""Text prompts for the ten digits, split into training and held-out wordings.

The held-out templates never appear in training, so evaluation can test unseen wordings.
Every prompt fits CLIP's 8-token context (start + at most 6 BPE tokens + end).
"""

from __future__ import annotations

from data.shapes import NUM_DIGITS

DIGIT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

# "{d}" is the numeral, "{word}" the English word.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{d}",
    "{word}",
    "the digit {d}",
    "the digit {word}",
    "the number {d}",
    "the number {word}",
    "a handwritten {d}",
    "a handwritten {word}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a handwritten number {word}",
    "the numeral {d}",
    "a picture of {word}",
)

EMPTY_PROMPT = ""  # the unconditional prompt for classifier-free guidance


def prompts_for(digit: int, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[str]:
    """The prompts for one digit, in template order."""
    if digit not in range(NUM_DIGITS):
        raise ValueError(f"digit must be 0..9, got {digit!r}")
    return [t.format(d=digit, word=DIGIT_WORDS[digit]) for t in templates]


def training_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) pairs of the training templates, digit-major, in a fixed order."""
    return _pairs(TRAIN_TEMPLATES)


def heldout_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) pairs of the held-out templates, digit-major, in a fixed order."""
    return _pairs(HELDOUT_TEMPLATES)


def canonical_prompt(digit: int) -> str:
    """The short label of a digit, e.g. "7", as used for sample-grid rows."""
    return prompts_for(digit, ("{d}",))[0]


def _pairs(templates: tuple[str, ...]) -> list[tuple[str, int]]:
    return [(prompt, digit) for digit in range(NUM_DIGITS) for prompt in prompts_for(digit, templates)]
