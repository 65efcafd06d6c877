"""Tests of the frozen text encoder against independent references.

The loading path for real weights is checked with a randomly initialised full open_clip
CLIP model saved to disk: its own 77-token forward pass is the reference.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import torch

import models.text_encoder
from data.tokens import prompt_tokens, truncated_prompt
from models.text_encoder import OPENAI_HUB_REPO, TextEncoder, build_text_encoder, check_compatible
from runtime.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "0",
    "seven",
    "a handwritten digit three",
    "a very very long prompt that must be cut short",
]
EOT_TOKEN = 49407


@pytest.fixture(scope="module")
def random_encoder() -> TextEncoder:
    return TextEncoder(weights="random", seed=0)


@pytest.fixture(scope="module")
def full_clip() -> torch.nn.Module:
    """A full ViT-B-32-quickgelu CLIP (vision tower too) at context 77, random weights."""
    torch.manual_seed(1234)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    return model.eval()


@pytest.fixture(scope="module")
def full_clip_file(full_clip, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "clip_full.pt"
    torch.save(full_clip.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def file_encoder(full_clip_file) -> TextEncoder:
    return TextEncoder(weights=str(full_clip_file))


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """Point the Hugging Face cache at an empty folder so a cached download cannot leak in."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    return tmp_path


