"""Training configuration: one dataclass, filled from a flat YAML file and then from flags.

Every key is also a command-line flag of the same name (``--num_epochs 10``), as in the seed.
The keys of the UNet's layout and of the diffusion are not written here: they are the fields of
``models.unet.UNetConfig`` and ``ddpm.DiffusionConfig``, which ``TrainConfig`` holds as its
``model`` and ``diffusion`` sections, so the YAML files and flags stay flat (``widths: [32, 64]``,
``--prediction v``) while each field has one home.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from data.captions import VOCABULARIES
from data.shapes import IMAGE_SIZE
from ddpm import DEFAULT_SAMPLING, GUIDED_STEPS, TIMESTEP_SAMPLINGS, DiffusionConfig, SamplingOptions
from ddpm.options import refused_as
from models.checkpoint import DEFAULT_OUTPUT_DIR, config_section
from models.unet import UNetConfig
from runtime.devices import COMPILE_CHOICES, PRECISIONS
from runtime.errors import UserError
from runtime.flags import CliParser, parse_bool, require_positive, suggest
from training.optimizer import LR_SCHEDULES

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mnist.yaml"
SECTIONS = {"model": UNetConfig, "diffusion": DiffusionConfig}
# The range checks of validate(), by key.
POSITIVE_KEYS = """num_epochs batch_size num_train_timesteps log_every checkpoint_every sample_every samples_per_digit
    layers_per_block head_dim ff_mult patch_size groups eval_samples stop_check_every""".split()
NON_NEGATIVE_KEYS = """min_snr_gamma train_subset weight_decay warmup_steps grad_clip dropout eval_every
    global_batch_size checkpoint_every_steps keep_last max_bad_steps""".split()


def sampling_key(name: str, default: Any = None) -> Any:
    """A key that is the SamplingOptions field ``name`` under a flat name of its own: its default comes from
    the declaration (``default`` where that leaves it to the model), and so do its choices and checks
    (through :meth:`TrainConfig.sampling_options`)."""
    declared = getattr(DEFAULT_SAMPLING, name)
    return field(default=default if declared is None else declared, metadata={"sampling": name})


@dataclass
class TrainConfig:
    # data and outputs
    data_dir: str | None = None
    output_dir: str = str(DEFAULT_OUTPUT_DIR)
    train_subset: int = 0  # train on the first N images only (0 = all 60,000)
    # model: the UNet's layout (the fields of models/unet.py's UNetConfig) and the text encoder
    model: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: str = "auto"  # auto | openai | random | path to a CLIP state dict
    text_encoder_seed: int = 0
    # diffusion: num_train_timesteps and prediction (ddpm/diffusion.py's DiffusionConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    cond_drop_prob: float = 0.1
    # training noise levels: uniform timesteps, or lognormal: ln sigma ~ N(log_sigma_mean, log_sigma_std^2)
    timestep_sampling: str = field(default="uniform", metadata={"choices": TIMESTEP_SAMPLINGS})  # ddpm/diffusion.py
    log_sigma_mean: float = -1.2  # EDM's P_mean (Karras et al. 2022)
    log_sigma_std: float = 1.2  # EDM's P_std
    uniform_share: float = 0.0  # lognormal: the share of images that keep a uniform timestep
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weighting (Hang et al. 2023; ddpm/diffusion.py), e.g. 5
    captions: str = field(default="free-text-2", metadata={"choices": tuple(VOCABULARIES)})  # see data/captions.py
    # optimisation
    num_epochs: int = 5
    batch_size: int = 128  # per process
    global_batch_size: int = 0  # if > 0: images per step over all ranks, and batch_size = this / world size
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = field(default="cosine", metadata={"choices": LR_SCHEDULES})
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    max_bad_steps: int = 0  # skip up to N steps with a non-finite loss instead of stopping (a host sync per step)
    # logging, checkpoints and samples
    log_every: int = 50
    checkpoint_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # also checkpoint every N steps, mid-epoch too (0 = at epoch ends only)
    keep_last: int = 0  # keep only the newest N checkpoints (0 = all)
    stop_check_every: int = 10  # DDP: steps between the ranks' agreement on a stop signal (a tiny all_reduce)
    sample_every: int = 1  # epochs
    samples_per_digit: int = 8
    # how those grids and evaluations sample: SamplingOptions fields (ddpm/generation.py) under flat names
    sampler: str = sampling_key("sampler")
    sample_steps: int = sampling_key("steps", GUIDED_STEPS)  # training samples the guided model it trains
    guidance_scale: float = sampling_key("guidance_scale")
    eval_every: int = 0  # epochs between judge evaluations (0 = never); see evaluation/
    eval_samples: int = 30  # images per digit in each such evaluation
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})  # auto: bf16 where native
    compile: str = field(default="auto", metadata={"choices": COMPILE_CHOICES})  # auto: on CUDA
    channels_last: bool = False

    # ------------------------------------------------------------------ the flat view
    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from flat key/value pairs (a YAML file, flags, a checkpoint's record); every key must exist."""
        keys = flat_fields()
        top = {key: value for key, value in values.items() if keys[key][0] is None}  # KeyError: an unknown key
        return cls(**top, **{name: config_section(kind, values) for name, kind in SECTIONS.items()})

    def to_flat(self) -> dict[str, Any]:
        """Every key and its value in plain Python types (lists, not tuples): what a checkpoint records."""
        flat = {}
        for key, (section, f) in flat_fields().items():
            value = getattr(getattr(self, section), f.name) if section else getattr(self, key)
            flat[key] = list(value) if isinstance(value, tuple) else value
        return flat

    def noise_levels(self) -> dict[str, Any]:
        """The law of the training noise levels, as GaussianDiffusion.sample_timesteps takes it."""
        if self.timestep_sampling == "uniform":
            return {}
        return {"log_sigma": (self.log_sigma_mean, self.log_sigma_std), "uniform_share": self.uniform_share}

    def sampling_options(self) -> SamplingOptions:
        """How training's sample grids and evaluations sample (OutOfRange for a value the declaration refuses)."""
        return SamplingOptions(**{name: getattr(self, key) for name, key in SAMPLING_KEYS.items()})

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise UserError naming the first out-of-range value."""
        values = SimpleNamespace(**self.to_flat())
        require_positive(values, POSITIVE_KEYS)
        for name in NON_NEGATIVE_KEYS:
            if not getattr(values, name) >= 0:  # also refuses NaN
                raise UserError(f"--{name} must be >= 0, got {getattr(values, name)}")
        for name in ("learning_rate", "log_sigma_std"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise UserError(f"--{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.uniform_share <= 1:
            raise UserError(f"--uniform_share must be in [0, 1], got {self.uniform_share}")
        for name in ("cond_drop_prob", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        with refused_as(_sampling_flag):
            self.sampling_options().check_model(self.diffusion.num_train_timesteps)
        for key, (_, f) in flat_fields().items():
            choices = f.metadata.get("choices")
            if choices and getattr(values, key) not in choices:
                raise UserError(f"--{key} must be one of {', '.join(choices)}, got {getattr(values, key)!r}")
        self._validate_layout()

    def _validate_layout(self) -> None:
        model = self.model
        if len(model.widths) != len(model.attention):
            raise UserError(
                f"--widths has {len(model.widths)} levels but --attention has {len(model.attention)}; "
                "give one attention flag per width"
            )
        side, levels = IMAGE_SIZE / model.patch_size, len(model.widths)
        if side % 2 ** (levels - 1):
            raise UserError(
                f"--patch_size {model.patch_size} with {levels} --widths levels: each level halves the "
                f"map, so {IMAGE_SIZE} / patch_size must divide by 2^(levels - 1); use patch_size 1 with "
                "up to 3 levels, 2 with up to 2, or 4 or 7 with 1"
            )
        try:
            model.validate()
        except ValueError as err:
            raise UserError(f"{err}; change --widths, --head_dim or --groups") from None

    def per_process_batch_size(self, world_size: int) -> int:
        """``batch_size``, or ``global_batch_size`` split evenly over ``world_size`` processes."""
        if not self.global_batch_size:
            return self.batch_size
        if self.global_batch_size % world_size:
            raise UserError(
                f"--global_batch_size {self.global_batch_size} does not split evenly over world size "
                f"{world_size}; use a multiple of {world_size}, or set the per-process --batch_size "
                "and --global_batch_size 0"
            )
        return self.global_batch_size // world_size


# SamplingOptions field -> the training key that holds it
SAMPLING_KEYS = {f.metadata["sampling"]: f.name for f in dataclasses.fields(TrainConfig) if "sampling" in f.metadata}


def _sampling_flag(name: str) -> str:
    """A SamplingOptions field as train.py spells it: the flag of the key that holds it."""
    return f"--{SAMPLING_KEYS.get(name, name)}"


def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every config key, in order: key -> (its section, or None for TrainConfig's own fields; its field)."""
    keys: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            keys.update(
                (g.name, (f.name, g))
                for g in dataclasses.fields(SECTIONS[f.name])
                if not (g.metadata.get("fixed") or g.metadata.get("distill_only"))
            )
        else:
            keys[f.name] = (None, f)
    return keys


