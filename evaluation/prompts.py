"""The prompt benchmark: does a freely typed prompt get the digit it names, and do style words, and their
synonyms, move the stroke the way they say?

Its prompts come from one vocabulary's definitions (BENCHMARK, data/captions.py), whatever the model was
trained on, so that every model answers the same prompts:

- wordings of the plain digit, ``per_wording`` images of each digit for each: the trained ones, the
  held-out ones (never in a training caption), and wordings with distractors: hand-written ones with
  words no caption holds ("a faint thin-stroked 7") and ``GENERATED`` trained wordings with words of
  the evaluation sixteenth of the BPE vocabulary inserted (never a training distractor);
- style words: every attribute word and trained synonym, and the held-out synonyms, said of each digit
  (but the held-out (digit, word) pairs, which the style report covers): "a bold 7", "a 7 tilted right".
  Image j of every prompt has the same seed as image j of the plain "7", so only the words differ;
  "moved the right way" is the share of images whose measure (data/morphometry.py) moved from the plain
  image's in the word's direction. Chance is 50%.
- the digit rule: what the pipeline answers to prompts that name no digit, two, or a longer number
  (data/prompts.py), passed in as ``refusal``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data.captions import (
    Vocabulary,
    evaluation_words,
    fits,
    prompts_for,
    vocabulary_named,
    with_articles,
)
from data.morphometry import measure_digits
from data.shapes import NUM_DIGITS
from evaluation.judge import Judge, judge_images
from evaluation.report import markdown_table, percent
from evaluation.styles import SampleFn

BENCHMARK = "free-text"  # the vocabulary whose definitions the benchmark's prompts come from
GENERATED = 6  # wordings with evaluation-only distractor words
RULE_PROMPTS = ("42", "3 or 8", "seventy", "a cat", "thick", "", "7, a seven")
SET_LABELS = {"trained": "trained wordings", "held-out": "held-out wordings", "distractors": "with distractors"}
Refusal = Callable[[str], "str | None"]  # a prompt -> the pipeline's one-line refusal, or None if it draws


@dataclass(frozen=True)
class StyleWord:
    word: str
    attribute: int  # index into the vocabulary's attributes
    value: int  # -1 low, +1 high
    held_out: bool  # a held-out synonym


def wording_sets(vocabulary: Vocabulary) -> dict[str, tuple[str, ...]]:
    """The benchmark's wordings of the plain digit, by set ("{d}": the numeral, "{word}": the word)."""
    free = vocabulary.free_text
    return {
        "trained": vocabulary.templates,
        "held-out": vocabulary.held_out_templates,
        "distractors": (*free.unknown_wordings, *generated_wordings(vocabulary)),
    }


def generated_wordings(vocabulary: Vocabulary, count: int = GENERATED) -> tuple[str, ...]:
    """``count`` trained wordings, each with one to three evaluation-only words at random places, such
    that every digit's prompt fits the text encoder (fixed by the seed below)."""
    rng = np.random.default_rng(20)
    words, templates, wordings = evaluation_words(vocabulary), vocabulary.templates, []
    while len(wordings) < count:
        placed = templates[len(wordings) % len(templates)].split()
        for _ in range(int(rng.integers(1, 4))):
            placed.insert(int(rng.integers(len(placed) + 1)), words[int(rng.integers(len(words)))])
        wording = " ".join(placed)
        if all(fits(p) for p in prompts_for(7, [wording]) + prompts_for(8, [wording])):
            wordings.append(wording)
    return tuple(wordings)


def style_words(vocabulary: Vocabulary) -> list[StyleWord]:
    """Every attribute's words and trained synonyms, then the held-out synonyms."""
    free, found = vocabulary.free_text, []
    held_out = dict(free.held_out_synonyms)
    for i, attribute in enumerate(vocabulary.attributes):
        for value in (-1, 1):
            word = attribute.word(value)
            found += [StyleWord(w, i, value, False) for w in free.words_for(word)]
            found += [StyleWord(w, i, value, True) for w in held_out.get(word, ())]
    return found


def style_prompt(word: str, digit: int) -> str:
    """The word said of the digit where it goes: "a bold 7", "a 7 tilted right", "an italic 8"."""
    phrase = [word, str(digit)] if " " not in word else [str(digit), word]
    return " ".join(with_articles(["a", *phrase]))


def evaluate_prompts(sample: SampleFn, judge: Judge, per_wording: int, refusal: Refusal) -> dict:
    """Sample and score the benchmark; the report's numbers."""
    vocabulary = vocabulary_named(BENCHMARK)
    return {
        "per_wording": per_wording,
        "wordings": _wordings(sample, judge, per_wording, vocabulary),
        "styles": _styles(sample, judge, per_wording, vocabulary),
        "rule": [{"prompt": p, "answer": refusal(p)} for p in RULE_PROMPTS],
    }


