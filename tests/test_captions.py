"""Captions: every one fits the text encoder, says only what is true of its image, never joins a held-out
word to its digit, and is drawn as documented; the styles come from the measured outer quarters; a
shipped vocabulary keeps its captions, and its fingerprint changes exactly when captions do."""

import dataclasses
import hashlib
import json
import re
from collections import Counter

import numpy as np
import open_clip
import pytest
import torch

from data.captions import (
    DIGIT_WORDS,
    EMPTY_PROMPT,
    VOCABULARIES,
    Attribute,
    CaptionTensors,
    canonical_prompt,
    caption_set,
    plan_prompts,
    prompt_table,
    prompts_for,
    style_classes,
    style_plan,
    style_thresholds,
    styles_of,
    vocabulary_named,
)
from data.shapes import MEASURES

STYLES = VOCABULARIES["styles"]
ATTRIBUTES = STYLES.attributes
WORDS = [(a, v, a.word(v)) for a in ATTRIBUTES for v in (-1, 1)]
NAMES = {str(d): d for d in range(10)} | {w: d for d, w in enumerate(DIGIT_WORDS)}  # a digit named, either way
CLIP_TOKENIZER = open_clip.get_tokenizer("ViT-B-32")  # the 77-token tokenizer: counts what the 8 would cut


def tokens(prompt: str) -> int:
    return int((CLIP_TOKENIZER([prompt])[0] != 0).sum())  # start + BPE tokens + end


def class_style(captions, c: int) -> tuple[int, tuple[int, ...]]:
    return (c, (0,) * len(ATTRIBUTES)) if not captions.vocabulary.attributes else divmod(c, len(STYLES.styles))


def drawable(captions, c: int) -> list[str]:
    rows = captions.rows[c][captions.rows[c] >= 0]
    return [captions.prompts[r] for r in rows]


def said(prompt: str) -> set[str]:
    return {word for _, _, word in WORDS if re.search(rf"\b{word}\b", prompt)}


@pytest.mark.parametrize("name", VOCABULARIES)
def test_every_caption_and_evaluation_prompt_fits_eight_tokens(name):
    vocabulary = vocabulary_named(name)
    prompts = caption_set(vocabulary).prompts + [p.prompt for p in style_plan(vocabulary)]
    prompts += plan_prompts(len(vocabulary.templates), vocabulary.prompt_sets).prompts
    assert all(tokens(p) <= 8 for p in prompts), [p for p in prompts if tokens(p) > 8]


@pytest.mark.parametrize("name", VOCABULARIES)
def test_plain_prompts_name_their_digit_and_no_other_and_held_out_wordings_are_never_trained(name):
    vocabulary = vocabulary_named(name)
    plan = plan_prompts(max(map(len, vocabulary.prompt_sets.values())), vocabulary.prompt_sets)  # every template
    for prompt, digit in zip(plan.prompts, plan.digits):
        assert [NAMES[w] for w in re.findall(r"\w+", prompt) if w in NAMES] == [digit], prompt
    seen = {p for p, s in zip(plan.prompts, plan.sets) if s == "seen"}
    held_out = {p for p, s in zip(plan.prompts, plan.sets) if s == "held-out"}
    assert (
        len(seen) == 10 * len(vocabulary.templates) and len(held_out) == 10 * len(vocabulary.held_out_templates) >= 20
    )
    assert seen <= set(caption_set(vocabulary).prompts) and held_out.isdisjoint(caption_set(vocabulary).prompts)


def test_canonical_and_empty_prompts():
    assert [canonical_prompt(d) for d in range(10)] == [str(d) for d in range(10)]
    assert EMPTY_PROMPT == "" and caption_set("styles").prompts[0] == EMPTY_PROMPT
    with pytest.raises(ValueError):
        prompts_for(10, STYLES.templates)
    with pytest.raises(ValueError, match="captions must be one of digits, styles"):
        vocabulary_named("colours")


def test_the_old_prompts_are_a_subset_and_the_showcase_captions_exist():
    styles, digits = caption_set("styles"), caption_set("digits")
    assert set(digits.prompts) <= set(styles.prompts)
    assert digits.prompts[1:9] == ["0", "zero", "the digit 0", "the digit zero", "the number 0", "the number zero",
                                   "a handwritten 0", "a handwritten zero"]  # fmt: skip
    assert len(digits.prompts) == 1 + 10 * 8
    for prompt in ("a thin 7 slanted left", "a thick 7", "a wide 0", "an 8 slanted right", "thick", "slanted left"):
        assert prompt in styles.prompts
    assert tokens("a thin 7 slanted left") == 8 and tokens("seven, thick and slanted right") == 9