def section_keys(*sections: str) -> tuple[str, ...]:
    """The flat keys of the given sections: ``section_keys("model", "diffusion")`` fixes what weights mean."""
    return tuple(key for key, (section, _) in flat_fields().items() if section in sections)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _add_flag(parser: argparse.ArgumentParser, key: str, f: dataclasses.Field) -> None:
    default = _default(f)
    if isinstance(default, (list, tuple)):
        item = parse_bool if isinstance(default[0], bool) else type(default[0])
        parser.add_argument(f"--{key}", type=item, nargs="+", default=argparse.SUPPRESS)
    elif default is None:
        parser.add_argument(f"--{key}", type=str, default=argparse.SUPPRESS)
    else:
        kind = parse_bool if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{key}", type=kind, default=argparse.SUPPRESS, help=f"(default from config: {default})")


def read_yaml_config(path: Path) -> dict[str, Any]:
    """The key/value pairs of a YAML config, rejecting unknown keys with a suggestion."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"config file {path} not found; pass an existing file to --config (see configs/)") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold key: value pairs")
    known = list(flat_fields())
    for key in values:
        if key not in known:
            raise UserError(f"unknown key {key!r} in {path}{suggest(key, known)}")
    return values


def load_config_file(path: Path = DEFAULT_CONFIG) -> TrainConfig:
    """The config a YAML file describes, with every other key at its default."""
    return TrainConfig.from_flat(read_yaml_config(path))


@dataclass(frozen=True)
class Launch:
    """How a run starts, beside its config: ``resume`` is None (start fresh), "latest" (``--resume`` alone),
    "auto" (latest if any, else fresh) or a checkpoint path; ``overwrite`` moves an earlier run aside."""

    resume: str | None = None
    overwrite: bool = False


def parse_train_args(argv: Sequence[str]) -> tuple[TrainConfig, Launch]:
    """(config, launch) from the command line: YAML file first, then flags on top."""
    parser = CliParser(prog="train.py", description="Train the text-conditioned MNIST diffusion model.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML file of defaults")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the newest checkpoint in --output_dir, or from PATH; "
        "--resume auto continues if there is one and starts fresh otherwise",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --output_dir that holds another run, moving its files aside",
    )
    for key, (_, f) in flat_fields().items():
        _add_flag(parser, key, f)
    args = vars(parser.parse_args(argv))
    config_path, launch = args.pop("config"), Launch(args.pop("resume"), args.pop("overwrite"))
    if launch.overwrite and launch.resume is not None:
        raise UserError("--overwrite starts a fresh run and --resume continues one; give only one of them")
    cfg = TrainConfig.from_flat({**read_yaml_config(config_path), **args})
    cfg.validate()
    return cfg, launch