@torch.no_grad()
def reference_outputs(model: torch.nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states and pooled embedding from the full 77-context model.

    The 8-token ids (truncated as the encoder sees them) are zero-padded to 77; causal
    attention makes the first 8 positions independent of the padding. The pooled
    embedding is taken at the end-of-text position found here, independently of open_clip.
    """
    ids8 = open_clip.get_tokenizer("ViT-B-32", context_length=8)(prompts)
    ids = torch.zeros(len(prompts), 77, dtype=torch.long)
    ids[:, :8] = ids8
    x = model.token_embedding(ids) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    tokens = x[:, :8]
    eot = (ids8 == EOT_TOKEN).int().argmax(dim=1)
    pooled = tokens[torch.arange(len(prompts)), eot] @ model.text_projection
    assert torch.allclose(pooled, model.encode_text(ids), atol=1e-5)
    return tokens, pooled


def assert_matches_reference(encoder: TextEncoder, model: torch.nn.Module) -> None:
    tokens, pooled = encoder.encode(PROMPTS)
    ref_tokens, ref_pooled = reference_outputs(model, PROMPTS)
    torch.testing.assert_close(tokens, ref_tokens, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=2e-5, rtol=1e-5)


def test_shapes_dtypes_frozen_eval(random_encoder):
    tokens, pooled = random_encoder.encode(PROMPTS)
    assert tokens.shape == (len(PROMPTS), 8, 512) and tokens.dtype == torch.float32
    assert pooled.shape == (len(PROMPTS), 512) and pooled.dtype == torch.float32
    assert not tokens.requires_grad and not pooled.requires_grad
    assert not any(p.requires_grad for p in random_encoder.parameters())
    random_encoder.train()
    assert not any(m.training for m in random_encoder.modules())


def test_tokens_of_remembers_recent_prompts_and_forgets_the_oldest(monkeypatch):
    """A first call returns exactly what encode does; prompts met again cost no pass of the tower; the
    cache keeps the PROMPT_CACHE_SIZE prompts used last."""
    encoder = TextEncoder(weights="random", seed=0)
    passes = []
    encoder.tower.register_forward_hook(lambda _, args, __: passes.append(len(args[0])))
    monkeypatch.setattr(models.text_encoder, "PROMPT_CACHE_SIZE", 3)
    first = encoder.tokens_of(["7", "seven", "7"])
    assert torch.equal(first, encoder.encode(["7", "seven", "7"])[0]) and passes == [2, 3]
    passes.clear()
    assert torch.equal(encoder.tokens_of(["seven", "7"]), first[[1, 0]]) and passes == []
    encoder.tokens_of(["3"])  # 3, then 7 and seven: all three kept
    encoder.tokens_of(["8", "seven"])  # the least recently used, 7, goes
    assert passes == [1, 1]
    assert torch.equal(encoder.tokens_of(["3", "seven", "8"])[1], first[1]) and passes == [1, 1]
    encoder.tokens_of(["7"])
    assert passes == [1, 1, 1]


@pytest.mark.slow
def test_random_is_seeded_across_processes(random_encoder, tmp_path):
    out = tmp_path / "outputs.pt"
    code = (
        "import torch; from models.text_encoder import TextEncoder; "
        f"torch.save(TextEncoder(weights='random', seed=0).encode({PROMPTS!r}), {str(out)!r})"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)
    other_tokens, other_pooled = torch.load(out, weights_only=True)
    tokens, pooled = random_encoder.encode(PROMPTS)
    assert torch.equal(tokens, other_tokens) and torch.equal(pooled, other_pooled)


def test_random_record_and_different_seed(random_encoder):
    record = random_encoder.record
    assert record["weights"] == "random" and record["source"] == "seed=0"
    assert record["quick_gelu"] is True and record["context_length"] == 8
    assert len(record["fingerprint"]) == 16
    assert all(type(x) is float for x in record["fingerprint"])
    other = build_text_encoder(weights="random", seed=1).record
    assert other["fingerprint"] != record["fingerprint"]
    with pytest.raises(UserError, match="seed=0.*seed=1.*--text_encoder random"):
        check_compatible(record, other)


def test_full_clip_file_matches_full_model(file_encoder, full_clip, full_clip_file):
    assert_matches_reference(file_encoder, full_clip)
    record = file_encoder.record
    assert record["weights"] == "file" and record["source"] == str(full_clip_file.resolve())


def test_text_only_state_dict_loads(full_clip, tmp_path):
    text_only = {
        k: v
        for k, v in full_clip.state_dict().items()
        if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")
    }
    path = tmp_path / "text_only.pt"
    torch.save(text_only, path)
    assert_matches_reference(TextEncoder(weights=str(path)), full_clip)


def test_auto_uses_cached_openai_weights(full_clip, full_clip_file, empty_hub_cache, monkeypatch):
    """A Hugging Face cache laid out as a prefetch leaves it is found with the hub unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_dir = empty_hub_cache / ("models--" + OPENAI_HUB_REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    (snapshot / "open_clip_pytorch_model.bin").symlink_to(full_clip_file)
    encoder = TextEncoder(weights="auto")
    assert encoder.record["weights"] == "openai"
    assert encoder.record["source"] == f"hf-hub:{OPENAI_HUB_REPO}"
    assert_matches_reference(encoder, full_clip)


def test_auto_falls_back_to_random_offline(empty_hub_cache, monkeypatch, random_encoder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        encoder = TextEncoder(weights="auto", seed=0)
    assert time.monotonic() - start < 10
    assert encoder.record["weights"] == "random"
    check_compatible(random_encoder.record, encoder.record)


def test_explicit_openai_offline_raises_fast(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError, match="prefetch") as err:
        TextEncoder(weights="openai")
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(UserError, match="missing.pt"):
        TextEncoder(weights=str(missing))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt.pt"):
        TextEncoder(weights=str(corrupt))


def test_check_compatible(random_encoder, file_encoder):
    random_record, file_record = random_encoder.record, file_encoder.record
    check_compatible(random_record, dict(random_record))
    with pytest.raises(UserError) as err:
        check_compatible(random_record, file_record)
    message = str(err.value)
    assert "'random' (seed=0)" in message and file_record["source"] in message
    assert "--text_encoder random" in message
    moved = dict(file_record, source="/elsewhere/clip_full.pt")
    check_compatible(file_record, moved)
    tampered = dict(file_record, fingerprint=[x * 1.01 + 0.01 for x in file_record["fingerprint"]])
    with pytest.raises(UserError, match="--text_encoder"):
        check_compatible(tampered, file_record)
    noisy = dict(file_record, fingerprint=[x * (1 + 1e-6) for x in file_record["fingerprint"]])
    check_compatible(noisy, file_record)


def test_a_random_encoder_built_differently_says_which_versions(random_encoder):
    """Same seed, other output: the one line names the torch and open_clip versions on both sides."""
    record = random_encoder.record
    assert record["built_with"] == {"torch": torch.__version__.split("+")[0], "open_clip": open_clip.__version__}
    moved = [x + 0.5 for x in record["fingerprint"]]
    older = dict(record, fingerprint=moved, built_with={"torch": "2.4.0", "open_clip": "3.0.0"})
    with pytest.raises(UserError, match=r"built with torch 2\.4\.0 and open_clip 3\.0\.0, this is torch .*pyproject"):
        check_compatible(older, record)
    unrecorded = {k: v for k, v in older.items() if k != "built_with"}
    with pytest.raises(UserError, match="does not say which torch and open_clip built it"):
        check_compatible(unrecorded, record)
    with pytest.raises(UserError, match="machine's arithmetic differs"):
        check_compatible(dict(record, fingerprint=moved), record)


def test_token_counts_and_truncation_are_what_the_encoder_reads(random_encoder):
    """Counts against the 77-token tokenizer (nothing cut); a long prompt encodes exactly as its truncation."""
    wide = open_clip.get_tokenizer("ViT-B-32")
    for prompt in PROMPTS:
        assert prompt_tokens(prompt) == int((wide([prompt])[0] != 0).sum()), prompt
    assert prompt_tokens("7") == 3
    assert truncated_prompt("a handwritten digit three") is None
    kept = truncated_prompt(PROMPTS[-1])
    assert kept == "a very very long prompt that"  # the first 6 of its 10 BPE tokens
    long_states, _ = random_encoder.encode([PROMPTS[-1]])
    kept_states, _ = random_encoder.encode([kept])
    assert torch.equal(long_states, kept_states)


def test_unreachable_hub_is_decided_fast(empty_hub_cache, monkeypatch):
    """Without HF_HUB_OFFLINE the hub is probed once, briefly, before any download."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(UserError, match="did not answer"):
        TextEncoder(weights="openai")
    assert time.monotonic() - start < 10
