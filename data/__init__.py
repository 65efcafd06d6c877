"""MNIST, its measured handwriting, and the captions that condition the model."""

from data.captions import (
    DIGIT_WORDS,
    EMPTY_PROMPT,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    canonical_prompt,
    heldout_prompts,
    prompts_for,
    training_prompts,
)
from data.mnist import (
    MNIST,
    MNIST_MD5,
    convert_wheel,
    fetch_mnist,
    idx_bytes,
    load_mnist,
    mnist_cache_dir,
    parse_idx,
    read_idx,
    write_idx,
)

__all__ = [
    "MNIST",
    "MNIST_MD5",
    "convert_wheel",
    "fetch_mnist",
    "idx_bytes",
    "load_mnist",
    "mnist_cache_dir",
    "parse_idx",
    "read_idx",
    "write_idx",
    "DIGIT_WORDS",
    "EMPTY_PROMPT",
    "HELDOUT_TEMPLATES",
    "TRAIN_TEMPLATES",
    "canonical_prompt",
    "heldout_prompts",
    "prompts_for",
    "training_prompts",
]
