"""Captions: every one fits the text encoder, says only what is true of its image, never joins a held-out
word to its digit, and is drawn as documented; the styles come from the measured outer quarters."""

import re
from collections import Counter

import numpy as np
import open_clip
import pytest
import torch

from data.captions import (
    ATTRIBUTES,
    CAPTION_SETS,
    HELD_OUT_PAIRS,
    STYLES,
    TRAIN_TEMPLATES,
    CaptionTensors,
    caption_set,
    prompt_table,
    prompts_for,
    style_classes,
    style_plan,
    style_thresholds,
    styles_of,
)
from data.morphometry import MEASURES

WORDS = [(a, v, a.word(v)) for a in ATTRIBUTES for v in (-1, 1)]
CLIP_TOKENIZER = open_clip.get_tokenizer("ViT-B-32")  # the 77-token tokenizer: counts what the 8 would cut


def tokens(prompt: str) -> int:
    return int((CLIP_TOKENIZER([prompt])[0] != 0).sum())  # start + BPE tokens + end


def class_style(captions, c: int) -> tuple[int, tuple[int, ...]]:
    return (c, (0,) * len(ATTRIBUTES)) if captions.kind == "digits" else divmod(c, len(STYLES))


def drawable(captions, c: int) -> list[str]:
    rows = captions.rows[c][captions.rows[c] >= 0]
    return [captions.prompts[r] for r in rows]


def said(prompt: str) -> set[str]:
    return {word for _, _, word in WORDS if re.search(rf"\b{word}\b", prompt)}


@pytest.mark.parametrize("kind", CAPTION_SETS)
def test_every_caption_fits_eight_tokens(kind):
    captions = caption_set(kind)
    assert all(tokens(p) <= 8 for p in captions.prompts), [p for p in captions.prompts if tokens(p) > 8]
    assert all(tokens(p.prompt) <= 8 for p in style_plan())


def test_the_old_prompts_are_a_subset_and_the_showcase_captions_exist():
    styles, digits = caption_set("styles"), caption_set("digits")
    assert set(digits.prompts) <= set(styles.prompts)
    assert digits.prompts[1:] == [p for d in range(10) for p in prompts_for(d, TRAIN_TEMPLATES)]
    for prompt in ("a thin 7 slanted left", "a thick 7", "a wide 0", "an 8 slanted right", "thick", "slanted left"):
        assert prompt in styles.prompts
    assert tokens("a thin 7 slanted left") == 8 and tokens("seven, thick and slanted right") == 9


def test_captions_say_only_what_is_true_of_the_image_and_plain_digits_fit_every_style():
    captions = caption_set("styles")
    for c in range(len(captions.rows)):
        digit, style_index = class_style(captions, c)
        style = STYLES[style_index]
        true_words = {a.word(v) for a, v in zip(ATTRIBUTES, style) if v}
        prompts = drawable(captions, c)
        assert str(digit) in prompts  # the plain digit, whatever the style
        for prompt in prompts:
            assert said(prompt) <= true_words, (digit, style, prompt)
            named = set(re.findall(r"\b\d\b", prompt))
            assert named <= {str(digit)}


def test_held_out_words_are_never_said_of_their_digit_but_are_of_others():
    captions = caption_set("styles")
    for digit, word in HELD_OUT_PAIRS:
        for c in range(digit * len(STYLES), (digit + 1) * len(STYLES)):
            assert all(word not in said(p) for p in drawable(captions, c)), (digit, word)
        others = [p for c in range(len(captions.rows)) if c // len(STYLES) != digit for p in drawable(captions, c)]
        assert any(word in said(p) for p in others)
    held_out = [p for p in style_plan() if p.held_out]
    assert {(p.digit, ATTRIBUTES[p.attribute].word(p.value)) for p in held_out} == HELD_OUT_PAIRS


def test_a_draw_takes_each_subset_of_attributes_equally_often():
    captions = caption_set("styles")
    style = (1, 0, -1)  # thick and slanted left: subsets {}, {thick}, {slanted left}, {both}
    c = 7 * len(STYLES) + STYLES.index(style)
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
    thresholds = style_thresholds(measures, labels)
    styles = styles_of(measures, labels, thresholds)
    for d in range(10):
        for i in range(len(ATTRIBUTES)):
            values = styles[labels == d, i]
            assert (values == -1).mean() == pytest.approx(0.25, abs=0.01)
            assert (values == 1).mean() == pytest.approx(0.25, abs=0.01)
    classes = style_classes(labels, styles)
    assert (classes // len(STYLES) == labels).all()
    assert [STYLES[s] for s in classes[:5] % len(STYLES)] == [tuple(s) for s in styles[:5]]


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
