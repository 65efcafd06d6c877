"""Conditioning, in one place: the caption vocabularies, every caption training can draw from one,
the held-out wordings and (digit, attribute) pairs, the table of caption rows a training step draws
from, and the plans by which evaluation prompts the model.

A vocabulary is a named, frozen definition (``Vocabulary``) in ``VOCABULARIES``; the config key
``captions`` names one, and a checkpoint records its name and ``fingerprint``. A vocabulary that a
model was trained on is never edited: other captions are another entry, so a checkpoint keeps meaning
the captions it was trained on. The five today:

- ``digits``: the digit alone, in eight wordings ("7", "seven", "the digit 7", "a handwritten seven", ...).
  What checkpoints from before the style captions were trained with.
- ``styles``: those, plus captions that say how the digit is written, from Morpho-MNIST measurements
  of each training image (``data/morphometry.py``): the attributes in which it lies in the outer
  quarters *of its own digit class*: "thin"/"thick" stroke, "narrow"/"wide", "slanted left"/"slanted
  right". An image is captioned, uniformly, by any subset of its unusual attributes (the empty subset
  gives the plain wordings, so "7" keeps meaning every 7), in several wordings ("a thin 7 slanted
  left", "a thin seven slanted left", "thin 7 slanted left", and without the digit, "thin slanted
  left", which gives negative prompts such as "thick" their meaning).
- ``free-text``: those, and as many again generated (``FreeText``): synonyms ("bold",
  "italic"), other frames ("draw a 7"), other word orders, and words the model cannot use, drawn from
  the tokenizer's own BPE vocabulary, so that a prompt typed freely still gets its digit.
- ``free-text-2`` (default): ``free-text`` with frame words dropped at random and three more frames.
- ``free-text-3``: ``free-text-2`` saying a trained synonym more often; measured, not taken (docs/prompts.md).

Held out: some (digit, attribute value) pairs appear in no caption ("thick" with 4, "wide" with 1,
...). Those images are still trained on, under their other words, so a held-out prompt joins a word
and a digit the model has only seen apart: evaluation tests composition, not memory.

Every caption fits the text encoder's 8 tokens (start and end included); captions that would not
are never produced. Adding an attribute: its measure in ``data/morphometry.py`` (named in
``data/shapes.MEASURES``), one ``Attribute`` and its held-out pair in a new vocabulary, and tests;
the style report (evaluation/styles.py) picks it up.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.shapes import MEASURES, NUM_DIGITS
from data.tokens import CONTEXT_LENGTH, prompt_tokens, tokenizer, words_of

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EMPTY_PROMPT = ""  # the unconditional prompt for classifier-free guidance
PUNCTUATION = (",", "!", "?", ":", ";")  # trained as distractors; "." is kept for evaluation ("7.")
NUMBER_WORDS = (
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
    "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million",
    "billion", "dozen",
)  # fmt: skip  # words for numbers of more than one digit
# Never distractors: words about numbers, and negations, which would teach "not thick" to mean thick.
NOT_DISTRACTORS = (*NUMBER_WORDS, "digits", "numbers", "numeral", "numerals", "none", "nil", "not", "no", "non",
                   "never", "without", "nor", "neither", "nothing", "except")  # fmt: skip
Style = tuple[int, ...]  # per attribute of a vocabulary: -1 low, +1 high, 0 ordinary (or not mentioned)


@dataclass(frozen=True)
class Attribute:
    """A way a digit can be unusually written: its measure and the unit the report gives it in, its
    words for the low and the high outer quarter, and whether the word goes before the digit ("a
    thick 7") or after it ("a 7 slanted left")."""

    measure: str  # one of data/shapes.MEASURES
    low: str
    high: str
    unit: str
    before: bool

    def word(self, value: int) -> str:
        return self.high if value > 0 else self.low

    @property
    def column(self) -> int:
        return MEASURES.index(self.measure)


@dataclass(frozen=True)
class FreeText:
    """What a vocabulary says beyond its canonical captions, so that a freely typed prompt still gets its
    digit: synonyms of each attribute word, frames around the digit ("draw a {}"), and words it cannot use.

    Each digit in each mentioned style gets ``variants`` more captions (the plain digit ``plain_variants``)
    from a generator seeded by ``seed``, the digit and the style: the digit as a numeral or a word (or, in
    about one in ten styled ones, left out, as in the canonical captions), each attribute said by its word
    or a trained synonym, mostly where that word goes (one word before the digit, two after), in a
    random frame, then ``distractor_counts`` distractors at random places: a punctuation mark, or a
    one-token word of the text encoder's own BPE vocabulary that no caption uses, so that the model
    learns that a word it cannot use changes nothing. The variants make up ``variant_share`` of the
    captions drawn. Kept from training entirely, for evaluation: every word of the held-out synonyms
    and wordings, and a sixteenth of the BPE words (``is_evaluation_word``)."""

    synonyms: tuple[tuple[str, tuple[str, ...]], ...]  # (an attribute's word, its trained synonyms)
    held_out_synonyms: tuple[tuple[str, tuple[str, ...]], ...]  # (an attribute's word, synonyms never trained)
    frames: tuple[str, ...]  # trained frames of the digit's phrase "{}"
    unknown_wordings: tuple[str, ...]  # prompts with words never trained, for evaluation ("{d}", "{word}": the digit)
    variants: int = 12
    plain_variants: int = 96
    variant_share: float = 0.25  # of the captions drawn; the canonical ones make up the rest
    distractor_counts: tuple[int, ...] = (0, 0, 1, 1, 2)  # a variant's number of distractors, drawn uniformly
    seed: int = 0
    word_dropout: float = 0.0  # the chance that each word of a variant's frame is left out
    # the chance that a variant says an attribute by a trained synonym rather than its word (None: the word and
    # its synonyms alike). The canonical captions always say the word, so a synonym is rarer than its share here.
    synonym_share: float | None = None

    def words_for(self, word: str) -> tuple[str, ...]:
        """An attribute's word and its trained synonyms."""
        return (word, *dict(self.synonyms).get(word, ()))

    def variants_of(self, vocabulary: Vocabulary, digit: int, style: Style) -> list[str]:
        """The generated captions of ``digit`` in ``style`` (see the class docstring), in a fixed order."""
        rng = np.random.default_rng([self.seed, digit, *(v + 1 for v in style)])
        pool = training_words(vocabulary)
        count = self.variants if any(style) else self.plain_variants
        held_out = set(prompts_for(digit, vocabulary.held_out_templates))
        captions: dict[str, None] = {}
        for _ in range(4 * count):  # a draw that cannot be made to fit, a repeat or a held-out wording: again
            caption = self._variant(vocabulary, rng, digit, style, pool)
            if caption is not None and caption not in held_out:
                captions[caption] = None
            if len(captions) == count:
                break
        return list(captions)

    def _variant(self, vocabulary: Vocabulary, rng: np.random.Generator, digit: int, style: Style,
                 pool: Sequence[str]) -> str | None:  # fmt: skip
        said = [self._say(rng, a.word(v)) for a, v in zip(vocabulary.attributes, style) if v]
        swapped = [rng.random() < 0.25 for _ in said]
        before = [w for w, swap in zip(said, swapped) if (" " not in w) != swap]
        after = [w for w, swap in zip(said, swapped) if (" " not in w) == swap]
        noun = None if said and rng.random() < 0.1 else _pick(rng, (str(digit), DIGIT_WORDS[digit]))
        prefix, suffix = self._frame_words(rng, _pick(rng, self.frames)) if noun else ([], [])
        placed = with_articles([*prefix, *before, *([noun] if noun else []), *after, *suffix])
        distractors = [_pick(rng, PUNCTUATION) if rng.random() < 0.15 else _pick(rng, pool)
                       for _ in range(_pick(rng, self.distractor_counts))]  # fmt: skip
        for word in distractors:  # between words: never inside a two-word attribute such as "slanted left"
            placed.insert(int(rng.integers(len(placed) + 1)), word)
        while not fits(" ".join(placed)) and distractors:  # fewer distractors until the caption fits
            placed.remove(distractors.pop())
        return " ".join(placed) if fits(" ".join(placed)) else None

    def _say(self, rng: np.random.Generator, word: str) -> str:
        """An attribute's word or one of its trained synonyms, as ``synonym_share`` says."""
        words = self.words_for(word)
        if self.synonym_share is None or len(words) == 1:  # one draw: the stream of earlier vocabularies
            return _pick(rng, words)
        return _pick(rng, words[1:]) if rng.random() < self.synonym_share else word

    def _frame_words(self, rng: np.random.Generator, frame: str) -> tuple[list[str], list[str]]:
        """The words of ``frame`` before and after the digit's phrase, each kept with 1 - word_dropout."""
        prefix, suffix = (part.split() for part in frame.split("{}"))
        if not self.word_dropout:  # no draws: the stream of earlier vocabularies, whose captions stand
            return prefix, suffix
        kept = [[w for w in part if rng.random() >= self.word_dropout] for part in (prefix, suffix)]
        return kept[0], kept[1]


def _words_in(texts: Sequence[str]) -> frozenset[str]:
    """The words of ``texts`` as the tokenizer splits them, the digit's places ("{d}", "{word}", "{}") aside."""
    text = " ".join(texts).replace("{d}", "").replace("{word}", "").replace("{}", "")
    return frozenset(words_of(text))


def _pick(rng: np.random.Generator, choices: Sequence):
    return choices[int(rng.integers(len(choices)))]


def with_articles(words: list[str]) -> list[str]:
    """Each "a" or "an" of ``words`` as the next word needs ("an 8", "an eight", "an italic 7", "a one")."""
    return [
        ("an" if words[i + 1][0] in "aeio8" and words[i + 1] != "one" else "a")
        if w in ("a", "an") and i + 1 < len(words)
        else w
        for i, w in enumerate(words)
    ]


@dataclass(frozen=True)
class Vocabulary:
    """The captions a model is trained on and evaluated with. "{d}" in a template is the numeral,
    "{word}" the English word. Without attributes, an image is captioned by its digit alone."""

    name: str
    templates: tuple[str, ...]  # the plain digit's training wordings
    held_out_templates: tuple[str, ...]  # wordings of the plain digit never trained on
    attributes: tuple[Attribute, ...] = ()
    held_out_pairs: frozenset[tuple[int, str]] = field(default_factory=frozenset)  # (digit, word) never said
    outer_quantile: float = 0.25  # below it within the digit's class: the low word; above 1 - it: the high word
    free_text: FreeText | None = None  # synonyms, more wordings and distractor words (None: the canonical captions)

    def __post_init__(self) -> None:
        """Catches what would otherwise do nothing, silently: a held-out word no attribute says, say."""
        words = {a.word(v) for a in self.attributes for v in (-1, 1)}
        problems = [f"unknown measure {a.measure!r}" for a in self.attributes if a.measure not in MEASURES]
        problems += [f"held-out pair {p} names no digit and word" for p in self.held_out_pairs
                     if p[0] not in range(NUM_DIGITS) or p[1] not in words]  # fmt: skip
        problems += [f"outer quantile {self.outer_quantile} not in (0, 0.5)"] * (not 0 < self.outer_quantile < 0.5)
        if problems:
            raise ValueError(f"vocabulary {self.name!r}: {'; '.join(problems)}")

    @functools.cached_property
    def known_words(self) -> frozenset[str]:
        """The words (as the tokenizer splits them) of this vocabulary's captions, distractors aside."""
        frames = self.free_text.frames if self.free_text else ()
        synonyms = [w for a in self.attributes for v in (-1, 1) for w in self._words_for(a.word(v))]
        return _words_in([*self.templates, *frames, *synonyms, *DIGIT_WORDS, *map(str, range(NUM_DIGITS)), "a an"])

    @functools.cached_property
    def held_out_words(self) -> frozenset[str]:
        """Words of the held-out wordings and synonyms that no caption says: never distractors either."""
        held = [*self.held_out_templates, *(self.free_text.unknown_wordings if self.free_text else ())]
        held += [w for _, words in (self.free_text.held_out_synonyms if self.free_text else ()) for w in words]
        return _words_in(held) - self.known_words

    def _words_for(self, word: str) -> tuple[str, ...]:
        return self.free_text.words_for(word) if self.free_text else (word,)

    @functools.cached_property
    def styles(self) -> tuple[Style, ...]:
        """Every style: each attribute ordinary, low or high."""
        return tuple(itertools.product((0, -1, 1), repeat=len(self.attributes)))

    @property
    def prompt_sets(self) -> dict[str, tuple[str, ...]]:
        """Evaluation's sets of plain-digit wordings: the trained ones and the held-out ones."""
        return {"seen": self.templates, "held-out": self.held_out_templates}

    @functools.cached_property
    def fingerprint(self) -> str:
        """16 hex digits of the sha256 of what decides the captions a model is trained on and evaluated
        with: every caption and which images may be captioned by which (the caption table), the
        measures and the quantile that pick an attribute's images, the held-out pairs and wordings.
        Neither the name nor the units, which change no caption."""
        captions = caption_set(self)
        definition = {
            "prompts": captions.prompts,
            "rows": captions.rows.tolist(),
            "attributes": [[a.measure, a.low, a.high, a.before] for a in self.attributes],
            "outer_quantile": self.outer_quantile,
            "held_out_pairs": sorted(self.held_out_pairs),
            "held_out_templates": list(self.held_out_templates),
        }
        if self.free_text is not None:  # absent from older vocabularies' definitions, whose fingerprints stand
            definition["free_text"] = dataclasses.asdict(self.free_text)
            if not self.free_text.word_dropout:  # added since "free-text", whose fingerprint stands
                del definition["free_text"]["word_dropout"]
            if self.free_text.synonym_share is None:  # added since "free-text-2", whose fingerprint stands
                del definition["free_text"]["synonym_share"]
        return hashlib.sha256(json.dumps(definition).encode()).hexdigest()[:16]

    def style_prompt(self, digit: int | None, style: Style) -> str:
        """The canonical caption of a digit (None: no digit) in ``style``: "a thick 7", "a 7 slanted left"."""
        return self._phrase(None if digit is None else str(digit), style, article=digit is not None)

    def wordings(self, digit: int, style: Style) -> list[str]:
        """Every training caption of ``digit`` in ``style`` (0: not mentioned) that fits the text
        encoder: the plain templates when nothing is mentioned."""
        if not any(style):
            forms = prompts_for(digit, self.templates)
        else:
            forms = [self._phrase(str(digit), style, True), self._phrase(DIGIT_WORDS[digit], style, True),
                     self._phrase(str(digit), style, False), self._phrase(None, style, False)]  # fmt: skip
            forms = [form for form in forms if fits(form)]
        if self.free_text is None:
            return forms
        variants = self.free_text.variants_of(self, digit, style)
        share = self.free_text.variant_share
        repeats = -(-round(len(variants) * (1 - share) / share) // len(forms))  # canonical: the rest of the draws
        return forms * repeats + variants

    def mentionable(self, digit: int, style: Style) -> Style:
        """``style`` without the attribute values held out for ``digit``: they are never said of it."""
        return tuple(
            0 if v and (digit, a.word(v)) in self.held_out_pairs else v for a, v in zip(self.attributes, style)
        )

    def examples(self) -> list[str]:
        """Three prompts this vocabulary trains on, for a hint such as the page's: the first wording of a
        7, a thick 3 (with attributes; else another wording of a 3) and the last wording of an 8."""
        three = (
            self.style_prompt(3, self.one_attribute(0, 1))
            if self.attributes
            else prompts_for(3, self.templates)[len(self.templates) // 2]
        )
        return [prompts_for(7, self.templates)[0], three, prompts_for(8, self.templates)[-1]]

    def one_attribute(self, attribute: int, value: int) -> Style:
        """The style with attribute number ``attribute`` at ``value`` and every other ordinary."""
        return tuple(value if i == attribute else 0 for i in range(len(self.attributes)))

    def _phrase(self, noun: str | None, style: Style, article: bool) -> str:
        before = [a.word(v) for a, v in zip(self.attributes, style) if v and a.before]
        after = [a.word(v) for a, v in zip(self.attributes, style) if v and not a.before]
        words = [*before, *([noun] if noun else []), *after]
        return " ".join(with_articles(["a", *words]) if article else words)


_PLAIN_WORDINGS = (
    "{d}", "{word}", "the digit {d}", "the digit {word}", "the number {d}", "the number {word}",
    "a handwritten {d}", "a handwritten {word}",
)  # fmt: skip
_HELD_OUT_WORDINGS = ("a handwritten number {word}", "the numeral {d}", "a picture of {word}")
_STYLE_ATTRIBUTES = (
    Attribute("thickness", "thin", "thick", "px", before=True),
    Attribute("width", "narrow", "wide", "px", before=True),
    Attribute("slant", "slanted left", "slanted right", "deg", before=False),  # positive: top leans right
)
_HELD_OUT_PAIRS = frozenset(
    {(4, "thick"), (5, "thin"), (1, "wide"), (0, "narrow"), (9, "slanted left"), (3, "slanted right")}
)
_FREE_TEXT = FreeText(
    synonyms=(
        ("thick", ("bold", "fat")),
        ("thin", ("light", "fine")),
        ("wide", ("broad",)),
        ("narrow", ("slim",)),
        ("slanted right", ("italic", "leaning right")),
        ("slanted left", ("leaning left", "backslanted")),
    ),
    held_out_synonyms=(
        ("thick", ("heavy", "thick-stroked")),
        ("thin", ("skinny", "thin-stroked")),
        ("wide", ("extended",)),
        ("narrow", ("condensed",)),
        ("slanted right", ("tilted right",)),
        ("slanted left", ("tilted left",)),
    ),
    frames=(
        "{}",
        "{}",
        "{}",
        "a {}",
        "a {}",
        "the {}",
        "the digit {}",
        "the number {}",
        "handwritten {}",
        "a handwritten {}",
        "draw {}",
        "draw a {}",
        "an image of a {}",
        "a drawing of a {}",
    ),  # fmt: skip
    unknown_wordings=(
        "a faint thin-stroked {d}",
        "{d}, please",
        "i would like a {word}",
        "a big red {d}",
        "{word}!!!",
        "quickly sketch a {d}",
        "an elegant {word}",
        "my lucky number {d}",
    ),  # fmt: skip
)
_FREE_TEXT_2 = dataclasses.replace(
    _FREE_TEXT,
    frames=(
        *_FREE_TEXT.frames,
        "the handwritten digit {}",
        "an image of the digit {}",
        "a drawing of the number {}",
    ),  # new frames of trained words only, so that the distractor words stay those of "free-text"
    word_dropout=0.25,
)
_FREE_TEXT_3 = dataclasses.replace(_FREE_TEXT_2, synonym_share=0.75)
_FREE_TEXT_HELD_OUT_WORDINGS = (
    *_HELD_OUT_WORDINGS,
    "number {word}",
    "digit {word}",
    "the digit {d}, handwritten",
    "write {word}",
    "{d}.",
    "please draw a {d}",
)  # fmt: skip
# Never edit an entry a checkpoint was trained on (tests/test_captions.py pins their fingerprints): add one.
VOCABULARIES: dict[str, Vocabulary] = {
    v.name: v
    for v in (
        Vocabulary("digits", _PLAIN_WORDINGS, _HELD_OUT_WORDINGS),
        Vocabulary(
            "styles",
            _PLAIN_WORDINGS,
            _HELD_OUT_WORDINGS,
            attributes=_STYLE_ATTRIBUTES,
            held_out_pairs=_HELD_OUT_PAIRS,
        ),
        Vocabulary(
            "free-text",
            _PLAIN_WORDINGS,
            _FREE_TEXT_HELD_OUT_WORDINGS,
            attributes=_STYLE_ATTRIBUTES,
            held_out_pairs=_HELD_OUT_PAIRS,
            free_text=_FREE_TEXT,
        ),
        Vocabulary(
            "free-text-2",  # free-text with word dropout and three more frames
            _PLAIN_WORDINGS,
            _FREE_TEXT_HELD_OUT_WORDINGS,
            attributes=_STYLE_ATTRIBUTES,
            held_out_pairs=_HELD_OUT_PAIRS,
            free_text=_FREE_TEXT_2,
        ),
        Vocabulary(
            "free-text-3",  # free-text-2 whose variants say a trained synonym three times in four
            _PLAIN_WORDINGS,
            _FREE_TEXT_HELD_OUT_WORDINGS,
            attributes=_STYLE_ATTRIBUTES,
            held_out_pairs=_HELD_OUT_PAIRS,
            free_text=_FREE_TEXT_3,
        ),
    )
}


def vocabulary_named(name: str) -> Vocabulary:
    """The vocabulary called ``name`` in VOCABULARIES."""
    if name not in VOCABULARIES:
        raise ValueError(f"captions must be one of {', '.join(VOCABULARIES)}, got {name!r}")
    return VOCABULARIES[name]


# ----------------------------------------------------------------------------- distractor words
def is_evaluation_word(word: str) -> bool:
    """Whether a BPE word is kept for evaluation's distractors: a fixed sixteenth of them, by hash."""
    return hashlib.sha256(word.encode()).digest()[0] < 16


@functools.lru_cache(maxsize=4)
def _distractor_words(vocabulary: Vocabulary) -> tuple[str, ...]:
    """Every one-token word (three letters or more, ASCII) of the text encoder's BPE vocabulary that the
    vocabulary neither says nor holds out, and that names no number and negates nothing."""
    excluded = vocabulary.known_words | vocabulary.held_out_words | set(NOT_DISTRACTORS)
    words = (token[: -len("</w>")] for token in tokenizer().encoder if token.endswith("</w>"))
    return tuple(
        w for w in words
        if len(w) >= 3 and w.isascii() and w.isalpha() and w not in excluded and " " not in tokenizer().bpe(w)
    )  # fmt: skip


@functools.lru_cache(maxsize=4)
def training_words(vocabulary: Vocabulary) -> tuple[str, ...]:
    """The distractor words training captions draw from."""
    return tuple(w for w in _distractor_words(vocabulary) if not is_evaluation_word(w))


@functools.lru_cache(maxsize=4)
def evaluation_words(vocabulary: Vocabulary) -> tuple[str, ...]:
    """Distractor words no training caption holds, for evaluation."""
    return tuple(w for w in _distractor_words(vocabulary) if is_evaluation_word(w))


# ----------------------------------------------------------------------------- wordings
def prompts_for(digit: int, templates: Sequence[str]) -> list[str]:
    """The prompts for one digit, in template order."""
    if digit not in range(NUM_DIGITS):
        raise ValueError(f"digit must be 0..{NUM_DIGITS - 1}, got {digit!r}")
    return [t.format(d=digit, word=DIGIT_WORDS[digit]) for t in templates]


def canonical_prompt(digit: int) -> str:
    """The short label of a digit, e.g. "7", as used for sample-grid rows."""
    return str(digit)


def fits(prompt: str) -> bool:
    """Whether ``prompt`` fits the text encoder's context, start and end tokens included."""
    return prompt_tokens(prompt) <= CONTEXT_LENGTH


# ----------------------------------------------------------------------------- the caption table
@dataclass(frozen=True)
class CaptionSet:
    """Every caption of a vocabulary, and which of them each class of image may be captioned with.

    A class is a digit and its measured style: class = digit * len(vocabulary.styles) + style index
    (a vocabulary without attributes has one style, so a class is a digit). For class c,
    ``rows[c, s, w]`` is the table row of wording w of subset s of its mentionable attributes;
    ``subsets[c]`` and ``wordings[c, s]`` count them.
    """

    vocabulary: Vocabulary
    prompts: list[str]  # row 0 is the empty prompt
    rows: np.ndarray  # int64 [classes, max subsets, max wordings], -1 where unused
    subsets: np.ndarray  # int64 [classes]
    wordings: np.ndarray  # int64 [classes, max subsets]

    @property
    def fingerprint(self) -> str:
        return self.vocabulary.fingerprint

    def row_of(self, prompt: str) -> int:
        return self.prompts.index(prompt)

    def draw(self, classes: torch.Tensor, generator: torch.Generator, table: CaptionTensors) -> torch.Tensor:
        """A caption row for each image of ``classes`` ([B] on the training device): uniformly one subset
        of its unusual attributes, then uniformly one of that subset's wordings."""
        if not self.vocabulary.attributes:  # one draw per image: the same stream as before the style captions
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


def caption_set(vocabulary: Vocabulary | str) -> CaptionSet:
    """The captions of ``vocabulary`` (or of the one of VOCABULARIES so named) and how each class of
    image draws from them."""
    return _caption_set(vocabulary_named(vocabulary) if isinstance(vocabulary, str) else vocabulary)


@functools.lru_cache(maxsize=4)
def _caption_set(vocabulary: Vocabulary) -> CaptionSet:
    classes = [_subset_wordings(vocabulary, d, style) for d in range(NUM_DIGITS) for style in vocabulary.styles]
    prompts = [EMPTY_PROMPT, *dict.fromkeys(p for c in classes for subset in c for p in subset)]
    row = {p: i for i, p in enumerate(prompts)}
    max_subsets, max_wordings = max(map(len, classes)), max(len(s) for c in classes for s in c)
    rows = np.full((len(classes), max_subsets, max_wordings), -1, np.int64)
    wording_counts = np.zeros((len(classes), max_subsets), np.int64)
    for c, subsets in enumerate(classes):
        for s, subset in enumerate(subsets):
            rows[c, s, : len(subset)] = [row[p] for p in subset]
            wording_counts[c, s] = len(subset)
    return CaptionSet(vocabulary, prompts, rows, np.array([len(c) for c in classes]), wording_counts)


def _subset_wordings(vocabulary: Vocabulary, digit: int, style: Style) -> list[list[str]]:
    """For one class: the wordings of each subset of its mentionable attributes, the empty subset first."""
    said = [i for i, v in enumerate(vocabulary.mentionable(digit, style)) if v]
    subsets = [c for k in range(len(said) + 1) for c in itertools.combinations(said, k)]
    return [
        vocabulary.wordings(digit, tuple(v if i in subset else 0 for i, v in enumerate(style))) for subset in subsets
    ]


def prompt_table(captions: CaptionSet, encode: Callable[[list[str]], torch.Tensor], encoder_key: Sequence,
                 cache_dir: Path) -> torch.Tensor:  # fmt: skip
    """The text tokens [len(prompts), 8, 512] of every caption: encoded once, then read from
    ``cache_dir/prompt_tables/``, keyed by the captions and ``encoder_key`` (the text encoder's
    fingerprint and the device it ran on, whose kernels round differently)."""
    key = hashlib.sha256(json.dumps([captions.prompts, list(encoder_key)]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "prompt_tables" / f"{captions.vocabulary.name}_{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    table = encode(captions.prompts).cpu()
    if len(captions.prompts) > 100:  # more than a second or so of encoding: worth keeping
        from runtime.files import atomic_write

        atomic_write(path, lambda f: torch.save(table, f))
    return table


# ----------------------------------------------------------------------------- styles of real images
def style_thresholds(vocabulary: Vocabulary, measures: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per digit and attribute, the measure's (low, high) outer quantiles among that digit's images:
    float64 [NUM_DIGITS, len(vocabulary.attributes), 2]."""
    columns = [a.column for a in vocabulary.attributes]
    q = [vocabulary.outer_quantile, 1 - vocabulary.outer_quantile]
    return np.stack([np.nanquantile(measures[labels == d][:, columns], q, axis=0).T for d in range(NUM_DIGITS)])


def styles_of(vocabulary: Vocabulary, measures: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Each image's style: int64 [N, len(vocabulary.attributes)], -1 / +1 in its class's low / high
    outer quantile."""
    values = measures[:, [a.column for a in vocabulary.attributes]]
    low, high = thresholds[labels, :, 0], thresholds[labels, :, 1]
    return np.where(values < low, -1, np.where(values > high, 1, 0)).astype(np.int64)


def style_classes(vocabulary: Vocabulary, labels: np.ndarray, styles: np.ndarray) -> np.ndarray:
    """The CaptionSet class of each image, from its digit and its style."""
    index = {style: i for i, style in enumerate(vocabulary.styles)}
    count = len(vocabulary.styles)
    return labels.astype(np.int64) * count + np.array([index[tuple(s)] for s in styles], np.int64)


# ----------------------------------------------------------------------------- evaluation plans
@dataclass(frozen=True)
class PromptPlan:
    """One entry per sample, set-major, then digit-major."""

    prompts: list[str]
    digits: np.ndarray
    template_index: np.ndarray  # index into the set's templates
    templates: list[str]
    sets: list[str]


def plan_prompts(per_digit: int, prompt_sets: dict[str, Sequence[str]]) -> PromptPlan:
    """``per_digit`` samples of each digit per set of templates (a vocabulary's ``prompt_sets``, or some
    of them), cycling through the set's K templates across digits (sample i of digit d uses template
    (d * per_digit + i) mod K), so every template is used and, when per_digit >= K, every digit gets
    every template."""
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
    attribute: int | None  # index into the vocabulary's attributes
    value: int
    held_out: bool


def style_plan(vocabulary: Vocabulary) -> list[StylePrompt]:
    """The plain prompt of every digit, then every digit with every attribute value, held-out pairs marked."""
    plan = [StylePrompt(canonical_prompt(d), d, None, 0, False) for d in range(NUM_DIGITS)]
    attributes = vocabulary.attributes
    for d, (i, attribute), value in itertools.product(range(NUM_DIGITS), enumerate(attributes), (-1, 1)):
        prompt = vocabulary.style_prompt(d, vocabulary.one_attribute(i, value))
        plan.append(StylePrompt(prompt, d, i, value, (d, attribute.word(value)) in vocabulary.held_out_pairs))
    return plan
