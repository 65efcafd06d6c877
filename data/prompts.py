"""What a typed prompt asks for, read before the model sees it: the digits it names, and the words the
text encoder is given of it (``Reader``).

The rule (docs/prompts.md): a prompt draws a digit when it names exactly one, as a numeral ("7") or an
English word in any case ("seven", "Seven"), whatever else it says; naming it twice ("7, a seven") is
still one digit. The model draws one digit per image, so anything else is refused in one line rather
than drawn as a random or a blended digit: a number of more than one digit ("42", "3.5", "seventy"),
two different digits ("3 or 8"), and no digit at all ("a cat", "thick").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from data.captions import DIGIT_WORDS, NUMBER_WORDS, with_articles
from data.tokens import CONTEXT_LENGTH, prompt_tokens, words_of

_WORDS = re.compile(r"\d+|[^\W\d_]+")  # runs of digits, runs of letters


@dataclass(frozen=True)
class Named:
    """The digits and the numbers of more than one digit that a prompt names, in order of appearance."""

    digits: tuple[int, ...]
    numbers: tuple[str, ...]  # "42", "seventy"

    @property
    def digit(self) -> int | None:
        """The one digit named, when it is exactly one and no longer number is named."""
        return self.digits[0] if len(set(self.digits)) == 1 and not self.numbers else None


def named(prompt: str) -> Named:
    """What ``prompt`` names: "a thin 7" -> digits (7,); "3 or eight" -> (3, 8); "42" -> numbers ("42",)."""
    digits, numbers = [], []
    for word in _WORDS.findall(prompt.lower()):
        if word.isdigit():
            (digits.append(int(word)) if len(word) == 1 else numbers.append(word))
        elif word in DIGIT_WORDS:
            digits.append(DIGIT_WORDS.index(word))
        elif word in NUMBER_WORDS:
            numbers.append(word)
    return Named(tuple(digits), tuple(numbers))


@dataclass(frozen=True)
class Reader:
    """What the text encoder is given for a prompt, for a model whose vocabulary says ``known_words``.

    With ``drop_unknown`` (the default for the seeded random text tower, which cannot know a word its
    model was never trained on), every other word is left out. Otherwise the prompt stays as typed
    while it fits the encoder's CONTEXT_LENGTH tokens, and loses only as many unknown words, from the
    last, as it must to fit. Words are as the tokenizer splits them ("thin-stroked" is three); the
    digit and the style words are known, so they stay. An article left before another word than
    the one typed after it is mended as the captions have it ("an elegant 7" -> "a 7"). A prompt still
    too long comes back as typed: the encoder would cut it (``data.tokens.truncated_prompt``)."""

    known_words: frozenset[str]
    drop_unknown: bool = False

    def read(self, prompt: str) -> str:
        if not self.drop_unknown and prompt_tokens(prompt) <= CONTEXT_LENGTH:
            return prompt
        words = words_of(prompt)
        typed = len(words)
        for i in reversed(range(typed)):
            if words[i] not in self.known_words:
                del words[i]
                if not self.drop_unknown and prompt_tokens(" ".join(words)) <= CONTEXT_LENGTH:
                    return " ".join(with_articles(words))
        read = " ".join(with_articles(words))
        return read if len(words) < typed and prompt_tokens(read) <= CONTEXT_LENGTH else prompt
