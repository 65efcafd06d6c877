"""Free text: the free-text vocabulary's generated captions name only their digit and say only what is true
of their image, keep the held-out and the evaluation words out of training, and carry distractor words;
a prompt is read as documented (the digit rule, and what a too-long prompt keeps); the prompt benchmark
scores a sampler it can predict."""

import re
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import ndimage

from data.captions import (
    DIGIT_WORDS,
    PUNCTUATION,
    VOCABULARIES,
    CaptionTensors,
    caption_set,
    evaluation_words,
    prompts_for,
    training_words,
)
from data.mnist import load_mnist
from data.prompts import Reader, named
from data.tokens import words_of
from evaluation.judge import load_judge
from evaluation.prompts import evaluate_prompts, prompt_summary, prompt_tables, style_prompt, wording_sets
from text2digit import NotOneDigit, PromptTooLong, Request

FREE = VOCABULARIES["free-text-2"]
EVERY_FREE_TEXT = pytest.mark.parametrize("vocabulary", ["free-text", "free-text-2", "free-text-3"])
SYNONYMS = dict(FREE.free_text.synonyms)
HELD_OUT_SYNONYMS = dict(FREE.free_text.held_out_synonyms)


def phrases_said(prompt: str) -> set[tuple[int, int]]:
    """(attribute, value) of every attribute word or trained synonym in ``prompt``, longest phrases first."""
    found, text = set(), f" {prompt} "
    phrases = [(w, i, v) for i, a in enumerate(FREE.attributes) for v in (-1, 1)
               for w in (a.word(v), *SYNONYMS.get(a.word(v), ()))]  # fmt: skip
    for word, i, v in sorted(phrases, key=lambda p: -len(p[0])):
        if f" {word} " in text:
            found.add((i, v))
            text = text.replace(f" {word} ", " ")
    return found


def digits_said(prompt: str) -> set[int]:
    return {int(w) for w in re.findall(r"\b\d\b", prompt)} | {DIGIT_WORDS.index(w) for w in prompt.split()
                                                              if w in DIGIT_WORDS}  # fmt: skip


@EVERY_FREE_TEXT
def test_every_caption_names_only_its_digit_and_says_only_what_is_true_of_its_image(vocabulary):
    captions = caption_set(vocabulary)
    per_digit = len(FREE.styles)
    for c in range(len(captions.rows)):
        digit, style = divmod(c, per_digit)
        true = {(i, v) for i, v in enumerate(FREE.styles[style]) if v}
        held = {(i, v) for i, v in true if (digit, FREE.attributes[i].word(v)) in FREE.held_out_pairs}
        for row in set(captions.rows[c][captions.rows[c] >= 0].tolist()):
            prompt = captions.prompts[row]
            assert digits_said(prompt) <= {digit}, (c, prompt)
            assert phrases_said(prompt) <= true - held, (digit, FREE.styles[style], prompt)


@EVERY_FREE_TEXT
def test_held_out_and_evaluation_words_are_in_no_training_caption(vocabulary):
    captions = caption_set(vocabulary)
    trained = {w for p in captions.prompts for w in p.split()}
    held_out = {w for words in HELD_OUT_SYNONYMS.values() for phrase in words for w in words_of(phrase)}
    assert {"heavy", "skinny", "condensed", "extended", "tilted", "stroked"} <= held_out | {"stroked"}
    assert not trained & (held_out - FREE.known_words), trained & held_out
    assert not trained & set(evaluation_words(FREE))
    assert not trained & {"please", "write", "numeral", "picture", "faint", ".", "sketch"}
    held_out_prompts = {p for t in FREE.held_out_templates for d in range(10) for p in prompts_for(d, [t])}
    assert held_out_prompts.isdisjoint(captions.prompts)
    assert len(evaluation_words(FREE)) > 1000 and set(evaluation_words(FREE)).isdisjoint(training_words(FREE))


@EVERY_FREE_TEXT
def test_a_share_of_the_captions_drawn_carry_distractors_and_those_are_unknown_single_words(vocabulary):
    captions = caption_set(vocabulary)
    tensors = CaptionTensors.of(captions, torch.device("cpu"))
    classes = torch.randint(len(captions.rows), (20_000,), generator=torch.Generator().manual_seed(0))
    drawn = [captions.prompts[r] for r in captions.draw(classes, torch.Generator().manual_seed(1), tensors).tolist()]
    unknown = Counter(w for p in drawn for w in p.split() if w not in FREE.known_words)
    with_distractor = np.mean([any(w not in FREE.known_words for w in p.split()) for p in drawn])
    assert 0.1 < with_distractor < 0.25, with_distractor  # a quarter are variants, three in five with distractors
    pool = set(training_words(FREE)) | set(PUNCTUATION)
    assert set(unknown) <= pool and len(unknown) > 1000  # a thousand different words and more, each one token
    assert all(len(words_of(w)) == 1 for w in list(unknown)[:500])
    synonyms = {s for words in SYNONYMS.values() for s in words}
    assert synonyms <= {w for p in drawn for w in re.findall("|".join(sorted(synonyms, key=len)[::-1]), p)}


