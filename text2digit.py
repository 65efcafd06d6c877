"""The Python pipeline: load a trained model once, then turn prompts into digits.

    from text2digit import Text2Digit

    pipe = Text2Digit.from_checkpoint("outputs/cpu/checkpoints/checkpoint_epoch_0004.pt")
    digits = pipe(["a thick 7", "3"], num_samples=8, steps=20, seed=0)   # uint8 [2, 8, 28, 28]
    images = pipe("7", negative_prompt="thick", output="pil")     # [[8 PIL images]]

Every request is checked in one place: the rules declared with its fields (:class:`Request` and
``ddpm.SamplingOptions``), plus :meth:`Request.validate` for prompts that are empty, that do not name
exactly one digit (data/prompts.py), or that are longer than the text encoder's 8 tokens once the
words the model was not trained on are left out. A bad input raises an :class:`InvalidRequest`
subclass whose message names it; the command lines spell those names as their flags, the page's API as
its fields. sample.py, evaluate.py and serve.py all sample through this class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.captions import EMPTY_PROMPT
from data.images import to_uint8
from data.prompts import Reader, named
from data.shapes import IMAGE_SHAPE
from data.tokens import CONTEXT_LENGTH, truncated_prompt
from ddpm import DEFAULT_BATCH_SIZE, DEFAULT_SAMPLING, GUIDED_STEPS, SamplingOptions, generate
from ddpm.distillation import as_sampler_net, ignored_by_student, student_options
from ddpm.options import InvalidRequest, OutOfRange, check, front_name, option
from models.checkpoint import SHIPPED
from models.loading import TrainedModel, load_trained_model
from runtime.devices import pick_device, use_bf16
from runtime.errors import UserError

# step index, timestep, x_t and the x0 prediction of the batch being sampled (uint8 [B, 28, 28])
StepCallback = Callable[[int, int, np.ndarray, np.ndarray], None]
UNKNOWN_WORDS = ("auto", "drop", "keep")
MAX_SEED = 2**53 - 1
MAX_IMAGES = 4096  # per request: beyond this, split it (memory and time grow linearly)


class EmptyPrompt(InvalidRequest):
    """A prompt with nothing but spaces."""


class PromptTooLong(InvalidRequest):
    """A prompt the text encoder would cut, and truncation was not allowed."""


class NotOneDigit(InvalidRequest):
    """A prompt that names no digit, two different digits, or a number of more than one digit."""


UNKNOWN = "words the model was not trained on are left out"
UNKNOWN_DROPPED = f"{UNKNOWN}: its text encoder is the seeded random one, which cannot know them"
UNKNOWN_DROPPED_TO_FIT = f"{UNKNOWN}, last first, to fit the encoder's {CONTEXT_LENGTH} tokens"


def _check_names_one_digit(prompt: str, read: str) -> None:
    """Raise NotOneDigit unless ``read`` (what the encoder reads of ``prompt``) names exactly one digit."""
    names = named(read)
    if names.digit is not None:
        return
    if names.numbers:
        number = names.numbers[0]
        raise NotOneDigit(
            "prompts",
            "prompt {prompt!r} names the number {number}, and an image is one digit: give each a prompt of its own",
            prompt=prompt, number=number,
        )  # fmt: skip
    if names.digits:
        raise NotOneDigit(
            "prompts",
            "prompt {prompt!r} names {digits} different digits ({listed}), and an image is one digit: "
            "give each a prompt of its own, e.g. {prompts} {first!r}",
            prompt=prompt, digits=len(set(names.digits)), listed=", ".join(map(str, dict.fromkeys(names.digits))),
            first=str(names.digits[0]),
        )  # fmt: skip
    cut = "" if read == prompt else f" in the {CONTEXT_LENGTH} tokens the encoder reads ({read!r})"
    raise NotOneDigit(
        "prompts",
        "prompt {prompt!r} names no digit{cut}; name the one to draw, as a numeral or a word: \"7\", \"a thin seven\"",
        prompt=prompt, cut=cut,
    )  # fmt: skip


@dataclass(frozen=True)
class Request:
    """What to sample: ``num_samples`` images of each of ``prompts``, as ``options`` say, from ``seed``.

    With :class:`ddpm.SamplingOptions`, the single declaration of what a request takes: each field's
    default, help text and rule (ddpm/options.py), from which sample.py's and serve.py's flags and the
    page's API body are made. Constructing a request checks its values; :meth:`validate` then its prompts.

    Image i of the request depends only on (seed, i); with ``shared_noise`` image j of every prompt
    starts from the same noise, so that only the words differ between rows.
    """

    prompts: tuple[str, ...] = option(help="text prompt; repeat for several rows", name="prompt")
    num_samples: int = option(8, help="images per prompt", low=1)
    options: SamplingOptions = DEFAULT_SAMPLING
    # the per-image generators are seeded through NumPy's SeedSequence, which takes no negative seed; the
    # top is the largest integer a JSON client in JavaScript holds exactly, so the page can repeat any seed
    seed: int = option(0, help="image i of a request depends only on the seed and i", low=0, high=MAX_SEED)
    negative_prompt: str = option(
        EMPTY_PROMPT,
        help="prompt to steer away from: replaces the empty prompt in guidance's unconditional half (with "
        "autoguidance, the prompt the guide reads)",
    )
    allow_truncation: bool = option(
        False, help=f"accept prompts longer than the text encoder's {CONTEXT_LENGTH} tokens, cut to their first words"
    )
    unknown_words: str = option(
        "auto",
        help="words the model was never trained on: drop them before the text encoder reads the prompt, keep "
        "them, or auto: drop them when the encoder is the seeded random tower, which cannot know them",
        choices=UNKNOWN_WORDS,
    )
    shared_noise: bool = False

    def __post_init__(self) -> None:
        check(self)

    def validate(
        self,
        num_train_timesteps: int | None = None,
        max_images: int = MAX_IMAGES,
        reader: Reader | None = None,
    ) -> list[str]:
        """Raise InvalidRequest for the first bad input; the warnings to show otherwise. ``max_images``
        caps the request's images (a server takes fewer), a model's ``num_train_timesteps`` its steps, and
        its ``reader`` (data/prompts.py) what the text encoder is given for each prompt: without it, what
        the encoder reads is left for the check with the model."""
        if not self.prompts:
            raise EmptyPrompt("prompts", '{prompts} holds no prompt; give the digit to draw, e.g. {prompts} "7"')
        for prompt in self.prompts:
            if not prompt.strip():
                raise EmptyPrompt("prompts", '{prompts} is empty; give the digit to draw, e.g. {prompts} "7"')
            _check_names_one_digit(prompt, prompt)
        self._check_size(max_images)
        if num_train_timesteps is not None:
            self.options.check_model(num_train_timesteps)
        if reader is None:
            return []
        named = [*(("prompts", p) for p in self.prompts), ("negative_prompt", self.negative_prompt)]
        return [warning for field, prompt in named for warning in self._check_reading(field, prompt, reader)]

    def _check_reading(self, field: str, prompt: str, reader: Reader) -> list[str]:
        read = reader.read(prompt)
        why = UNKNOWN_DROPPED if reader.drop_unknown else UNKNOWN_DROPPED_TO_FIT
        warnings = [] if read == prompt else [f"prompt {prompt!r} is read as {read!r}: {why}"]
        kept = truncated_prompt(read)
        if kept is not None:
            warnings.append(self._check_length(read, field))
            if field == "prompts":
                _check_names_one_digit(prompt, kept)
        return warnings

    def _check_size(self, max_images: int) -> None:
        images = self.num_samples * len(self.prompts)
        if images <= max_images:
            return
        if len(self.prompts) == 1:
            raise OutOfRange(
                "num_samples", "{num_samples} must be at most {most}, got {value}", most=max_images, value=images
            )
        raise OutOfRange(
            "num_samples",
            f"{{num_samples}} x prompts is {images} images; ask for at most {max_images} at once",
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


def make_request(prompts: str | Sequence[str], **values) -> Request:
    """A request from flat keyword values: the Request's own fields and SamplingOptions' (sampler, steps, ...),
    each checked by its declared rule (OutOfRange otherwise); an unknown name is a TypeError."""
    option_names = {f.name for f in dataclasses.fields(SamplingOptions)}
    options = SamplingOptions(**{name: value for name, value in values.items() if name in option_names})
    own = {name: value for name, value in values.items() if name not in option_names}
    return Request((prompts,) if isinstance(prompts, str) else tuple(prompts), options=options, **own)


def spelled(name: str) -> str:
    """A request field (or SamplingOptions field) as the commands and the API name it: prompts is "prompt"."""
    return front_name(Request, name)


def flag(name: str) -> str:
    """A request field's command-line spelling."""
    return f"--{spelled(name)}"


