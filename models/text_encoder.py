"""Frozen CLIP ViT-B/32 text tower (open_clip) at context length 8.

Only the text tower is ever built. Weights come from one of:

- ``"openai"``: OpenAI's CLIP weights, from the local Hugging Face cache or downloaded
  when the hub answers. Explicitly asked for but unavailable -> ``UserError``.
- a local file path: a full open_clip CLIP state dict (``visual.*``/``logit_*`` keys are
  dropped) or a text-tower-only state dict, read with ``torch.load(weights_only=True)``
  (or safetensors by suffix). 77-row positional embeddings are sliced to the first 8 rows:
  the attention is causal, so the first 8 positions behave exactly as in the 77-token model.
- ``"random"``: seeded initialisation, bitwise reproducible across processes on CPU. Its values come
  from open_clip's initialisation code and torch's random streams, so they can change with either
  version: ``pyproject.toml`` pins both, the record names the versions that built it, and a mismatch
  says which differ.
- ``"auto"`` (default): ``openai`` when the weights can be had within seconds, otherwise a
  loud warning and ``random``.

``quick_gelu`` defaults to True: OpenAI's weights were trained with QuickGELU, and random
towers share that architecture. Pass ``quick_gelu=False`` for local weights trained with
plain GELU (for example open_clip's LAION ViT-B-32 checkpoints).

``encoder.record`` describes what was loaded, including a fingerprint of the encoder's
output on fixed probe prompts; ``check_compatible`` compares a checkpoint's record with the
encoder loaded now.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import urllib.error
import urllib.request
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from data.tokens import CONTEXT_LENGTH, MODEL_NAME, tokenizer
from runtime.errors import UserError

OPENAI_HUB_REPO = "timm/vit_base_patch32_clip_224.openai"
# open_clip prefers the safetensors file and falls back to the pickle, in this order.
OPENAI_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PROBE_TIMEOUT_S = 3.0
PREFETCH_HINT = (
    'to prefetch them, run on a machine with internet: python -c "import open_clip; '
    "open_clip.create_model_and_transforms('ViT-B-32-quickgelu', pretrained='openai')\" "
    "and copy its Hugging Face cache (~/.cache/huggingface) here, "
    "or pass a local CLIP weights file path"
)
PROBE_PROMPTS = [str(digit) for digit in range(10)]
FINGERPRINT_SIGNIFICANT_DIGITS = 6
FINGERPRINT_REL_TOL = 1e-4
FINGERPRINT_ABS_TOL = 1e-5
PROMPT_CACHE_SIZE = 1024  # prompts whose tokens tokens_of keeps: 16 KiB each


class _WeightsUnavailable(Exception):
    """The OpenAI weights cannot be had here; the message says why."""


class TextEncoder(torch.nn.Module):
    """Frozen open_clip ViT-B/32 text tower at context length 8; always in eval mode."""

    def __init__(
        self,
        weights: str = "auto",
        seed: int = 0,
        quick_gelu: bool | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.quick_gelu = True if quick_gelu is None else quick_gelu
        self.tokenizer = tokenizer()
        self.tower, self.kind, self.source = _build_tower(weights, seed, self.quick_gelu)
        self.seed = seed
        self.tower.requires_grad_(False)
        self.to(device)
        self.train(False)
        self._fingerprint: list[float] | None = None
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()

    def train(self, mode: bool = True) -> TextEncoder:
        """Ignore ``mode``: the encoder is frozen and stays in eval mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.tower.positional_embedding.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(tokens [B, 8, 512], pooled [B, 512])`` in float32 on the encoder's device.

        ``tokens`` are the per-token states after ``ln_final`` and before the projection;
        ``pooled`` is the projected state at the end-of-text token. Prompts longer than 8
        tokens are truncated (see ``data.tokens.truncated_prompt``).
        """
        token_ids = self.tokenizer(prompts).to(self.device)
        pooled, tokens = self.tower(token_ids)
        return tokens, pooled

    def tokens_of(self, prompts: list[str]) -> torch.Tensor:
        """``encode(prompts)[0]``, remembering the last PROMPT_CACHE_SIZE prompts' tokens.

        The tower is frozen, so a prompt's tokens never change, and they are the dearest part of a
        few-step sketch: one prompt's pass reads all 38 M weights (150 MB) for 8 tokens, about 26 ms on
        one core, as long as 2 passes of the fast UNet. The page asks again for the same prompt as one
        types (a word half typed is dropped as unknown by the random tower's reader) or changes the seed.
        The prompts not yet known are encoded together in their order, so a first call returns exactly
        what ``encode`` does.
        """
        with self._cache_lock:
            missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._cache]
            if missing:
                self._cache.update((prompt, row.clone()) for prompt, row in zip(missing, self.encode(missing)[0]))
            for prompt in prompts:
                self._cache.move_to_end(prompt)
            while len(self._cache) > PROMPT_CACHE_SIZE:
                self._cache.popitem(last=False)
            return torch.stack([self._cache[prompt] for prompt in prompts])

    @property
    def record(self) -> dict:
        """Provenance of the weights, in plain Python types (safe for ``weights_only`` loads)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return {
            "weights": self.kind,
            "source": self.source,
            "quick_gelu": self.quick_gelu,
            "context_length": CONTEXT_LENGTH,
            "fingerprint": list(self._fingerprint),
            "built_with": built_with(),
            **({"seed": self.seed} if self.kind == "random" else {}),  # what rebuilds it
        }

    def _compute_fingerprint(self) -> list[float]:
        """Sixteen numbers summarising the output on the digit prompts.

        Ten are the unit-normalised pooled embeddings of "0".."9" projected on a fixed
        random direction (scaled to order 1); six are overall statistics of pooled and
        token states. Computed at full fp32 matmul precision so that TF32 settings made
        elsewhere do not move it.
        """
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            tokens, pooled = self.encode(PROBE_PROMPTS)
        finally:
            torch.set_float32_matmul_precision(precision)
        tokens, pooled = tokens.double().cpu(), pooled.double().cpu()
        direction = torch.randn(pooled.shape[1], generator=torch.Generator().manual_seed(0))
        direction = direction.double() / direction.norm()
        unit = torch.nn.functional.normalize(pooled, dim=-1)
        cosine = unit @ unit.T
        off_diagonal = cosine[~torch.eye(len(PROBE_PROMPTS), dtype=torch.bool)]
        numbers = (unit @ direction * math.sqrt(pooled.shape[1])).tolist() + [
            pooled.norm(dim=-1).mean().item(),
            off_diagonal.mean().item(),
            tokens.mean().item(),
            tokens.std().item(),
            (tokens.mean(dim=(0, 1)) @ direction).item(),
            (pooled.mean(dim=0) @ direction).item(),
        ]
        return [float(f"{x:.{FINGERPRINT_SIGNIFICANT_DIGITS}g}") for x in numbers]


def build_text_encoder(
    weights: str = "auto",
    seed: int = 0,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
) -> TextEncoder:
    """Build the frozen text encoder; see the module docstring for ``weights``."""
    return TextEncoder(weights=weights, seed=seed, quick_gelu=quick_gelu, device=device)


def check_compatible(saved_record: dict, encoder_record: dict) -> None:
    """Raise ``UserError`` unless the checkpoint's text encoder matches the one loaded now.

    The weight kind and the output fingerprint decide; the file path does not, so a
    weights file that moved still matches while different weights never do.
    """
    same_kind = saved_record.get("weights") == encoder_record.get("weights")
    if same_kind and _fingerprints_match(saved_record.get("fingerprint", []), encoder_record.get("fingerprint", [])):
        return
    same_seed = saved_record.get("source") == encoder_record.get("source")
    if same_kind and same_seed and saved_record.get("weights") == "random":
        raise UserError(_rebuilt_differently(saved_record))
    raise UserError(
        f"checkpoint was trained with text encoder {_describe(saved_record)} but "
        f"{_describe(encoder_record)} is loaded now; rerun with {_flag_hint(saved_record)}"
    )


def built_with() -> dict[str, str]:
    """The library versions that decide a seeded random tower's values."""
    import open_clip  # here and below, not at the top: `import text2digit` then costs no open_clip (~2.7 s)

    return {"torch": torch.__version__.split("+")[0], "open_clip": open_clip.__version__}


def _rebuilt_differently(saved_record: dict) -> str:
    """Why the same seed gave another random text encoder here, in one line."""
    saved, here = saved_record.get("built_with"), built_with()
    now = _versions(here)
    if saved is None:
        cause = f"its record does not say which torch and open_clip built it; this is {now}"
    elif saved != here:
        cause = f"it was built with {_versions(saved)}, this is {now}"
    else:
        cause = f"with the same {now}, so the machine's arithmetic differs"
    return (
        f"the seeded random text encoder ({saved_record.get('source')}) comes out differently here than when "
        f"the checkpoint was trained ({cause}); install the versions pyproject.toml pins (pip install -e .)"
    )


def _versions(libraries: dict[str, str]) -> str:
    return " and ".join(f"{name} {version}" for name, version in libraries.items())


def _fingerprints_match(saved: list[float], current: list[float]) -> bool:
    return len(saved) == len(current) and all(
        math.isclose(a, b, rel_tol=FINGERPRINT_REL_TOL, abs_tol=FINGERPRINT_ABS_TOL) for a, b in zip(saved, current)
    )


def _describe(record: dict) -> str:
    return f"'{record.get('weights')}' ({record.get('source')})"


def _flag_hint(record: dict) -> str:
    kind, source = record.get("weights"), record.get("source")
    if kind == "file":
        return f"--text_encoder {source}"
    if kind == "random":
        return f"--text_encoder random with {source}"
    return f"--text_encoder {kind}"


def _build_tower(weights: str, seed: int, quick_gelu: bool) -> tuple[torch.nn.Module, str, str]:
    """Return ``(tower, kind, source)`` for the requested weights."""
    if weights == "random":
        return _random_tower(seed, quick_gelu), "random", f"seed={seed}"
    if weights in ("openai", "auto"):
        try:
            path = _openai_weights_file()
        except _WeightsUnavailable as err:
            if weights == "openai":
                message = f"OpenAI CLIP weights are unavailable ({err}); {PREFETCH_HINT}"
                raise UserError(message) from None
            _warn_fallback(str(err))
            return _random_tower(seed, quick_gelu), "random", f"seed={seed}"
        return _loaded_tower(path, quick_gelu), "openai", f"hf-hub:{OPENAI_HUB_REPO}"
    path = Path(weights).expanduser().resolve()
    return _loaded_tower(path, quick_gelu), "file", str(path)


def _random_tower(seed: int, quick_gelu: bool) -> torch.nn.Module:
    """The ViT-B-32 text tower from open_clip's own config, built for 8 tokens.

    Initialised on the CPU from ``seed`` without touching the caller's global RNG state.
    """
    import open_clip
    from open_clip.model import _build_text_tower

    config = open_clip.get_model_config(MODEL_NAME)
    text_cfg = dict(config["text_cfg"], context_length=CONTEXT_LENGTH, output_tokens=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_text_tower(config["embed_dim"], text_cfg, quick_gelu=quick_gelu)


def _loaded_tower(path: Path, quick_gelu: bool) -> torch.nn.Module:
    state_dict = _text_state_dict(_read_state_dict(path))
    tower = _random_tower(0, quick_gelu)  # every parameter is overwritten below
    try:
        tower.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"{path} is not a CLIP ViT-B/32 text state dict: {detail}") from None
    return tower


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise UserError(
            f"text encoder weights file not found: {path} (expected auto, openai, random or a weights file path)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read means a corrupt or foreign file
        detail = " ".join(str(err).split())[:200]
        raise UserError(f"cannot read text encoder weights {path}: {detail}") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # open_clip training checkpoints wrap it
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise UserError(f"{path} does not hold a state dict")
    return checkpoint


def _text_state_dict(state_dict: dict) -> dict:
    """Keep the text tower's keys and cut the positional embedding to 8 rows."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    text = {
        k: v for k, v in state_dict.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")
    }
    if "positional_embedding" in text:
        text["positional_embedding"] = text["positional_embedding"][:CONTEXT_LENGTH]
    return text


def _openai_weights_file() -> Path:
    """Local path of the OpenAI weights, downloading only when the hub answers at once.

    Order: the local Hugging Face cache (no network); then, unless HF_HUB_OFFLINE is set,
    an HTTPS probe bounded by PROBE_TIMEOUT_S; only then the download. A plain
    ``pretrained='openai'`` would otherwise retry for about 47 s on a machine without a route.
    """
    cached = _cached_hub_file()
    if cached is not None:
        return cached
    if _env_flag("HF_HUB_OFFLINE"):
        raise _WeightsUnavailable("not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not _hub_answers(endpoint, PROBE_TIMEOUT_S):
        raise _WeightsUnavailable(
            f"not in the local Hugging Face cache and {endpoint} did not answer within {PROBE_TIMEOUT_S:g} s"
        )
    return _download_hub_file()


def _cached_hub_file() -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in OPENAI_HUB_FILES:
        found = try_to_load_from_cache(OPENAI_HUB_REPO, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _download_hub_file() -> Path:
    from huggingface_hub import hf_hub_download

    errors = []
    for filename in OPENAI_HUB_FILES:
        try:
            return Path(hf_hub_download(OPENAI_HUB_REPO, filename, library_name="open_clip"))
        except Exception as err:  # the hub's failures have many types; report them all
            errors.append(f"{filename}: {' '.join(str(err).split())[:150]}")
    raise _WeightsUnavailable("download failed: " + "; ".join(errors))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_answers(endpoint: str, timeout: float) -> bool:
    """Whether ``endpoint`` answers an HTTPS request within ``timeout`` seconds in total.

    A real request (through any proxy set in the environment) rather than a bare TCP
    connect, because sandboxes may accept connections they never serve. It runs in a
    daemon thread because name resolution ignores socket timeouts.
    """
    answered: list[bool] = []

    def ask() -> None:
        try:
            request = urllib.request.Request(endpoint, method="HEAD")
            urllib.request.urlopen(request, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # the server replied, if only with an error status
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _warn_fallback(reason: str) -> None:
    message = (
        f"OpenAI CLIP weights are unavailable ({reason}); using a RANDOMLY INITIALISED text "
        f'encoder instead. It separates prompts but knows no meaning ("7" and "seven" are '
        f"unrelated to it). To use the real weights: {PREFETCH_HINT}."
    )
    bar = "!" * 78
    print(f"\n{bar}\nWARNING: {message}\n{bar}\n", file=sys.stderr)
    warnings.warn(message, UserWarning, stacklevel=4)