def test_word_dropout_leaves_frame_words_out_and_never_the_digit_or_a_style_word():
    """free-text-2 leaves out each frame word a quarter of the time ("digit 3", "image of two"; never a held-out
    wording such as "digit three"); "free-text" never does. That the digit and its style words stay is the
    first test above, which holds of every caption."""

    def frames_cut(name):
        prompts = caption_set(name).prompts
        return [p for p in prompts if re.fullmatch(r"(digit|number|image of|drawing of|of a) (\d|[a-z]+)", p)]

    assert not frames_cut("free-text")
    cut = frames_cut("free-text-2")
    assert len(cut) > 5 and {p.split()[-1] for p in cut} & set(DIGIT_WORDS)
    assert not {p for d in range(10) for p in prompts_for(d, ["digit {word}", "number {word}"])} & set(cut)


@pytest.mark.parametrize(("vocabulary", "low", "high"), [("free-text-2", 0.55, 0.68), ("free-text-3", 0.71, 0.79)])
def test_a_variant_says_a_trained_synonym_as_often_as_its_vocabulary_says(vocabulary, low, high):
    """free-text-2 draws an attribute's word and its synonyms alike (two in three for "thick", one in two for
    "wide"); free-text-3 says a synonym three times in four (synonym_share)."""
    free = VOCABULARIES[vocabulary]
    by_synonym = []
    for digit in range(10):
        for style in free.styles:
            for caption in free.free_text.variants_of(free, digit, style):
                text = f" {caption} "
                for attribute, value in zip(free.attributes, style):
                    words = free.free_text.words_for(attribute.word(value)) if value else ()
                    if any(f" {w} " in text for w in words):
                        by_synonym.append(f" {words[0]} " not in text)
    assert len(by_synonym) > 2000 and low < np.mean(by_synonym) < high, np.mean(by_synonym)


@pytest.mark.parametrize(
    ("prompt", "digits", "numbers", "digit"),
    [
        ("7", (7,), (), 7),
        ("Seven", (7,), (), 7),
        ("a faint thin-stroked 7", (7,), (), 7),
        ("7, a SEVEN!", (7, 7), (), 7),
        ("7th", (7,), (), 7),
        ("the digit 0, handwritten", (0,), (), 0),
        ("3 or 8", (3, 8), (), None),
        ("one 7", (1, 7), (), None),
        ("42", (), ("42",), None),
        ("3.5", (3, 5), (), None),
        ("seventy", (), ("seventy",), None),
        ("a cat", (), (), None),
        ("thick", (), (), None),
        ("someone", (), (), None),  # "one" inside a word names nothing
    ],
)
def test_what_a_prompt_names(prompt, digits, numbers, digit):
    got = named(prompt)
    assert (got.digits, got.numbers, got.digit) == (digits, numbers, digit)


def test_a_too_long_prompt_loses_unknown_words_from_the_last_and_keeps_digit_and_style_words():
    keep = Reader(FREE.known_words)
    assert keep.read("a thin 7") == "a thin 7" and keep.read("write Seven") == "write Seven"  # fits: as typed
    assert keep.read("a faint thin-stroked 7") == "a faint thin - 7"  # "stroked" (2 tokens) goes first
    assert keep.read("please draw me a handwritten number seven") == "please draw a handwritten number seven"
    assert keep.read("my cat wants a thick 7 slanted left") == "a thick 7 slanted left"
    everything_known = "a thick wide handwritten 7 slanted left"
    assert keep.read(everything_known) == everything_known  # still too long: the encoder cuts it