def test_captions_say_only_what_is_true_of_the_image_and_plain_digits_fit_every_style():
    captions = caption_set("styles")
    for c in range(len(captions.rows)):
        digit, style_index = class_style(captions, c)
        style = STYLES.styles[style_index]
        true_words = {a.word(v) for a, v in zip(ATTRIBUTES, style) if v}
        prompts = drawable(captions, c)
        assert str(digit) in prompts  # the plain digit, whatever the style
        for prompt in prompts:
            assert said(prompt) <= true_words, (digit, style, prompt)
            named = set(re.findall(r"\b\d\b", prompt))
            assert named <= {str(digit)}


def test_held_out_words_are_never_said_of_their_digit_but_are_of_others():
    captions = caption_set("styles")
    per_digit = len(STYLES.styles)
    for digit, word in STYLES.held_out_pairs:
        for c in range(digit * per_digit, (digit + 1) * per_digit):
            assert all(word not in said(p) for p in drawable(captions, c)), (digit, word)
        others = [p for c in range(len(captions.rows)) if c // per_digit != digit for p in drawable(captions, c)]
        assert any(word in said(p) for p in others)
    held_out = [p for p in style_plan(STYLES) if p.held_out]
    assert {(p.digit, ATTRIBUTES[p.attribute].word(p.value)) for p in held_out} == STYLES.held_out_pairs


def test_a_draw_takes_each_subset_of_attributes_equally_often():
    captions = caption_set("styles")
    style = (1, 0, -1)  # thick and slanted left: subsets {}, {thick}, {slanted left}, {both}
    c = 7 * len(STYLES.styles) + STYLES.styles.index(style)
    tensors = CaptionTensors.of(captions, torch.device("cpu"))
    rows = captions.draw(torch.full((40_000,), c), torch.Generator().manual_seed(0), tensors)
    kinds = Counter(frozenset(said(captions.prompts[r])) for r in rows.tolist())
    assert set(kinds) == {
        frozenset(),
        frozenset({"thick"}),
        frozenset({"slanted left"}),
        frozenset({"thick", "slanted left"}),
    }
    assert all(abs(n / 40_000 - 0.25) < 0.01 for n in kinds.values())


def test_the_digit_set_draws_as_before_the_style_captions():
    """One randint per image over the 8 templates: the same stream, rows and prompts as the old code."""
    captions = caption_set("digits")
    tensors = CaptionTensors.of(captions, torch.device("cpu"))
    labels = torch.tensor([3, 7, 7, 0])
    got = captions.draw(labels, torch.Generator().manual_seed(5), tensors)
    template = torch.randint(8, (4,), generator=torch.Generator().manual_seed(5))
    assert got.tolist() == (1 + labels * 8 + template).tolist()


def test_styles_are_the_outer_quarters_of_each_digit_class():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 400)
    measures = rng.normal(size=(len(labels), len(MEASURES))) + labels[:, None]  # each class shifted
    thresholds = style_thresholds(STYLES, measures, labels)
    styles = styles_of(STYLES, measures, labels, thresholds)
    for d in range(10):
        for i in range(len(ATTRIBUTES)):
            values = styles[labels == d, i]
            assert (values == -1).mean() == pytest.approx(0.25, abs=0.01)
            assert (values == 1).mean() == pytest.approx(0.25, abs=0.01)
    classes = style_classes(STYLES, labels, styles)
    assert (classes // len(STYLES.styles) == labels).all()
    assert [STYLES.styles[s] for s in classes[:5] % len(STYLES.styles)] == [tuple(s) for s in styles[:5]]


def test_slant_words_follow_the_measured_sign():
    slant = next(a for a in ATTRIBUTES if a.measure == "slant")
    assert slant.word(1) == "slanted right" and slant.word(-1) == "slanted left"  # positive: the top leans right


def test_the_prompt_table_is_encoded_once_then_read_from_the_cache(tmp_path):
    captions = caption_set("styles")
    calls = []

    def encode(prompts):
        calls.append(len(prompts))
        return torch.arange(len(prompts), dtype=torch.float32)[:, None, None].expand(-1, 8, 512)

    first = prompt_table(captions, encode, [1.0, "cpu"], tmp_path)
    again = prompt_table(captions, encode, [1.0, "cpu"], tmp_path)
    other = prompt_table(captions, encode, [2.0, "cpu"], tmp_path)  # another encoder: encoded afresh
    assert calls == [len(captions.prompts)] * 2 and torch.equal(first, again) and torch.equal(first, other)


# ----------------------------------------------------------------------------- versions
def table_digest(captions) -> str:
    arrays = (captions.rows, captions.subsets, captions.wordings)
    return hashlib.sha256(json.dumps(captions.prompts).encode() + b"".join(a.tobytes() for a in arrays)).hexdigest()


@pytest.mark.parametrize(
    "name, prompts, digest, fingerprint",
    [
        ("digits", 81, "e8e9da2040512e52fb2dcffb226d6d5bf9e8f8b770c60e670a9555190dfe2df7", "8246d6a98428cf34"),
        ("styles", 613, "fbca4b710b32552b707e7cbfd48905534b0eec96ddde7c66c82f87f6502bec32", "9766c03bcc05bdcf"),
        ("free-text", 3891, "825f54d66c322460836fb1937c1854ef48cff5b6ad0d8b0468ea1e7ea8b82361", "17176d8445c70f70"),
        ("free-text-2", 3918, "b847a19c4aeb03c503fea6cd2847d0cace4c985593e552861c5abdf2f18fe833", "cf8437b93bba30c5"),
    ],
)
def test_a_shipped_vocabulary_keeps_the_captions_its_checkpoints_were_trained_on(name, prompts, digest, fingerprint):
    """The prompts and draw tables as the code before vocabularies had versions built them (a084e06; free-text:
    as its first models were trained), and the fingerprint checkpoints record: an edit to a shipped vocabulary
    fails here; add a new one instead. Free-text's captions also depend on the tokenizer's BPE vocabulary,
    which pyproject.toml pins with open_clip."""
    captions = caption_set(name)
    assert (len(captions.prompts), table_digest(captions)) == (prompts, digest)
    assert captions.fingerprint == vocabulary_named(name).fingerprint == fingerprint


def test_the_fingerprint_changes_exactly_when_the_captions_do():
    other_units = tuple(dataclasses.replace(a, unit="u") for a in ATTRIBUTES)
    same = [dataclasses.replace(STYLES, name="renamed"), dataclasses.replace(STYLES, attributes=other_units)]
    assert {v.fingerprint for v in same} == {STYLES.fingerprint}
    thick = ATTRIBUTES[0]
    changed = [
        dataclasses.replace(STYLES, templates=STYLES.templates[:-1]),
        dataclasses.replace(STYLES, held_out_templates=STYLES.held_out_templates[:-1]),
        dataclasses.replace(STYLES, held_out_pairs=STYLES.held_out_pairs - {(4, "thick")}),
        dataclasses.replace(STYLES, outer_quantile=0.2),  # the same words, said of other images
        dataclasses.replace(STYLES, attributes=(dataclasses.replace(thick, measure="area"), *ATTRIBUTES[1:])),
        dataclasses.replace(
            STYLES,
            attributes=(dataclasses.replace(thick, low="slim"), *ATTRIBUTES[1:]),
            held_out_pairs=STYLES.held_out_pairs - {(5, "thin")} | {(5, "slim")},
        ),
    ]
    fingerprints = [v.fingerprint for v in changed]
    assert len(set(fingerprints)) == len(changed) and STYLES.fingerprint not in fingerprints
    assert all(re.fullmatch("[0-9a-f]{16}", f) for f in fingerprints)


def test_a_vocabulary_refuses_what_would_silently_do_nothing():
    tall = Attribute("height", "short", "tall", "px", before=True)
    with pytest.raises(ValueError, match="held-out pair"):
        dataclasses.replace(STYLES, held_out_pairs=STYLES.held_out_pairs | {(2, "tall")})  # no attribute says it
    with pytest.raises(ValueError, match="unknown measure 'girth'"):
        dataclasses.replace(STYLES, attributes=(*ATTRIBUTES, dataclasses.replace(tall, measure="girth")))
    with pytest.raises(ValueError, match="outer quantile"):
        dataclasses.replace(STYLES, outer_quantile=0.5)


@pytest.mark.parametrize("name", list(VOCABULARIES))
def test_a_vocabularys_examples_are_prompts_it_trains_on(name):
    vocabulary = VOCABULARIES[name]
    examples = vocabulary.examples()
    assert len(set(examples)) == 3 and set(examples) <= set(caption_set(vocabulary).prompts[1:])
