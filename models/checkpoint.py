"""The checkpoint format, in one place: its version and the upgrade from every earlier one, the file
names, the one writer and the one reader, the saved model's description, and which model a command
loads when none is named.

A checkpoint is a ``torch.save`` zip of tensors and plain data (read with ``weights_only=True``):

- what sampling reads (``SAMPLING_KEYS``): ``config``, the full flat training config
  (``training.config.TrainConfig.to_flat``, kept for resuming and provenance; sampling reads only
  the UNet's layout and the diffusion from it), ``ema`` (the EMA weights), ``text_encoder`` (the
  text encoder's record), ``vocabulary`` (the caption vocabulary's name and fingerprint) and ``epoch``;
- what resuming reads besides (``training.state.RESUME_KEYS``): the model, optimizer, schedule,
  random states and the position in the data order;
- a distilled student's (distill.py) ``distillation``: how it was made, its teacher and the teacher's
  sha256, the step counts it samples in (sampling reads it too).

``<output_dir>/checkpoints/`` holds

- ``checkpoint_epoch_EEEE.pt``: the state at the end of epoch EEEE;
- ``checkpoint_step_SSSSSSSS.pt``: the state after global step SSSSSSSS, in the middle of an epoch
  (every ``checkpoint_every_steps`` steps, and when a signal stops training);
- ``.checkpoint_*.tmp``: a write in progress, or one a kill interrupted; never read, and deleted
  by training's next ``prune_checkpoints``.

The newest checkpoint is the one whose *contents* hold the highest step, among the files whose
names match exactly, whose contents agree with their names and whose zip CRCs verify: a torn,
truncated, bit-flipped, renamed or foreign file is skipped with a warning, never picked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from data.captions import caption_set
from ddpm import DiffusionConfig
from models.unet import UNetConfig
from runtime.errors import UserError
from runtime.files import atomic_write

# 1: a5c598a and before (no version key); 2: adds format_version and the "groups" and "captions"
# config keys; 3: adds "vocabulary" (the caption vocabulary's name and fingerprint), and the record
# of a random text encoder carries its seed as the number "seed".
FORMAT_VERSION = 3
# What a saved config meant by the keys it lacks: the UNet layout and captions of the time before each key.
LEGACY_DEFAULTS = {
    "ff_mult": 4,
    "extra_up_block": True,
    "patch_size": 1,
    "groups": 8,
    "captions": "digits",
}
SAMPLING_KEYS = ("config", "ema", "text_encoder", "vocabulary", "epoch")
ALWAYS_KEYS = ("config", "ema", "text_encoder", "epoch")  # in every format
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = Path("outputs/mnist")  # train.py's, and where the commands look for a checkpoint
PRETRAINED_DIR = ROOT / "models" / "pretrained"  # the shipped models, each re-made by ``python -m models.pretrained``
TEACHER = PRETRAINED_DIR / "mnist.pt"  # the shipped guided model, which distill.py distils into the student
# the one the commands load when none is named: the student, which matches or beats its teacher in 4 passes
SHIPPED = PRETRAINED_DIR / "fast.pt"
EPOCH_NAME = re.compile(r"^checkpoint_epoch_(\d+)\.pt$")
STEP_NAME = re.compile(r"^checkpoint_step_(\d+)\.pt$")


# ----------------------------------------------------------------------------- versions
def upgrade(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """A loaded checkpoint in the current format, whichever format it was written in."""
    version = payload.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {version}, newer than this code's {FORMAT_VERSION}; "
            "update the code (git pull) to read it"
        )
    if not set(ALWAYS_KEYS) <= payload.keys():
        raise UserError(f"{path} is not a checkpoint written by train.py (missing config/ema/text_encoder)")
    # Keys a config lacks mean what they meant before they existed, in any version.
    config = {**payload["config"], **{k: v for k, v in LEGACY_DEFAULTS.items() if k not in payload["config"]}}
    upgraded = {**payload, "config": config, "format_version": FORMAT_VERSION}
    if version < 3:  # the vocabulary of that name as this code defines it; the seed as a number
        upgraded["vocabulary"] = vocabulary_record(upgraded["config"]["captions"])
        record = payload["text_encoder"]
        if record.get("weights") == "random" and "seed" not in record:
            upgraded["text_encoder"] = {**record, "seed": int(str(record["source"]).removeprefix("seed="))}
    return upgraded


def vocabulary_record(name: str) -> dict[str, str]:
    """What a checkpoint records of the caption vocabulary ``name`` as this code defines it."""
    return {"name": name, "fingerprint": caption_set(name).fingerprint}


def position(payload: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(step, epoch, batches done in that epoch, steps per epoch) that a checkpoint holds."""
    step, epoch, epoch_step, steps_per_epoch = (
        int(payload[key]) for key in ("step", "epoch", "epoch_step", "steps_per_epoch")
    )
    return step, epoch, epoch_step, steps_per_epoch


