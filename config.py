"""Training configuration: one flat dataclass, filled from a YAML file and then from flags.

Every field is also a command-line flag of the same name (``--num_epochs 10``), as in the seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from data.mnist import IMAGE_SIDE
from errors import UserError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "mnist.yaml"
CHOICES = {
    "prediction": ("eps", "v"),
    "lr_schedule": ("cosine", "constant"),
    "sampler": ("ddpm", "ddim", "dpmpp_2m"),
    "precision": ("auto", "fp32", "bf16"),
    "compile": ("auto", "on", "off"),
    "device": None,  # validated when the device is set up
}


@dataclass
class TrainConfig:
    # data and outputs
    data_dir: str | None = None
    output_dir: str = "outputs/mnist"
    train_subset: int = 0  # train on the first N images only (0 = all 60,000)
    # model
    widths: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention: list[bool] = field(default_factory=lambda: [False, True, True])
    layers_per_block: int = 2
    head_dim: int = 32
    ff_mult: int = 2  # the transformer feed-forward's hidden width, in multiples of the channels
    extra_up_block: bool = False  # up path: layers_per_block + 1 blocks per level (improved-diffusion's layout)
    patch_size: int = 1  # 2: the UNet works on 14x14 maps of 2x2 patches, about twice as fast (configs/cpu.yaml)
    dropout: float = 0.0
    text_encoder: str = "auto"  # auto | openai | random | path to a CLIP state dict
    text_encoder_seed: int = 0
    # diffusion
    num_train_timesteps: int = 1000
    prediction: str = "eps"
    cond_drop_prob: float = 0.1
    # optimisation
    num_epochs: int = 5
    batch_size: int = 128  # per process
    global_batch_size: int = 0  # if > 0: images per step over all ranks, and batch_size = this / world size
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
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
    sampler: str = "dpmpp_2m"
    sample_steps: int = 20
    guidance_scale: float = 8.0
    eval_every: int = 0  # epochs between judge evaluations (0 = never); see evaluation/
    eval_samples: int = 30  # images per digit in each such evaluation
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto = bf16 autocast where the hardware does bf16 (devices.use_bf16)
    compile: str = "auto"  # auto = torch.compile on CUDA
    channels_last: bool = False

    def validate(self) -> None:
        """Raise UserError naming the first out-of-range value."""
        positive = ("num_epochs", "batch_size", "num_train_timesteps", "log_every", "checkpoint_every",
                    "sample_every", "samples_per_digit", "sample_steps", "layers_per_block", "head_dim", "ff_mult",
                    "patch_size", "eval_samples", "stop_check_every")
        require_positive(self, positive)
        non_negative = ("train_subset", "weight_decay", "warmup_steps", "grad_clip", "dropout", "guidance_scale",
                        "eval_every", "global_batch_size", "checkpoint_every_steps", "keep_last", "max_bad_steps")
        for name in non_negative:
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate}")
        for name in ("cond_drop_prob", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.sample_steps > self.num_train_timesteps:
            raise UserError(f"--sample_steps {self.sample_steps} exceeds --num_train_timesteps "
                            f"{self.num_train_timesteps}; use at most {self.num_train_timesteps}")
        if len(self.widths) != len(self.attention):
            raise UserError(f"--widths has {len(self.widths)} levels but --attention has {len(self.attention)}; "
                            "give one attention flag per width")
        side, levels = IMAGE_SIDE / self.patch_size, len(self.widths)
        if side % 2 ** (levels - 1):
            raise UserError(f"--patch_size {self.patch_size} with {levels} --widths levels: each level halves the "
                            f"map, so {IMAGE_SIDE} / patch_size must divide by 2^(levels - 1); use patch_size 1 with "
                            "up to 3 levels, 2 with up to 2, or 4 or 7 with 1")
        for name, choices in CHOICES.items():
            if choices and getattr(self, name) not in choices:
                raise UserError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def per_process_batch_size(self, world_size: int) -> int:
        """``batch_size``, or ``global_batch_size`` split evenly over ``world_size`` processes."""
        if not self.global_batch_size:
            return self.batch_size
        if self.global_batch_size % world_size:
            raise UserError(f"--global_batch_size {self.global_batch_size} does not split evenly over world size "
                            f"{world_size}; use a multiple of {world_size}, or set the per-process --batch_size "
                            "and --global_batch_size 0")
        return self.global_batch_size // world_size


def require_positive(values: object, names: Sequence[str]) -> None:
    """Raise UserError for the first flag in ``names`` whose value (an attribute of ``values``) is below 1."""
    for name in names:
        if getattr(values, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(values, name)}")


def _suggest(name: str, known: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class CliParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (through UserError).

    Flags must be spelled out: argparse's default would silently take a mistyped, cut-off
    ``--learning_rat`` for ``--learning_rate``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            flag = message.split(":", 1)[1].split()[0]
            known = [o for a in self._actions for o in a.option_strings]
            message += _suggest(flag.split("=")[0], known)
        raise UserError(f"{message} (see {self.prog} --help)")


def _add_field_flag(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    kind = bool if isinstance(default, bool) else type(default)
    if isinstance(default, list):
        item = _parse_bool if isinstance(default[0], bool) else type(default[0])
        parser.add_argument(f"--{f.name}", type=item, nargs="+", default=argparse.SUPPRESS)
    elif default is None:
        parser.add_argument(f"--{f.name}", type=str, default=argparse.SUPPRESS)
    else:
        parser.add_argument(f"--{f.name}", type=_parse_bool if kind is bool else kind, default=argparse.SUPPRESS,
                            help=f"(default from config: {default})")


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
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in known:
            raise UserError(f"unknown key {key!r} in {path}{_suggest(key, known)}")
    return values


def parse_train_args(argv: Sequence[str]) -> tuple[TrainConfig, str | None]:
    """(config, resume) from the command line: YAML file first, then flags on top.

    ``resume`` is None (start fresh), "latest" (``--resume`` alone), "auto" or a checkpoint path.
    """
    parser = CliParser(prog="train.py", description="Train the text-conditioned MNIST diffusion model.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML file of defaults")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest checkpoint in --output_dir, or from PATH; "
                             "--resume auto continues if there is one and starts fresh otherwise")
    for f in dataclasses.fields(TrainConfig):
        _add_field_flag(parser, f)
    args = vars(parser.parse_args(argv))
    config_path, resume = args.pop("config"), args.pop("resume")
    cfg = TrainConfig(**{**read_yaml_config(config_path), **args})
    cfg.validate()
    return cfg, resume
