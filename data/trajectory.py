"""The denoising trajectory as an animated GIF: a sampler callback that keeps the frames, and the writer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.images import grid_image
from runtime.files import atomic_write

FRAME_MS = 80
LAST_FRAME_MS = 1500


class TrajectoryRecorder:
    """A step callback ``(i, t, x_t, x0)`` of text2digit's pipeline that keeps x_t and the x0 prediction of up to
    ``max_frames`` evenly spaced steps (of ``steps``) as uint8.

    ``generate`` runs its batches one after another, each through all the steps, so a step's
    chunks arrive in image order and are simply concatenated.
    """

    def __init__(self, steps: int, max_frames: int = 60):
        self.kept = {int(i) for i in np.round(np.linspace(0, steps - 1, min(steps, max_frames)))}
        self.frames: dict[int, tuple[int, list[np.ndarray], list[np.ndarray]]] = {}

    def __call__(self, i: int, t: int, x_t: np.ndarray, x0: np.ndarray) -> None:
        """The pipeline's step callback: x_t and x0 as uint8 [B, H, W]."""
        if i in self.kept:
            _, noisy, predicted = self.frames.setdefault(i, (t, [], []))
            noisy.append(x_t)
            predicted.append(x0)

    def save_gif(self, final: np.ndarray, prompts: Sequence[str], path: Path) -> None:
        """One frame per kept step, two rows per prompt (x_t, then the x0 prediction), and the
        ``final`` images ([N, H, W] uint8, prompt-major) as a last frame held longer."""
        frames = [
            (f"t={t}", np.concatenate(noisy), np.concatenate(predicted))
            for _, (t, noisy, predicted) in sorted(self.frames.items())
        ]
        frames.append(("done", final, final))
        width = max(len(label) for label, _, _ in frames)
        images = [_frame(label.ljust(width), noisy, predicted, prompts) for label, noisy, predicted in frames]
        durations = [FRAME_MS] * (len(images) - 1) + [LAST_FRAME_MS]
        atomic_write(
            path,
            lambda f: images[0].save(
                f, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0
            ),
        )


def _frame(label: str, noisy: np.ndarray, predicted: np.ndarray, prompts: Sequence[str]):
    """Rows x_t, x0 for each prompt, labelled with the step first so a long prompt cannot hide it."""
    noisy, predicted = (a.reshape(len(prompts), -1, *a.shape[1:]) for a in (noisy, predicted))
    rows, labels = [], []
    for prompt, noisy_row, predicted_row in zip(prompts, noisy, predicted):
        rows += [noisy_row, predicted_row]
        labels += [f'{label} "{prompt}"', f'{"x0".ljust(len(label))} "{prompt}"']
    return grid_image(rows, labels)
