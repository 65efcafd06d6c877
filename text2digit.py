"""The Python pipeline: load a trained model once, then turn prompts into digits.

    from text2digit import Text2Digit

    pipe = Text2Digit.from_checkpoint("outputs/cpu/checkpoints/checkpoint_epoch_0004.pt")
    digits = pipe(["a thick 7", "3"], num_samples=8, steps=20, seed=0)   # uint8 [2, 8, 28, 28]
    images = pipe("7", negative_prompt="thick", output="pil")     # [[8 PIL images]]

Every request is checked in one place (:class:`Request`): prompts that are empty or longer than the
text encoder's 8 tokens, and values out of range, raise :class:`InvalidRequest` subclasses whose
message names the input; the command lines spell those names as their flags. sample.py,
evaluate.py and serve.py all sample through this class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.captions import EMPTY_PROMPT
from data.images import to_uint8
from data.shapes import IMAGE_SHAPE
from data.tokens import CONTEXT_LENGTH, truncated_prompt
from ddpm import DEFAULT_SAMPLING, SAMPLERS, SPACINGS, THRESHOLDS, SamplingOptions, generate
from models.checkpoint import SHIPPED
from models.loading import TrainedModel, load_trained_model
from runtime.devices import pick_device, use_bf16
from runtime.errors import UserError

# step index, timestep, x_t and the x0 prediction of the batch being sampled (uint8 [B, 28, 28])
StepCallback = Callable[[int, int, np.ndarray, np.ndarray], None]
MAX_IMAGES = 4096  # per request: beyond this, split it (memory and time grow linearly)


class InvalidRequest(UserError):
    """A request the pipeline refuses. ``field`` is the input at fault; the message names inputs by
    their parameter names, and :meth:`render` spells them otherwise (as ``--flags``, say)."""

    def __init__(self, field: str, template: str, **values: object):
        self.field, self.template, self.values = field, template, values
        super().__init__(self.render(lambda name: name))

    def render(self, spell: Callable[[str], str]) -> str:
        return self.template.format_map(_Names(spell, self.values))


class EmptyPrompt(InvalidRequest):
    """A prompt with nothing but spaces."""


class PromptTooLong(InvalidRequest):
    """A prompt the text encoder would cut, and truncation was not allowed."""


class OutOfRange(InvalidRequest):
    """A number outside what the sampler or the model can take."""


class _Names(dict):
    def __init__(self, spell: Callable[[str], str], values: dict):
        super().__init__(values)
        self.spell = spell

    def __missing__(self, key: str) -> str:
        return self.spell(key)


@dataclass(frozen=True)
class Request:
    """What to sample: ``num_samples`` images of each of ``prompts``, as ``options`` say, from ``seed``.

    Image i of the request depends only on (seed, i); with ``shared_noise`` image j of every prompt
    starts from the same noise, so that only the words differ between rows.
    """

    prompts: tuple[str, ...]
    num_samples: int = 8
    options: SamplingOptions = DEFAULT_SAMPLING
    seed: int = 0
    negative_prompt: str = EMPTY_PROMPT
    allow_truncation: bool = False
    shared_noise: bool = False

    def validate(self, num_train_timesteps: int | None = None) -> list[str]:
        """Raise InvalidRequest for the first bad input; the warnings to show otherwise."""
        if not self.prompts:
            raise EmptyPrompt("prompts", '{prompts} holds no prompt; give the digit to draw, e.g. {prompts} "7"')
        for prompt in self.prompts:
            if not prompt.strip():
                raise EmptyPrompt("prompts", '{prompts} is empty; give the digit to draw, e.g. {prompts} "7"')
        self._check_numbers(num_train_timesteps)
        named = [*(("prompts", p) for p in self.prompts), ("negative_prompt", self.negative_prompt)]
        return [self._check_length(p, field) for field, p in named if truncated_prompt(p) is not None]

    def _check_numbers(self, num_train_timesteps: int | None) -> None:
        o = self.options
        for field, value in (("num_samples", self.num_samples), ("steps", o.steps)):
            if value < 1:
                raise OutOfRange(field, "{" + field + "} must be at least 1, got {value}", value=value)
        if self.num_samples * len(self.prompts) > MAX_IMAGES:
            raise OutOfRange(
                "num_samples",
                f"{{num_samples}} x prompts is {self.num_samples * len(self.prompts)} "
                f"images; ask for at most {MAX_IMAGES} at once",
            )
        if self.seed < 0:  # the per-image generators are seeded through NumPy's SeedSequence
            raise OutOfRange("seed", "{seed} must be >= 0, got {value}", value=self.seed)
        if not o.guidance_scale >= 0:
            raise OutOfRange("guidance_scale", "{guidance_scale} must be >= 0, got {value}", value=o.guidance_scale)
        if o.eta is not None and not o.eta >= 0:
            raise OutOfRange("eta", "{eta} must be >= 0, got {value}", value=o.eta)
        if num_train_timesteps is not None and o.steps > num_train_timesteps:
            raise OutOfRange(
                "steps",
                "{steps} {value} exceeds the model's {t} training timesteps",
                value=o.steps,
                t=num_train_timesteps,
            )

    def _check_length(self, prompt: str, field: str) -> str:
        kept = truncated_prompt(prompt)
        if not self.allow_truncation:
            raise PromptTooLong(
                field,
                "prompt {prompt!r} is longer than the text encoder's {n} tokens and would be "
                "truncated to {kept!r}; shorten it, or pass {allow_truncation} to accept that",
                prompt=prompt,
                kept=kept,
                n=CONTEXT_LENGTH,
            )
        return f"prompt {prompt!r} was truncated to {CONTEXT_LENGTH} tokens: {kept!r}"


def make_options(sampler: str = DEFAULT_SAMPLING.sampler, **values) -> SamplingOptions:
    """SamplingOptions from keyword values, a bad choice or combination raising InvalidRequest."""
    for field, known in (("sampler", SAMPLERS), ("spacing", SPACINGS), ("threshold", THRESHOLDS)):
        value = sampler if field == "sampler" else values.get(field, getattr(DEFAULT_SAMPLING, field))
        if value not in known:
            raise OutOfRange(
                field, "{" + field + "} must be one of " + ", ".join(known) + ", got {value!r}", value=value
            )
    interval = values.get("guidance_interval")
    if interval is not None and not 0 <= interval[0] < interval[1]:
        raise OutOfRange(
            "guidance_interval",
            "{guidance_interval} must be two noise levels 0 <= low < high, got {value}",
            value=" ".join(f"{x:g}" for x in interval),
        )
    if values.get("eta") is not None and sampler != "ddim":
        raise OutOfRange(
            "eta", "{eta} only applies to {sampler} ddim, not {value}; drop {eta} or use {sampler} ddim", value=sampler
        )
    return DEFAULT_SAMPLING.replace(sampler=sampler, **values)


def add_guidance_interval_flag(parser) -> None:
    """The commands' ``--guidance_interval LOW HIGH`` flag (the pipeline's ``guidance_interval``)."""
    low, high = DEFAULT_SAMPLING.guidance_interval
    parser.add_argument(
        "--guidance_interval",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        default=(low, high),
        help=f"guide only at noise levels LOW < sigma_t <= HIGH (default {low:g} {high:g}: the "
        "high-noise steps; 0 inf guides every step), Kynkaanniemi et al. 2024",
    )


class Text2Digit:
    """A trained model and its text encoder, loaded once, sampling requests."""

    def __init__(self, model: TrainedModel, bf16: bool = False):
        self.model, self.bf16 = model, bf16
        self.device = next(model.net.parameters()).device

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        device: str = "auto",
        precision: str = "fp32",
        text_encoder: str | None = None,
    ) -> Text2Digit:
        """Load ``path``'s EMA weights (None: the model that ships with the repository, models/pretrained/)
        and the text encoder they were trained with. ``precision`` fp32 keeps every image independent
        of the batch it is sampled in; bf16 is faster where the hardware does it natively."""
        torch_device = pick_device(device)
        model = load_trained_model(Path(path or SHIPPED), torch_device, text_encoder)
        return cls(model, use_bf16(precision, torch_device))

    def __call__(
        self,
        prompts: str | Sequence[str],
        num_samples: int = 8,
        *,
        seed: int = 0,
        negative_prompt: str = EMPTY_PROMPT,
        allow_truncation: bool = False,
        shared_noise: bool = False,
        callback: StepCallback | None = None,
        output: str = "numpy",
        **options,
    ):
        """Sample ``num_samples`` digits of each prompt: uint8 [prompts, num_samples, 28, 28], or with
        ``output="pil"`` per prompt a list of PIL images. ``options`` are SamplingOptions fields (sampler, steps,
        guidance_scale, spacing, threshold, eta)."""
        request = Request(
            (prompts,) if isinstance(prompts, str) else tuple(prompts),
            num_samples,
            make_options(**options),
            seed,
            negative_prompt,
            allow_truncation,
            shared_noise,
        )
        images = self.generate(request, callback=callback)
        return [[Image.fromarray(image) for image in row] for row in images] if output == "pil" else images

    def generate(
        self,
        request: Request,
        callback: StepCallback | None = None,
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """uint8 [prompts, num_samples, 28, 28] for a request (validated here)."""
        request.validate(self.model.diffusion.num_steps)
        unique = list(dict.fromkeys(request.prompts))  # each prompt encoded once, however often it is asked for
        tokens, _ = self.model.encoder.encode([*unique, request.negative_prompt])
        rows = torch.tensor([unique.index(p) for p in request.prompts], device=tokens.device)
        cond = tokens[rows].repeat_interleave(request.num_samples, dim=0)
        indices = np.arange(len(cond))
        if request.shared_noise:
            indices = np.tile(np.arange(request.num_samples), len(request.prompts))
        on_step = None if callback is None else lambda i, t, x_t, x0: callback(i, t, to_uint8(x_t), to_uint8(x0))
        images = generate(
            self.model.net,
            self.model.diffusion,
            cond,
            tokens[-1:],
            request.options,
            image_shape=IMAGE_SHAPE,
            seed=request.seed,
            batch_size=batch_size,
            image_indices=indices,
            progress=progress,
            callback=on_step,
            bf16=self.bf16,
        )
        return to_uint8(images).reshape(len(request.prompts), request.num_samples, *IMAGE_SHAPE[1:])
