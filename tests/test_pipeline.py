"""The Python pipeline and the shipped model: the README's lines run as written, requests are checked in
one place with typed errors, the shipped model draws what it is asked for, and the recipe that made
it is deterministic."""

import hashlib
import re

import numpy as np
import pytest
import torch
from PIL import Image

from data.captions import VOCABULARIES
from data.prompts import Reader
from evaluation.judge import judge_images, load_judge
from models.checkpoint import PRETRAINED_DIR, SHIPPED, TEACHER, shipped_record
from models.pretrained import RECIPES
from runtime.errors import UserError
from tests.helpers import ROOT, state_bytes, train_tiny, write_untrained_checkpoint
from text2digit import EmptyPrompt, InvalidRequest, NotOneDigit, OutOfRange, PromptTooLong, Request, Text2Digit


@pytest.fixture(scope="module")
def pipe() -> Text2Digit:
    return Text2Digit.from_checkpoint()


def test_the_readme_example_runs_as_written(pipe):
    block = re.search(r"## Python pipeline\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    digits, thinner = scope["digits"], scope["thinner"]
    assert digits.shape == (2, 8, 28, 28) and digits.dtype == np.uint8
    assert len(thinner) == 1 and len(thinner[0]) == 8 and isinstance(thinner[0][0], Image.Image)


def test_the_shipped_model_draws_the_prompted_digits(pipe):
    images = pipe([str(d) for d in range(10)], num_samples=10, seed=0)
    logits, _ = judge_images(load_judge(), images.reshape(-1, 28, 28))
    accuracy = (logits.argmax(1) == np.repeat(np.arange(10), 10)).mean()
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_shipped_file_is_what_its_record_says(name):
    """The default model (the distilled student), its teacher, the teacher's guide and the quick start's record,
    each small (fp16 EMA weights)."""
    path = PRETRAINED_DIR / f"{name}.pt"
    record = shipped_record(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert record["command"] == RECIPES[name] and record["vocabulary"]["name"] == "free-text-2"
    assert path.stat().st_size < 8 * 2**20
    assert (SHIPPED, TEACHER) == (PRETRAINED_DIR / "fast.pt", PRETRAINED_DIR / "mnist.pt")


def test_the_shipped_guide_guides_the_teacher():
    """guide.pt is a model of the same text features and schedule as the teacher (else loading it as a guide
    fails), and autoguided sevens are sevens."""
    pipe = Text2Digit.from_checkpoint(TEACHER, guide=PRETRAINED_DIR / "guide.pt")
    assert pipe.guide is not None and pipe.guide.epoch == 1
    images = pipe("7", num_samples=10, seed=0)[0]
    logits, _ = judge_images(load_judge(), images)
    assert (logits.argmax(1) == 7).mean() >= 0.9


def test_same_seed_same_digits_and_a_callback_per_step(pipe):
    """The shipped student at its default steps, 4, and the same for its teacher at 6 steps."""
    for model, options in ((pipe, {}), (Text2Digit.from_checkpoint(TEACHER), {"steps": 6})):
        steps: list[tuple] = []
        a = model(
            "3",
            num_samples=4,
            seed=1,
            callback=lambda i, t, x_t, x0, seen=steps: seen.append((i, t, x0.shape)),
            **options,
        )
        b = model("3", num_samples=4, seed=1, **options)
        assert np.array_equal(a, b) and not np.array_equal(a, model("3", num_samples=4, seed=2, **options))
        assert [(i, shape) for i, _, shape in steps] == [(i, (4, 28, 28)) for i in range(options.get("steps", 4))]
        shared = model(["3", "a thick 3"], num_samples=2, seed=1, shared_noise=True, **options)
        assert np.array_equal(shared[0], a[0, :2])  # the first prompt's images are unchanged


def test_words_the_model_never_saw_are_left_out_for_the_random_text_tower_unless_kept(pipe):
    """The shipped model's tower is the seeded random one: "a faint 7" is encoded as "a 7", bitwise; kept, the
    unknown word changes what the encoder gives, and so the digits."""
    settings = {"num_samples": 2, "steps": 1, "seed": 5}
    assert pipe.model.encoder.kind == "random" and "faint" not in pipe.model.vocabulary.known_words
    read = pipe("a faint 7", **settings)
    assert np.array_equal(read, pipe("a 7", **settings)) and np.array_equal(
        read, pipe("a 7", **settings, unknown_words="drop")
    )
    assert not np.array_equal(read, pipe("a faint 7", **settings, unknown_words="keep"))


@pytest.mark.parametrize(
    "call,error,field",
    [
        (lambda p: p("  "), EmptyPrompt, "prompts"),
        (lambda p: p("a thick wide handwritten 7 slanted left"), PromptTooLong, "prompts"),
        (lambda p: p("7", negative_prompt="a thick wide handwritten 7 slanted left"), PromptTooLong, "negative_prompt"),
        (lambda p: p("3 or 8"), NotOneDigit, "prompts"),
        (lambda p: p("7", num_samples=0), OutOfRange, "num_samples"),
        (lambda p: p("7", steps=1001), OutOfRange, "steps"),
        (lambda p: p("7", guidance_scale=-1.0), OutOfRange, "guidance_scale"),
        (lambda p: p("7", seed=-1), OutOfRange, "seed"),
        (lambda p: p("7", sampler="euler"), OutOfRange, "sampler"),
        (lambda p: p("7", eta=0.5), OutOfRange, "eta"),
        (lambda p: p("7", guidance_interval=(3.0, 1.0)), OutOfRange, "guidance_interval"),
        (lambda p: p("7", guidance_rescale=2.0), OutOfRange, "guidance_rescale"),
        (lambda p: p(["7", "1"], num_samples=2049), OutOfRange, "num_samples"),
    ],
)
def test_bad_requests_raise_typed_errors_naming_the_input(pipe, call, error, field):
    with pytest.raises(error) as raised:
        call(pipe)
    assert isinstance(raised.value, InvalidRequest) and raised.value.field == field
    assert "\n" not in str(raised.value)
    assert raised.value.render(lambda name: f"--{name}").count("--") >= 1


def test_a_truncated_prompt_is_allowed_only_when_asked():
    request = Request(("a thick wide handwritten 7 slanted left",), allow_truncation=True)
    assert request.validate(reader=Reader(VOCABULARIES["styles"].known_words)) == [
        "prompt 'a thick wide handwritten 7 slanted left' was truncated to 8 tokens: 'a thick wide handwritten 7 slan'"
    ]


@pytest.mark.slow
def test_the_recipe_is_deterministic(tiny_run, tmp_path):
    """The record's command on the tiny config, run again beside the session's tiny_run (both helpers.TINY_RUN, which
    adds the judge's scores after each epoch): bitwise the same weights. What makes the shipped record reproducible on
    the same kind of machine."""
    train_tiny(tmp_path)
    a, b = (
        torch.load(run / "checkpoints" / "checkpoint_epoch_0002.pt", weights_only=True) for run in (tiny_run, tmp_path)
    )
    assert state_bytes(a["ema"]) == state_bytes(b["ema"]) and state_bytes(a["model"]) == state_bytes(b["model"])


def test_autoguidance_by_the_model_itself_is_the_unguided_model_and_a_foreign_guide_is_refused(tmp_path):
    """eps_guide + s * (eps - eps_guide) with the model as its own guide is eps at any scale: the images of
    guidance scale 1, bitwise. A guide of another noise schedule is refused in one line."""
    path = write_untrained_checkpoint(tmp_path / "c.pt")
    self_guided = Text2Digit.from_checkpoint(path, device="cpu", guide=path)
    unguided = Text2Digit.from_checkpoint(path, device="cpu")
    request = dict(num_samples=2, steps=3, seed=4)
    assert np.array_equal(self_guided("7", guidance_scale=3.0, **request), unguided("7", guidance_scale=1.0, **request))
    # with a negative prompt the guide reads it: the model guiding itself is then classifier-free guidance
    # from the negative prompt (two calls instead of one batched call: within a grey level)
    negative = dict(request, guidance_scale=3.0, negative_prompt="thick")
    difference = self_guided("7", **negative).astype(int) - unguided("7", **negative)
    assert np.abs(difference).max() <= 1
    other = write_untrained_checkpoint(tmp_path / "other.pt", num_train_timesteps=500)
    with pytest.raises(UserError, match="another text encoder or noise schedule") as refused:
        Text2Digit.from_checkpoint(path, device="cpu", guide=other)
    assert "\n" not in str(refused.value)