# ----------------------------------------------------------------------------- the saved model
@dataclass(frozen=True)
class VocabularyRecord:
    """The caption vocabulary a model was trained on: its name (data/captions.py's VOCABULARIES) and
    the fingerprint of everything that defined it then (``CaptionSet.fingerprint``)."""

    name: str
    fingerprint: str

    def __str__(self) -> str:
        return f"'{self.name}' (fingerprint {self.fingerprint})"

    def current(self) -> VocabularyRecord:
        """This code's vocabulary of the same name."""
        try:
            return VocabularyRecord(**vocabulary_record(self.name))
        except ValueError:  # a name this code no longer defines
            return VocabularyRecord(self.name, "none: this code defines no such vocabulary")

    def check_current(self, path: Path) -> None:
        """Raise UserError unless this code's vocabulary of that name is still the one ``path`` was trained on."""
        now = self.current()
        if now != self:
            raise UserError(
                f"checkpoint {path} was trained on the caption vocabulary {self} but this code's "
                f"'{self.name}' is now {now.fingerprint}; sample with the commit that trained it, or retrain"
            )


Section = TypeVar("Section", UNetConfig, DiffusionConfig)


def config_section(kind: type[Section], config: Mapping[str, Any]) -> Section:
    """The ``kind`` section (UNetConfig, DiffusionConfig) of a saved flat config; keys it lacks take their
    defaults, and its lists become the section's tuples."""
    names = [f.name for f in dataclasses.fields(kind) if not f.metadata.get("fixed") and f.name in config]
    return kind(**{name: tuple(v) if isinstance(v := config[name], list) else v for name in names})


@dataclass
class SavedModel:
    """What sampling reads from a checkpoint: the UNet's layout, the diffusion, the caption vocabulary,
    the text encoder's record, the EMA weights and the epoch; ``config`` is the flat training config it
    recorded, kept for provenance (evaluate.py's report); ``distillation``, for a distilled student
    (distill.py), how it was distilled: its teacher and sha256, its step counts, its sampler."""

    unet: UNetConfig
    diffusion: DiffusionConfig
    vocabulary: VocabularyRecord
    text_encoder: dict[str, Any]
    ema_weights: dict[str, torch.Tensor]
    epoch: int
    config: dict[str, Any]
    distillation: dict[str, Any] | None = None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> SavedModel:
        """The description of a checkpoint in the current format (as :func:`load_checkpoint` returns it)."""
        config = payload["config"]
        return cls(
            config_section(UNetConfig, config),
            config_section(DiffusionConfig, config),
            VocabularyRecord(**payload["vocabulary"]),
            payload["text_encoder"],
            payload["ema"]["weights"],
            payload["epoch"],
            config,
            payload.get("distillation"),
        )


# ----------------------------------------------------------------------------- files
def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, epoch: int) -> Path:
    """Where the state at the end of ``epoch`` goes."""
    return checkpoint_dir(output_dir) / f"checkpoint_epoch_{epoch:04d}.pt"


