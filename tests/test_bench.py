"""The benchmarks' interface, run for real at toy sizes (the figures they print are not checked:
speed belongs in the benchmark's output, not in tests)."""

import json
import os
import re
import subprocess
import sys

import pytest

from bench.root_cause import CAUSES
from ddpm import SAMPLERS
from tests.helpers import ENV, ROOT

pytestmark = pytest.mark.slow  # real processes (see pyproject.toml's markers)


def run(module: str, *args) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_benchmark_writes_the_documented_json(tmp_path):
    out = tmp_path / "bench.json"
    run(
        "bench.benchmark",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--skip",
        "peer",
        "--batch_size",
        4,
        "--repeats",
        1,
        "--warmup",
        1,
        "--sample_images",
        2,
        "--sample_steps",
        2,
        "--epoch_images",
        256,  # two steps of the default config's 128: a warm-up log window and a steady one
        "--json",
        out,
    )
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["batch_size"] == 4 and report["bf16"] is False
    assert report["ours"]["train_img_per_s"] > 0 and report["ours"]["params_m"] > 2
    assert "skipped" in report["peer"]
    assert [(row["config"], row["sampler"]) for row in report["sampling"]] == [
        (config, sampler) for config in ("mnist.yaml", "cpu.yaml") for sampler in SAMPLERS
    ]
    assert all(row["images"] == 2 and row["steps"] == 2 and row["seconds"] > 0 for row in report["sampling"])
    epoch = report["epoch"]
    assert epoch["images"] == 256 and epoch["startup_s"] > 0 and epoch["epoch_s"] > epoch["loop_s"] > 0
    assert epoch["how"] == "extrapolated: 2 steps measured (1 warm-up), 468 in an epoch"


def test_sampler_benchmark_prints_a_row_per_sampler_and_step_count(checkpoint):
    table = run(
        "bench.samplers",
        "--checkpoint",
        checkpoint,
        "--samplers",
        "ddim,dpmpp_2m",
        "--steps",
        "1,3",
        "--num_images",
        10,
        "--batch_size",
        4,
        "--precision",
        "fp32",
    )
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| d")]
    assert [(r[0].strip(), int(r[1])) for r in rows] == [("ddim", 1), ("ddim", 3), ("dpmpp_2m", 1), ("dpmpp_2m", 3)]
    for row in rows:
        assert float(row[2]) > 0 and row[4].strip().endswith("%")  # s / 100 images; the judge's accuracy


def test_root_cause_samples_each_row_from_the_same_seeds_and_writes_its_table(tiny_run, tmp_path):
    checkpoint = sorted((tiny_run / "checkpoints").glob("checkpoint_epoch_*.pt"))[-1]
    out = tmp_path / "rows.json"
    flags = ("--checkpoint", checkpoint, "--per_digit", 2, "--precision", "fp32", "--out", out)
    stdout = run("bench.root_cause", *flags, "--rows", "0,9", "--models", checkpoint)
    rows = json.loads(out.read_text())
    assert [r["label"] for r in rows[:2]] == [CAUSES[0][0], "raw weights (no EMA)"] and "patch 1" in rows[2]["label"]
    assert all(r["samples"] == 20 and 0 <= r["speck_rate"] <= 1 and r["fmd_floor"] > 0 for r in rows)
    assert rows[2]["fmd"] == pytest.approx(rows[0]["fmd"])  # the same model at the base: the same images
    assert "| raw weights (no EMA) |" in stdout
    run("bench.root_cause", *flags, "--table", "guidance", "--rows", "1")
    assert json.loads(out.read_text())[0]["label"].startswith("APG eta 0")


def test_serve_benchmark_times_the_page_and_the_fast_model_as_you_type():
    table = run("bench.serve", "--steps", 2, "--num_samples", 2, "--requests", 2, "--clients", 2)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "requests" not in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "1 client",
        "2 clients at once",
        "as you type: the fast model, 2 steps",
    ]
    assert re.search(r"keystroke to a sketched grid, p50: \d+\.\d{3} s \(10 ms pause.*; 37 keystrokes", table), table


def test_time_to_quality_scores_every_epoch_of_a_run_guided_and_unguided_once(tiny_run):
    stdout = run("bench.time_to_quality", "--run", tiny_run, "--eval_samples", 1, "--precision", "fp32")
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(row[0]) for row in rows] == [1, 2]
    seconds = [json.loads(line)["epoch_seconds"] for line in (tiny_run / "metrics.jsonl").read_text().splitlines()
               if "epoch_seconds" in line]  # fmt: skip
    assert [row[1].strip() for row in rows] == [f"{sum(seconds[:1]) / 60:.1f}", f"{sum(seconds) / 60:.1f}"]
    cached = json.loads((tiny_run / "checkpoints" / "checkpoint_epoch_0002_ttq1_fp32.json").read_text())
    assert set(cached) == {"guided", "unguided"} and all(scores["samples"] == 10 for scores in cached.values())
    assert rows[1][2].strip() == f"{cached['unguided']['accuracy']:.1%}"  # the unguided column is guidance 1's
    assert rows[1][6].strip() == f"{cached['guided']['accuracy']:.1%}"
    assert run("bench.time_to_quality", "--run", tiny_run, "--eval_samples", 1, "--precision", "fp32") == stdout
