"""What a training step reads: MNIST on the training device, each image's caption class, and the text
tokens of every caption, computed once (no text-encoder pass per step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.captions import (
    CaptionSet,
    CaptionTensors,
    Vocabulary,
    caption_set,
    prompt_table,
    style_classes,
    style_thresholds,
    styles_of,
    vocabulary_named,
)
from data.mnist import load_mnist, mnist_cache_dir
from data.morphometry import cached_measures
from data.shapes import TEXT_DIM, TEXT_TOKENS
from models.text_encoder import build_text_encoder
from runtime.errors import UserError
from training.config import TrainConfig
from training.distributed import Processes


@dataclass(frozen=True)
class TrainingData:
    """The whole training set on the device as uint8 (batches are gathered there), and its captions."""

    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]
    classes: torch.Tensor  # int64 [N]: each image's class in ``captions``
    captions: CaptionSet
    caption_index: CaptionTensors
    prompt_table: torch.Tensor  # [len(captions.prompts), TEXT_TOKENS, TEXT_DIM]: row 0 the empty prompt
    encoder_record: dict[str, Any] | None  # the text encoder's record (rank 0 only)

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        steps = len(self.images) // (batch_size * world_size)
        if steps == 0:
            raise UserError(
                f"{len(self.images)} images cannot fill one step of batch {batch_size} x world size "
                f"{world_size}; lower --batch_size"
            )
        return steps

    def draw_captions(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A caption row of the prompt table for each image of ``batch``."""
        return self.captions.draw(self.classes[batch], generator, self.caption_index)


def load_training_data(cfg: TrainConfig, procs: Processes) -> TrainingData:
    """MNIST's training set (``--train_subset`` of it), its caption classes and the prompt table."""
    if not procs.master:
        procs.barrier()  # rank 0 fetches and caches MNIST (and measures it) first
    mnist = load_mnist(cfg.data_dir)
    vocabulary = vocabulary_named(cfg.captions)
    classes = caption_classes(vocabulary, mnist.train_images, mnist.train_labels)
    if procs.master:
        procs.barrier()
    subset = slice(0, cfg.train_subset or None)
    images = torch.from_numpy(mnist.train_images[subset]).to(procs.device)
    labels = torch.from_numpy(mnist.train_labels[subset]).to(procs.device).long()
    captions = caption_set(vocabulary)
    table, record = encode_captions(cfg, captions, procs)
    return TrainingData(
        images,
        labels,
        torch.from_numpy(classes[subset]).to(procs.device),
        captions,
        CaptionTensors.of(captions, procs.device),
        table,
        record,
    )


def caption_classes(vocabulary: Vocabulary, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each training image's class in the caption set: its digit, or its digit and measured style, the
    outer quarters taken over the whole training set (so a subset is captioned as in a full run)."""
    if not vocabulary.attributes:
        return labels.astype(np.int64)
    measures = cached_measures(images, mnist_cache_dir())
    thresholds = style_thresholds(vocabulary, measures, labels)
    return style_classes(vocabulary, labels, styles_of(vocabulary, measures, labels, thresholds))


def encode_captions(cfg: TrainConfig, captions: CaptionSet, procs: Processes) -> tuple[torch.Tensor, dict | None]:
    """Text tokens of every caption, computed (or read from the cache) on rank 0 and broadcast."""
    table = torch.empty(len(captions.prompts), TEXT_TOKENS, TEXT_DIM, device=procs.device)
    record = None
    if procs.master:
        encoder = build_text_encoder(cfg.text_encoder, seed=cfg.text_encoder_seed, device=procs.device)
        record = encoder.record
        encode = lambda prompts: encoder.encode(prompts)[0]
        key = [*record["fingerprint"], procs.device.type]
        table = prompt_table(captions, encode, key, mnist_cache_dir()).to(procs.device)
    if dist.is_initialized():
        dist.broadcast(table, src=0)
    return table, record