def step_checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where a mid-epoch state after global step ``step`` goes."""
    return checkpoint_dir(output_dir) / f"checkpoint_step_{step:08d}.pt"


def save_checkpoint(payload: Mapping[str, Any], path: Path) -> None:
    """Write ``payload`` (at least SAMPLING_KEYS) in the current format, atomically: a crash leaves the old
    file or the whole new one."""
    atomic_write(path, lambda f: torch.save({**payload, "format_version": FORMAT_VERSION}, f))


def verify_checksums(path: Path) -> None:
    """Raise UserError unless ``path`` is a complete zip whose every member matches its CRC-32.

    ``torch.load`` reads a bit-flipped tensor without complaint; this reads the file once more
    (milliseconds for this project's checkpoints) so a damaged one is refused, not trained on.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(
            f"checkpoint {path} is truncated or not a checkpoint ({err}); delete it and use an earlier one"
        ) from None
    if damaged is not None:
        raise UserError(
            f"checkpoint {path} is corrupt (checksum mismatch in {damaged}); delete it and use an earlier one"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint after checking its CRCs, with ``weights_only=True`` (tensors and plain data, never
    code), in the current format whichever format it was written in (:func:`upgrade`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path, or train first (python train.py)")
    verify_checksums(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many kinds for a foreign file or a pickle that would run code
        raise UserError(
            f"checkpoint {path} is corrupt or not a checkpoint ({type(err).__name__}); delete it and use an earlier one"
        ) from None
    if not isinstance(payload, dict):
        raise UserError(f"{path} is not a checkpoint written by train.py (missing config/ema/text_encoder)")
    return upgrade(payload, path)


@dataclass(frozen=True)
class CheckpointFile:
    path: Path
    step: int
    epoch_end: bool


def list_checkpoints(output_dir: str | Path) -> list[CheckpointFile]:
    """The checkpoints in ``output_dir`` whose contents agree with their names, oldest first by step.

    Reads each file's position fields only (a memory-mapped load: the tensors stay on disk);
    files that cannot be read or disagree with their names are skipped with a warning.
    """
    found = []
    for path in sorted(checkpoint_dir(output_dir).glob("checkpoint_*.pt")):
        epoch_name, step_name = EPOCH_NAME.match(path.name), STEP_NAME.match(path.name)
        if not (epoch_name or step_name):
            continue
        try:
            header = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            step, epoch, batches_done, steps_per_epoch = position(header)
        except Exception:  # truncated, foreign or from an older train.py: not a candidate
            _warn(f"ignoring {path}: unreadable, or not a checkpoint this train.py wrote")
            continue
        if epoch_name and (epoch != int(epoch_name.group(1)) or batches_done != steps_per_epoch):
            _warn(
                f"ignoring {path}: it holds {batches_done}/{steps_per_epoch} steps of epoch {epoch}, "
                "not the end of the epoch its name says"
            )
        elif step_name and step != int(step_name.group(1)):
            _warn(f"ignoring {path}: it holds step {step}, not its name's")
        else:
            found.append(CheckpointFile(path, step, epoch_name is not None))
    return sorted(found, key=lambda c: (c.step, c.epoch_end))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The intact checkpoint holding the highest step in ``output_dir``, or None."""
    for candidate in reversed(list_checkpoints(output_dir)):
        try:
            verify_checksums(candidate.path)
        except UserError as err:
            _warn(f"skipping {err}")
            continue
        return candidate.path
    return None


def no_checkpoint_error(output_dir: str | Path) -> UserError:
    """What a command says when ``output_dir`` holds no checkpoint to read."""
    return UserError(
        f"no checkpoint in {checkpoint_dir(output_dir)}; train first (python train.py) or pass --checkpoint PATH"
    )


# ----------------------------------------------------------------------------- which model a command loads
def shipped_record(path: Path = SHIPPED) -> dict[str, Any]:
    """What the shipped weights' record (``NAME.json`` beside them) says: the command, the commit, the scores."""
    return json.loads(path.with_suffix(".json").read_text())


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and ``--output_dir``: how every command that loads a model names it (:func:`find_model`);
    ``--guide_checkpoint``, the worse model autoguidance guides it with."""
    parser.add_argument("--checkpoint", type=Path, help="checkpoint file (default: the newest in --output_dir)")
    parser.add_argument(
        "--output_dir",
        type=Path,
        help=f"training output folder (default {DEFAULT_OUTPUT_DIR}; when not named and it holds no checkpoint, "
        "the model that ships with the repository)",
    )
    parser.add_argument(
        "--guide_checkpoint",
        type=Path,
        help="autoguidance (Karras et al. 2024): guide with this worse checkpoint of the same data (smaller, or "
        "trained for less long) instead of the unconditional prompt; --guidance_scale then weighs it. The "
        "shipped model's: models/pretrained/guide.pt",
    )


def find_model(checkpoint: Path | None, output_dir: Path | None) -> Path:
    """The checkpoint a command loads (``--checkpoint``, ``--output_dir``), by one rule:

    1. ``--checkpoint PATH``: that file;
    2. else the newest intact checkpoint in ``--output_dir`` (default ``outputs/mnist``);
    3. else, only when no ``--output_dir`` was named, the model that ships with the repository
       (``models/pretrained/fast.pt``, the distilled student; its teacher is ``--checkpoint
       models/pretrained/mnist.pt``), said in one line on stderr, so that a fresh clone samples at
       once. A folder that was named must hold a checkpoint (UserError otherwise): a typo there
       should not quietly load someone else's model.
    """
    if checkpoint is not None:
        return checkpoint
    folder = output_dir or DEFAULT_OUTPUT_DIR
    path = latest_checkpoint(folder)
    if path is not None:
        return path
    if output_dir is not None or not SHIPPED.is_file():
        raise no_checkpoint_error(folder)
    print(
        f"no checkpoint in {checkpoint_dir(folder)}: using the shipped model {SHIPPED.relative_to(ROOT)} "
        f"({shipped_record()['command']}; see its .json; its teacher: --checkpoint {TEACHER.relative_to(ROOT)})",
        file=sys.stderr,
    )
    return SHIPPED


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