class Text2Digit:
    """A trained model and its text encoder, loaded once, sampling requests."""

    def __init__(self, model: TrainedModel, bf16: bool = False, guide: TrainedModel | None = None):
        self.model, self.bf16, self.guide = model, bf16, guide
        self.device = next(model.net.parameters()).device
        if guide is not None and (guide.encoder.record, guide.saved.diffusion) != (
            model.encoder.record,
            model.saved.diffusion,
        ):
            raise UserError(
                f"the guide {guide.path} has another text encoder or noise schedule than {model.path}; "
                "autoguidance takes a worse model trained on the same text features and schedule"
            )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        device: str = "auto",
        precision: str = "fp32",
        text_encoder: str | None = None,
        guide: str | Path | None = None,
    ) -> Text2Digit:
        """Load ``path``'s EMA weights (None: the model that ships with the repository, models/pretrained/)
        and the text encoder they were trained with. ``precision`` fp32 keeps every image independent
        of the batch it is sampled in; bf16 is faster where the hardware does it natively. ``guide``: a
        worse checkpoint of the same data (smaller, or trained for less long) that guides the model in
        place of the unconditional prompt (autoguidance, ddpm/guidance.py; the shipped model's is
        models/pretrained/guide.pt)."""
        torch_device = pick_device(device)
        model = load_trained_model(Path(path or SHIPPED), torch_device, text_encoder)
        worse = None if guide is None else load_trained_model(Path(guide), torch_device, text_encoder)
        return cls(model, use_bf16(precision, torch_device), worse)

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        callback: StepCallback | None = None,
        output: str = "numpy",
        **values,
    ):
        """Sample digits of each prompt: uint8 [prompts, num_samples, 28, 28], or with ``output="pil"`` per prompt
        a list of PIL images. ``values`` are fields of :class:`Request` (num_samples, seed, negative_prompt,
        allow_truncation, shared_noise) and of :class:`ddpm.SamplingOptions` (sampler, steps, guidance_scale, ...),
        each defaulting to its declared default."""
        images = self.generate(make_request(prompts, **values), callback=callback)
        return [[Image.fromarray(image) for image in row] for row in images] if output == "pil" else images

    @property
    def default_steps(self) -> int:
        """The steps a request that names none is sampled in: a distilled student's most (its best), else
        GUIDED_STEPS."""
        return max(self.model.distillation["student_steps"]) if self.model.distillation else GUIDED_STEPS

    def resolved(self, request: Request) -> Request:
        """``request`` with this model's default steps where it names none."""
        return dataclasses.replace(request, options=request.options.with_steps(self.default_steps))

    def check(self, request: Request, max_images: int = MAX_IMAGES) -> list[str]:
        """Validate ``request`` for this model (InvalidRequest otherwise); the warnings to show."""
        request = self.resolved(request)
        warnings = request.validate(self.model.diffusion.num_train_timesteps, max_images, self.reader(request))
        return warnings + (self._check_student(request) if self.model.distillation else [])

    def sampled_with(self, options: SamplingOptions) -> SamplingOptions:
        """What the samplers are given for ``options``: the options themselves, or a distilled student's own
        (ddpm/distillation.py: DDIM on its grid, the guidance scale its input and not the samplers')."""
        options = options.with_steps(self.default_steps)
        return student_options(options) if self.model.distillation else options

    def _check_student(self, request: Request) -> list[str]:
        """What a distilled student cannot take (InvalidRequest), and the options it overrides (warnings)."""
        record, options = self.model.distillation, request.options
        counts = record["student_steps"]
        if options.steps not in counts:
            raise OutOfRange(
                "steps",
                "{steps} must be one of {counts} for the distilled model {path}, got {value}",
                counts=", ".join(map(str, counts)), path=self.model.path, value=options.steps,
            )  # fmt: skip
        if self.guide is not None:
            raise InvalidRequest(
                "negative_prompt",
                "the distilled model {path} folds guidance in and takes no guide checkpoint; sample its teacher "
                "{teacher} for autoguidance",
                path=self.model.path, teacher=record["teacher"],
            )  # fmt: skip
        if request.negative_prompt != EMPTY_PROMPT and not self.reads_negative_prompt:
            raise InvalidRequest(
                "negative_prompt",
                "the distilled model {path} was distilled without negative prompts and takes no {negative_prompt}; "
                "sample its teacher {teacher}, or distil it again with distill.py",
                path=self.model.path, teacher=record["teacher"],
            )  # fmt: skip
        low, high = record["guidance_low"], record["guidance_high"]
        ignored = ignored_by_student(options)
        warnings = [f"the distilled model samples its own way: {', '.join(ignored)} ignored"] if ignored else []
        if not low <= options.guidance_scale <= high:
            warnings.append(f"guidance scale {options.guidance_scale:g} is outside the [{low:g}, {high:g}] distilled")
        return warnings

    @property
    def reads_negative_prompt(self) -> bool:
        """Whether a negative prompt steers this model: every guided one does, and a distilled student distilled
        with negative prompts (ddpm/distillation.py); older students take none."""
        return not self.model.distillation or self.model.net.cfg.negative_input

    def reader(self, request: Request) -> Reader:
        """What the text encoder is given for the request's prompts (data/prompts.py)."""
        random = self.model.encoder.kind == "random"
        drop = request.unknown_words == "drop" or (request.unknown_words == "auto" and random)
        return Reader(self.model.vocabulary.known_words, drop)

    def generate(
        self,
        request: Request,
        callback: StepCallback | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """uint8 [prompts, num_samples, 28, 28] for a request (validated here)."""
        self.check(request)
        request = self.resolved(request)
        reader = self.reader(request)
        prompts, negative = [reader.read(p) for p in request.prompts], reader.read(request.negative_prompt)
        # a student that reads no negative prompt has no use for the (empty) one's tokens: not encoded at all
        negatives = [negative] if self.reads_negative_prompt else []
        tokens = self.model.encoder.tokens_of([*prompts, *negatives])  # each prompt encoded once, at most
        uncond = tokens[len(prompts) :]  # [1, L, D], or [0, L, D] unused
        cond = tokens[: len(prompts)].repeat_interleave(request.num_samples, dim=0)
        indices = np.arange(len(cond))
        if request.shared_noise:
            indices = np.tile(np.arange(request.num_samples), len(request.prompts))
        on_step = None if callback is None else lambda i, t, x_t, x0: callback(i, t, to_uint8(x_t), to_uint8(x0))
        net = self.model.net
        if self.model.distillation:  # the scale (and the negative prompt) are the student's inputs
            steps, scale = request.options.steps, request.options.guidance_scale
            negative_tokens = uncond if self.model.net.cfg.negative_input else None
            net = as_sampler_net(net, self.model.diffusion, steps, scale, negative_tokens)
        images = generate(
            net,
            self.model.diffusion,
            cond,
            uncond,
            self.sampled_with(request.options),
            image_shape=IMAGE_SHAPE,
            seed=request.seed,
            batch_size=batch_size,
            image_indices=indices,
            progress=progress,
            callback=on_step,
            bf16=self.bf16,
            guide_net=self._guide_net(request, uncond),
        )
        return to_uint8(images).reshape(len(request.prompts), request.num_samples, *IMAGE_SHAPE[1:])

    def _guide_net(self, request: Request, negative: torch.Tensor):
        """Autoguidance's worse network, reading the prompt itself, or the negative prompt (its tokens
        ``negative``) when the request has one: the update then also pushes away from what the worse
        model draws for those words, as classifier-free guidance does from the negative prompt (on the
        quick-start model, negative "thick" thins the strokes from +5% to -7% of the data's)."""
        if self.guide is None:
            return None
        if request.negative_prompt == EMPTY_PROMPT:
            return self.guide.net
        return lambda x, t, context: self.guide.net(x, t, negative.expand_as(context))
