"""What each caption vocabulary costs training: train.py's own step with each, interleaved step by step in
one process, and the one-time encoding of its prompt table (cached afterwards). A benchmark, not a test.

    python -m bench.captions                          # configs/cpu.yaml, 60 timed steps per caption set
    python -m bench.captions --config configs/mnist.yaml --steps 20

Every side trains the same model from the same seed on the same images; only the caption draw (one
randint, or two uniform draws and a three-level gather) and the prompt table differ.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from data.captions import VOCABULARIES
from models.text_encoder import build_text_encoder
from runtime.errors import run_cli
from runtime.flags import CliParser, require_positive
from training.config import load_config_file
from training.data import load_training_data
from training.distributed import Processes
from training.loop import Trainer
from training.run_folder import RunFolder
from training.state import TrainingState
from training.stopping import StopSignals


def parse_args(argv: list[str]):
    p = CliParser(prog="python -m bench.captions", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/cpu.yaml"))
    p.add_argument("--steps", type=int, default=60, help="timed steps per caption set")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per caption set first")
    args = p.parse_args(argv)
    require_positive(args, ("steps",))
    return args


def trainer_for(kind: str, config: Path) -> Trainer:
    cfg = load_config_file(config)
    cfg.captions, cfg.device = kind, "cpu"
    procs = Processes(0, 1, torch.device("cpu"))
    data = load_training_data(cfg, procs)
    state = TrainingState(cfg, procs.device, 0, 1, data.steps_per_epoch(cfg.batch_size, 1), data.encoder_record)
    return Trainer(cfg, state, data, procs, RunFolder("unused", master=False), StopSignals(1, 1, procs.device))


def main() -> None:
    args = parse_args(sys.argv[1:])
    trainers = {kind: trainer_for(kind, args.config) for kind in VOCABULARIES}
    batch = trainers["digits"].cfg.batch_size
    batches = torch.arange(batch * (args.steps + args.warmup)).view(-1, batch) % len(trainers["digits"].data.images)
    times: dict[str, list[float]] = {kind: [] for kind in trainers}
    for i, indices in enumerate(batches):
        for kind, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step(indices).item()  # .item(): the step has finished
            if i >= args.warmup:
                times[kind].append(time.perf_counter() - start)
    cpu = trainers["digits"].describe()
    print(f"{args.config}, batch {batch}, {args.steps} interleaved steps each ({cpu})\n")
    print("| captions | prompt table rows | encoding them once, s | median step ms | img/s | step time / digits' |")
    print("|---|---:|---:|---:|---:|---:|")
    digits = statistics.median(times["digits"])
    for kind, trainer in trainers.items():
        median, prompts = statistics.median(times[kind]), trainer.data.captions.prompts
        print(
            f"| {kind} | {len(prompts)} | {encoding_seconds(trainer.cfg, prompts):.1f} | {median * 1e3:.1f} "
            f"| {batch / median:.0f} | {median / digits:.3f} |"
        )


def encoding_seconds(cfg, prompts: list[str]) -> float:
    """Seconds to encode ``prompts`` with the run's text encoder, as training does the first time."""
    encoder = build_text_encoder(cfg.text_encoder, seed=cfg.text_encoder_seed)
    start = time.perf_counter()
    encoder.encode(prompts)
    return time.perf_counter() - start


if __name__ == "__main__":
    run_cli(main)
