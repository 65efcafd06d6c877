"""sample.py's sampling flags, in process, on an untrained tiny checkpoint (the outputs are noise;
what is checked is where they go and what reaches the sampler)."""

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import text2digit
from runtime.errors import UserError


def run_sample(monkeypatch, *args):
    monkeypatch.setattr("sys.argv", ["sample.py", *map(str, args)])
    sample.main()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--sampler", "dpmpp_2m", "--eta", "0.5"], "--eta only applies to --sampler ddim"),
        (["--sampler", "ddim", "--eta", "-1"], "--eta must be >= 0"),
        (["--out", "grid.jpg"], "--out must end in .png"),
        (["--threshold", "static"], "--threshold"),
        (["--spacing", "uniform"], "--spacing"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(UserError, match=message):
        sample.parse_args(["--prompt", "3", *flags])


def test_every_output_and_the_negative_prompt(checkpoint, tmp_path, monkeypatch, capsys):
    calls = []
    real_generate = text2digit.generate
    monkeypatch.setattr(text2digit, "generate", lambda *a, **k: calls.append((a, k)) or real_generate(*a, **k))
    out = tmp_path / "grid.png"
    common = [
        "--checkpoint",
        checkpoint,
        "--prompt",
        "3",
        "--prompt",
        "blurry 7",
        "--num_samples",
        3,
        "--steps",
        4,
        "--out",
        out,
        "--sampler",
        "ddim",
        "--eta",
        0.5,
        "--threshold",
        "dynamic",
        "--batch_size",
        4,
    ]
    run_sample(monkeypatch, *common, "--negative_prompt", "blurry 7", "--save_individual", "--trajectory")

    folder, gif = tmp_path / "grid", tmp_path / "grid.gif"
    assert capsys.readouterr().out.split() == [str(out), str(folder), str(gif)]
    (_, _, cond, uncond, options), kwargs = calls[0]
    assert torch.equal(uncond[0], cond[-1])  # the negative prompt's tokens, as "blurry 7"'s own row has them
    assert (options.eta, options.threshold, options.spacing, kwargs["seed"]) == (0.5, "dynamic", "trailing", 0)

    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"000{i}_3.png" for i in range(3)] + [f"000{i}_blurry-7.png" for i in range(3, 6)]
    grid = np.asarray(Image.open(out))
    tile = np.asarray(Image.open(folder / "0004_blurry-7.png"))  # row 1, column 1 of the grid, drawn at 2x
    assert np.array_equal(grid[56:112, -112:-56][::2, ::2], tile)
    with Image.open(gif) as animation:
        assert animation.n_frames == 4 + 1  # every step, then the result

    before = {p: p.read_bytes() for p in [out, gif, *folder.iterdir()]}
    for extra in ([], ["--save_individual"], ["--trajectory"]):  # each output alone refuses to be overwritten
        if extra:
            out.rename(tmp_path / "moved.png")
        with pytest.raises(UserError, match="exists; pass --overwrite"):
            run_sample(monkeypatch, *common, *extra)
        if extra:
            (tmp_path / "moved.png").rename(out)
    assert len(calls) == 1 and {p: p.read_bytes() for p in before} == before


def test_without_a_run_the_shipped_model_samples_but_a_named_empty_folder_is_an_error(tmp_path, monkeypatch, capsys):
    """No --output_dir and no run in the default folder: the shipped model, said so. A folder that is
    named but holds no checkpoint is a mistake (a typo, a run not started) and an error."""
    monkeypatch.chdir(tmp_path)  # no outputs/mnist here
    run_sample(monkeypatch, "--prompt", "7", "--num_samples", "2", "--steps", "2", "--out", tmp_path / "grid.png")
    assert "using the shipped model models/pretrained/fast.pt" in capsys.readouterr().err
    assert Image.open(tmp_path / "grid.png").size[1] > 28
    with pytest.raises(UserError, match="no checkpoint in .*empty/checkpoints; train first"):
        run_sample(monkeypatch, "--prompt", "7", "--output_dir", tmp_path / "empty", "--out", tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()