def _wordings(sample: SampleFn, judge: Judge, per_wording: int, vocabulary: Vocabulary) -> list[dict]:
    rows = [(name, t) for name, templates in wording_sets(vocabulary).items() for t in templates]
    prompts = [p for _, t in rows for p in _for_every_digit(t)]
    correct = _judged(sample(prompts, per_wording, ""), judge, np.tile(np.arange(NUM_DIGITS), len(rows)))
    by_wording = correct.reshape(len(rows), NUM_DIGITS, per_wording)
    return [
        {
            "set": name,
            "wording": t,
            "accuracy": float(by_wording[i].mean()),
            "per_digit": by_wording[i].mean(1).tolist(),
        }
        for i, (name, t) in enumerate(rows)
    ]


def _for_every_digit(template: str) -> list[str]:
    return [prompt for d in range(NUM_DIGITS) for prompt in prompts_for(d, [template])]


def _styles(sample: SampleFn, judge: Judge, per_wording: int, vocabulary: Vocabulary) -> list[dict]:
    words = style_words(vocabulary)
    plan = [(w, d) for w in words for d in range(NUM_DIGITS) if not _held_out_pair(vocabulary, w, d)]
    prompts = [str(d) for d in range(NUM_DIGITS)] + [style_prompt(w.word, d) for w, d in plan]
    images = sample(prompts, per_wording, "")
    flat = images.reshape(-1, *images.shape[2:])
    measures = measure_digits(flat).reshape(len(prompts), per_wording, -1)
    digits = np.array([d for d in range(NUM_DIGITS)] + [d for _, d in plan])
    correct = _judged(images, judge, digits).reshape(len(prompts), per_wording)
    results = []
    for word in words:
        rows = [NUM_DIGITS + k for k, (w, _) in enumerate(plan) if w == word]
        column = vocabulary.attributes[word.attribute].column
        moved = [word.value * (measures[r, :, column] - measures[digits[r], :, column]) for r in rows]
        moved = np.concatenate(moved)
        results.append({
            "word": word.word,
            "means": vocabulary.attributes[word.attribute].word(word.value),
            "held_out": word.held_out,
            "moved_right": float(np.mean(moved[~np.isnan(moved)] > 0)),
            "digit_accuracy": float(correct[rows].mean()),
        })  # fmt: skip
    return results


def _held_out_pair(vocabulary: Vocabulary, word: StyleWord, digit: int) -> bool:
    return (digit, vocabulary.attributes[word.attribute].word(word.value)) in vocabulary.held_out_pairs


def _judged(images: np.ndarray, judge: Judge, digits: np.ndarray) -> np.ndarray:
    """Whether the judge reads each image ([prompts, per prompt, 28, 28]) as its prompt's digit, flat."""
    logits, _ = judge_images(judge, images.reshape(-1, *images.shape[2:]))
    return logits.argmax(1) == np.repeat(digits, images.shape[1])


# ----------------------------------------------------------------------------- report
def prompt_summary(report: dict) -> dict[str, dict[str, float]]:
    """Per wording set: mean and worst digit accuracy; per group of style words: moved the right way and
    digit accuracy."""
    out = {}
    for name in dict.fromkeys(w["set"] for w in report["wordings"]):
        accuracies = [w["accuracy"] for w in report["wordings"] if w["set"] == name]
        out[SET_LABELS[name]] = {"mean": float(np.mean(accuracies)), "worst": float(min(accuracies))}
    for name, held_out in (("trained style words", False), ("held-out synonyms", True)):
        words = [w for w in report["styles"] if w["held_out"] == held_out]
        out[name] = {key: float(np.mean([w[key] for w in words])) for key in ("moved_right", "digit_accuracy")}
    return out


def prompt_tables(report: dict) -> str:
    """Markdown: the summary, every wording, every style word, the digit rule."""
    summary = prompt_summary(report)
    head = markdown_table(
        ["prompts", "digit accuracy: mean", "worst", "style moved the right way"],
        [
            [name, percent(s.get("mean", s.get("digit_accuracy"))), percent(s["worst"]) if "worst" in s else "",
             percent(s["moved_right"]) if "moved_right" in s else ""]
            for name, s in summary.items()
        ],
        "lrrr",
    )  # fmt: skip
    wordings = markdown_table(
        ["set", "wording", "digit accuracy", "worst digit"],
        [
            [w["set"], f"`{w['wording']}`", percent(w["accuracy"]), _worst_digit(w["per_digit"])]
            for w in report["wordings"]
        ],
        "llrr",
    )
    styles = markdown_table(
        ["word", "means", "held out", "moved the right way", "digit accuracy"],
        [
            [f'"{w["word"]}"', w["means"], "yes" if w["held_out"] else "", percent(w["moved_right"]),
             percent(w["digit_accuracy"])]
            for w in report["styles"]
        ],
        "llcrr",
    )  # fmt: skip
    rule = markdown_table(
        ["prompt", "answer"],
        [[f'"{r["prompt"]}"', r["answer"] or "drawn"] for r in report["rule"]],
        "ll",
    )
    title = f"### prompt benchmark ({report['per_wording']} images per digit and wording)"
    return f"{title}\n\n{head}\n\n{wordings}\n\n{styles}\n\n{rule}\n"


def _worst_digit(per_digit: list[float]) -> str:
    digit = int(np.argmin(per_digit))
    return f"{digit}: {percent(per_digit[digit])}"