def test_dropping_unknown_words_leaves_the_words_the_model_was_trained_on():
    drop = Reader(FREE.known_words, drop_unknown=True)
    assert drop.read("Seven") == "Seven" and drop.read("a thin 7") == "a thin 7"  # nothing to drop: as typed
    assert drop.read("a faint thin-stroked 7") == "a thin 7"
    assert drop.read("the digit 7, handwritten") == "the digit 7 handwritten"
    assert drop.read("I would like a SEVEN") == "a seven"
    assert drop.read("an elegant seven") == "a seven" and drop.read("a quirky 8") == "an 8"  # articles mended
    assert drop.read("blurry") == ""  # a negative prompt of unknown words: the empty prompt
    assert drop.read("a thick wide handwritten 7 slanted left") == "a thick wide handwritten 7 slanted left"


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ("42", "names the number 42, and an image is one digit"),
        ("seventy", "names the number seventy"),
        ("3 or 8", "names 2 different digits (3, 8)"),
        ("a cat", "names no digit; name the one to draw"),
        ("thick", "names no digit"),
    ],
)
def test_a_prompt_that_does_not_name_one_digit_is_refused_in_one_line(prompt, fragment):
    with pytest.raises(NotOneDigit) as refused:
        Request((prompt,)).validate()
    assert fragment in str(refused.value) and "\n" not in str(refused.value)
    assert refused.value.render(lambda name: f"--{name}").count("--prompt") <= 1


def test_what_the_encoder_reads_is_checked_and_said():
    keep, drop = Reader(FREE.known_words), Reader(FREE.known_words, drop_unknown=True)
    assert Request(("7", "a thin 7"), negative_prompt="thick").validate(reader=drop) == []
    assert Request(("a faint thin-stroked 7",)).validate(reader=keep) == [
        "prompt 'a faint thin-stroked 7' is read as 'a faint thin - 7': words the model was not trained on "
        "are left out, last first, to fit the encoder's 8 tokens"
    ]
    assert Request(("a faint 7",)).validate(reader=drop) == [
        "prompt 'a faint 7' is read as 'a 7': words the model was not trained on are left out: its text "
        "encoder is the seeded random one, which cannot know them"
    ]
    with pytest.raises(PromptTooLong):
        Request(("a thick wide handwritten 7 slanted left",)).validate(reader=drop)
    cut = Request(("a thick wide handwritten slanted left 7",), allow_truncation=True)
    with pytest.raises(NotOneDigit, match="names no digit in the 8 tokens the encoder reads"):
        cut.validate(reader=keep)  # the digit itself would be cut
    assert Request(("a thick wide handwritten slanted left 7",)).validate() == []  # lengths wait for the model


# ----------------------------------------------------------------------------- the benchmark
def thickened(image: np.ndarray) -> np.ndarray:
    return np.maximum(image, ndimage.grey_dilation(image, size=(1, 2, 2)))  # each of [N, 28, 28]


@pytest.fixture(scope="module")
def mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    mnist = load_mnist()
    return mnist.test_images[:400], mnist.test_labels[:400]


def test_the_benchmark_scores_a_sampler_whose_answers_it_can_predict(mnist_sample):
    """Real test digits stand in for the model: the prompt's digit, read independently, and for a thick
    word the same digit dilated. So every wording scores 100%, thick words move the stroke the right way
    every time, thin ones never (nothing thins), and the judge reads the digits."""
    images, labels = mnist_sample
    by_digit = {d: images[labels == d][:3] for d in range(10)}
    thick = {w for w in ("thick", *SYNONYMS["thick"], *HELD_OUT_SYNONYMS["thick"])}

    def sample(prompts, per_prompt, negative):
        rows = []
        for p in prompts:
            digit = next(iter(digits_said(p.replace(",", " ").replace(".", " ").replace("!", " "))))
            row = by_digit[digit][:per_prompt]
            rows.append(thickened(row) if any(w in p for w in thick) else row)
        return np.stack(rows)

    report = evaluate_prompts(sample, load_judge(), 3, lambda p: None if named(p).digit is not None else "no")
    summary = prompt_summary(report)
    assert {k: v["mean"] for k, v in summary.items() if "mean" in v} == {
        "trained wordings": 1.0, "held-out wordings": 1.0, "with distractors": 1.0
    }  # fmt: skip
    moved = {s["word"]: s["moved_right"] for s in report["styles"]}
    assert all(moved[w] == 1.0 for w in thick) and moved["thin"] == 0.0
    assert [r["answer"] for r in report["rule"]].count(None) == 1  # only "7, a seven" is drawn
    assert "| held-out wordings |" in prompt_tables(report)


def test_benchmark_prompts_fit_and_name_their_digit():
    for name, templates in wording_sets(FREE).items():
        for t in templates:
            for d in range(10):
                prompt = t.format(d=d, word=DIGIT_WORDS[d])
                assert named(prompt).digit == d, (name, prompt)
    assert style_prompt("italic", 8) == "an italic 8" and style_prompt("tilted right", 8) == "an 8 tilted right"
