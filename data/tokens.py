"""The text encoder's tokenizer, without the encoder: open_clip's BPE for CLIP ViT-B/32 at context length 8.

What a caption or a prompt costs in tokens needs only the tokenizer (open_clip ships its vocabulary), so
the caption vocabulary and the prompt checks use this module and never build the text tower.
"""

from __future__ import annotations

import functools

from data.shapes import TEXT_TOKENS

CONTEXT_LENGTH = TEXT_TOKENS
MODEL_NAME = "ViT-B-32"


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The encoder's tokenizer at context length 8."""
    import open_clip  # imported when first needed: reading the caption vocabulary does not cost its import

    return open_clip.get_tokenizer(MODEL_NAME, context_length=CONTEXT_LENGTH)


def prompt_tokens(prompt: str) -> int:
    """Tokens ``prompt`` needs, start and end included, before any truncation. Counted per
    space-separated chunk (no token spans a space), each chunk's count kept: tens of thousands of
    generated captions are counted in a second."""
    return sum(_chunk_tokens(chunk) for chunk in prompt.split()) + 2


@functools.cache
def _chunk_tokens(chunk: str) -> int:
    if chunk.isascii() and chunk.isalpha() and chunk.islower():  # one word as the tokenizer splits it: no cleaning
        return len(tokenizer().bpe(chunk).split(" "))
    return len(tokenizer().encode(chunk))


def words_of(text: str) -> list[str]:
    """``text`` split into words as the tokenizer splits it before BPE: lower case, each numeral and each
    run of punctuation a word of its own ("Thin-stroked 42." -> thin, -, stroked, 4, 2, .)."""
    return tokenizer().pat.findall(tokenizer().clean_fn(text))


def truncated_prompt(prompt: str) -> str | None:
    """What the encoder reads of ``prompt`` when it needs more than CONTEXT_LENGTH tokens
    (start and end included), else None."""
    ids = tokenizer().encode(prompt)
    if len(ids) + 2 <= CONTEXT_LENGTH:
        return None
    return tokenizer().decode(ids[: CONTEXT_LENGTH - 2]).strip()
