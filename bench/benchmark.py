"""Speed benchmark: our UNet against the seed's, sampling, and a real train.py epoch. A benchmark, not a test.

    python -m bench.benchmark                        # everything, on CUDA when present, else the CPU
    python -m bench.benchmark --quick                # a few minutes on a 2-core CPU
    python -m bench.benchmark --device cuda --json bench.json --batch_size 512

Training throughput: one step is what train.py does per batch (noise a batch with the cosine
schedule, predict the noise conditioned on 8 text tokens of 512, MSE, backward, AdamW), timed for
our UNet at the default config (configs/mnist.yaml) and for the seed's model, diffusers'
``UNet2DConditionModel`` with the seed's config (as in ../shared/bench/peer_diffusers.py), at the
same batch size, precision and compile setting. The two alternate step by step, so that a busy
machine slows both alike; the figure is the median step. Random tensors stand in for MNIST and
CLIP: the time does not depend on their values. The peer needs ``pip install -e .[bench]``
(diffusers); without it the peer row says so and the rest runs.

Sampling: images/s for guided images (2 network rows per image-step) at 20 steps per sampler, with
a fresh UNet (every step costs what a trained one costs) of the default config and of
configs/cpu.yaml, the model a laptop CPU trains and samples.

Epoch: train.py run as a subprocess on the default config: start-up (process start to the first
training step) and the training loop's wall time, measured over a whole epoch or extrapolated from
``--epoch_images`` images (the output says which). Checkpoint and sample writing are excluded.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from data.shapes import IMAGE_SHAPE, IMAGE_SIZE, TEXT_DIM, TEXT_TOKENS
from ddpm import SAMPLERS, GaussianDiffusion, generate
from models.unet import UNet
from runtime.devices import COMPILE_CHOICES, PRECISIONS, device_name, pick_device, use_bf16, use_compile
from runtime.errors import UserError, run_cli
from runtime.files import atomic_write, prove_writable, remove_created
from runtime.flags import CliParser
from training.config import DEFAULT_CONFIG, TrainConfig, load_config_file

ROOT = Path(__file__).resolve().parent.parent

MNIST_TRAIN_IMAGES = 60_000
SAMPLING_CONFIGS = (DEFAULT_CONFIG, ROOT / "configs" / "cpu.yaml")
SEED_REPORT = "seed notebook: 2 h for 5 epochs on one GPU (about 42 img/s)"


# ----------------------------------------------------------------------------- settings
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = CliParser(prog="python -m bench.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, 10 sampled images, a short epoch")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--batch_size", type=int, default=128, help="training batch of both models")
    p.add_argument("--repeats", type=int, help="timed steps per model (default 10, --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps per model first (default 2, --quick 1)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="both models; auto = train.py's choice (bf16 autocast where the hardware does bf16)",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_CHOICES,
        default="auto",
        help="torch.compile both models (auto: on CUDA); compile time is not timed",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--sample_images", type=int, help="guided images per sampler (default 100, --quick 10)")
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument(
        "--epoch_images",
        type=int,
        help="images in the timed train.py epoch, 0 = a whole epoch (default: 0 on CUDA; "
        "4096 on the CPU, 1024 with --quick)",
    )
    p.add_argument("--skip", default="", help="comma list of parts to leave out: peer, sampling, epoch")
    args = p.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - {"peer", "sampling", "epoch"}:
        raise UserError(f"--skip takes a comma list of peer, sampling, epoch; got {sorted(args.skip)}")
    for name, quick, full in (("repeats", 3, 10), ("warmup", 1, 2), ("sample_images", 10, 100)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("batch_size", "repeats", "sample_images", "sample_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- models
def build_peer() -> torch.nn.Module:
    """The seed's UNet: diffusers' UNet2DConditionModel with the seed's config. ImportError without diffusers."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=IMAGE_SHAPE[0],
        out_channels=IMAGE_SHAPE[0],
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
    )


class TrainingStep:
    """One train.py step of a network on random data, with the fast-path settings both models share."""

    def __init__(
        self,
        net: torch.nn.Module,
        cfg: TrainConfig,
        args: argparse.Namespace,
        device: torch.device,
        unwrap: Callable = lambda out: out,
    ):
        torch.manual_seed(0)
        self.bf16, compiled = settings(args, device)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.net = net.to(device, memory_format=memory_format).train()
        self.forward = torch.compile(self.net) if compiled else self.net
        self.unwrap, self.device, self.steps = unwrap, device, cfg.diffusion.num_train_timesteps
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=True)  # as train.py
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self.x0 = torch.randn(args.batch_size, *IMAGE_SHAPE, device=device).contiguous(memory_format=memory_format)
        self.context = torch.randn(args.batch_size, TEXT_TOKENS, TEXT_DIM, device=device)

    def __call__(self) -> None:
        t = torch.randint(self.steps, (len(self.x0),), device=self.device)
        noise = torch.randn_like(self.x0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.unwrap(self.forward(self.diffusion.q_sample(self.x0, t, noise), t, self.context))
        loss = F.mse_loss(output.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def state_bytes(self) -> int:
        """Bytes of the weights and the optimizer state, resident between steps."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in [*self.net.parameters(), *state])


def settings(args: argparse.Namespace, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, torch.compile), as train.py picks them unless the flags say otherwise."""
    return use_bf16(args.precision, device), use_compile(args.compile, device)


# ----------------------------------------------------------------------------- memory
def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def peak_memory_mb(step: TrainingStep, device: torch.device) -> tuple[float, str]:
    """(peak MB of one training step, how it was measured), running that step.

    What the step allocates at its peak above what was allocated before it, plus this model's
    weights and AdamW state (resident between steps): the same count on both devices. CUDA:
    torch.cuda.max_memory_allocated. CPU (Linux): the resident set's high-water mark, reset after
    handing freed heap back to the system.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        grown, how = (torch.cuda.max_memory_allocated(device) - before) / 2**20, "torch.cuda.max_memory_allocated"
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            before = _proc_status_mb("VmRSS")
        except OSError:  # not Linux: the process's lifetime peak RSS, an upper bound
            import resource

            step()
            scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss is in bytes on macOS, else KiB
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, "process peak RSS"
        step()
        grown, how = _proc_status_mb("VmHWM") - before, "peak RSS growth (VmHWM)"
    return grown + step.state_bytes() / 2**20, f"{how} in a step + weights and AdamW state"


# ----------------------------------------------------------------------------- training throughput
def time_interleaved(
    steps: dict[str, TrainingStep], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per step of each entry, taking turns step by step after ``warmup`` untimed steps each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def training_throughput(args: argparse.Namespace, device: torch.device) -> dict:
    """Ours and the peer's images/s, step time and peak memory at the same batch, and their ratio."""
    cfg = load_config_file()
    ours = UNet(cfg.model)
    steps = {"ours": TrainingStep(ours, cfg, args, device)}
    results: dict = {
        "ours": {"model": f"UNet widths {cfg.model.widths}, layers_per_block {cfg.model.layers_per_block}"}
    }
    if "peer" in args.skip:
        results["peer"] = {"skipped": "--skip peer"}
    else:
        try:
            steps["peer"] = TrainingStep(build_peer(), cfg, args, device, unwrap=lambda out: out.sample)
            results["peer"] = {"model": "diffusers UNet2DConditionModel, seed config (32, 64, 64)"}
        except ImportError:
            results["peer"] = {"skipped": "diffusers is not installed: pip install -e .[bench]"}
    for name, step in steps.items():
        step()  # the first step allocates the optimizer state (and compiles): keep it out of the memory peak
        mb, how = peak_memory_mb(step, device)
        results[name].update(
            params_m=round(sum(p.numel() for p in step.net.parameters()) / 1e6, 3),
            peak_mem_mb=round(mb, 1),
            peak_mem_kind=how,
        )
    times = time_interleaved(steps, device, args.warmup, args.repeats)
    for name, seconds in times.items():
        median = statistics.median(seconds)
        results[name].update(
            train_img_per_s=round(args.batch_size / median, 1),
            step_ms=round(median * 1e3, 1),
            step_ms_min=round(min(seconds) * 1e3, 1),
            step_ms_max=round(max(seconds) * 1e3, 1),
        )
    results["ratio"] = None
    if "peer" in times:
        results["ratio"] = round(results["ours"]["train_img_per_s"] / results["peer"]["train_img_per_s"], 2)
    return results


# ----------------------------------------------------------------------------- sampling
def sampling_throughput(args: argparse.Namespace, device: torch.device, config: Path) -> list[dict]:
    """Guided images/s per sampler at ``--sample_steps``, one batch of ``--sample_images``, for the model
    of ``config``."""
    cfg = load_config_file(config)
    torch.manual_seed(0)
    net = UNet(cfg.model).to(device).eval().requires_grad_(False)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    tokens = torch.randn(args.sample_images + 1, TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    bf16, _ = settings(args, device)

    def run(sampler: str, cond: torch.Tensor) -> float:
        sync(device)
        start = time.perf_counter()
        options = cfg.sampling_options().replace(sampler=sampler, steps=args.sample_steps)
        generate(
            net, diffusion, cond, tokens[:1], options, image_shape=IMAGE_SHAPE, batch_size=args.sample_images, bf16=bf16
        )
        sync(device)
        return time.perf_counter() - start

    run("ddim", tokens[1:3])  # warm-up
    rows = []
    for sampler in SAMPLERS:
        seconds = run(sampler, tokens[1:])
        rows.append(
            {
                "config": config.name,
                "sampler": sampler,
                "images": args.sample_images,
                "steps": args.sample_steps,
                "seconds": round(seconds, 2),
                "img_per_s": round(args.sample_images / seconds, 2),
            }
        )
    return rows


# ----------------------------------------------------------------------------- train.py epoch
def epoch_images(args: argparse.Namespace, device: torch.device) -> int:
    if args.epoch_images is not None:
        return args.epoch_images
    return 0 if device.type == "cuda" else (1024 if args.quick else 4096)


def run_train(
    args: argparse.Namespace, device: torch.device, images: int, output_dir: Path
) -> tuple[float, list[dict]]:
    """Run train.py for one epoch with the benchmark's precision and compile flags; (start-up seconds,
    its metrics.jsonl records)."""
    cmd = [
        sys.executable,
        "-u",
        str(ROOT / "train.py"),
        "--output_dir",
        str(output_dir),
        "--device",
        str(device),
        "--num_epochs",
        "1",
        "--train_subset",
        str(images),
        "--samples_per_digit",
        "1",
        "--sample_steps",
        "1",
        "--eval_every",
        "0",
        "--precision",
        args.precision,
        "--compile",
        args.compile,
    ]
    if images:  # four log windows: the first holds the warm-up, the rest give the steady rate
        cmd += ["--log_every", str(max(1, images // load_config_file().batch_size // 4))]
    start = time.perf_counter()
    startup, tail = None, []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # type: ignore[union-attr]
            if startup is None and line.startswith("device "):  # printed right before the training loop
                startup = time.perf_counter() - start
            tail = (tail + [line.rstrip()])[-5:]
    if proc.returncode or startup is None:
        raise UserError(f"train.py failed (exit {proc.returncode}): {' | '.join(tail)}")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return startup, records


def epoch_time(args: argparse.Namespace, device: torch.device) -> dict:
    """Start-up and the wall time of one epoch of the default config, measured or extrapolated."""
    images = epoch_images(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        startup, records = run_train(args, device, images, Path(tmp))
    epoch = next(r for r in records if "epoch_seconds" in r)
    result = {
        "startup_s": round(startup, 1),
        "images": images or MNIST_TRAIN_IMAGES,
        "loop_s": round(epoch["epoch_seconds"], 1),
    }
    if not images:
        return {**result, "epoch_s": result["loop_s"], "how": "measured: one whole epoch"}
    windows = [r for r in records if "img_per_s" in r]
    batch = load_config_file().batch_size
    full_steps, steps = MNIST_TRAIN_IMAGES // batch, images // batch
    first_steps = windows[0]["step"]
    first_s = first_steps * batch / windows[0]["img_per_s"]
    steady = (
        (epoch["epoch_seconds"] - first_s) / max(1, steps - first_steps)
        if len(windows) > 1
        else epoch["epoch_seconds"] / steps
    )
    estimate = first_s + (full_steps - first_steps) * steady
    return {
        **result,
        "epoch_s": round(estimate, 1),
        "how": f"extrapolated: {steps} steps measured ({first_steps} warm-up), {full_steps} in an epoch",
    }


# ----------------------------------------------------------------------------- report
def machine(device: torch.device) -> str:
    return f"{device_name(device)}, {torch.get_num_threads()} threads"


def print_report(r: dict) -> None:
    print(
        f"\n{r['device']} ({r['machine']}), torch {r['torch']}, batch {r['batch_size']}, "
        f"{'bf16 autocast' if r['bf16'] else 'fp32'}, compile {'on' if r['compile'] else 'off'}"
    )
    print("\n| model | params (M) | train img/s | step ms (min-max) | peak MB |\n|---|---:|---:|---:|---:|")
    for name in ("ours", "peer"):
        m = r[name]
        if "skipped" in m:
            print(f"| {name} | skipped: {m['skipped']} | | | |")
        else:
            print(
                f"| {name}: {m['model']} | {m['params_m']:.2f} | {m['train_img_per_s']:.1f} | "
                f"{m['step_ms']:.0f} ({m['step_ms_min']:.0f}-{m['step_ms_max']:.0f}) | {m['peak_mem_mb']:.0f} |"
            )
    if r.get("ratio"):
        print(f"\nours / peer: {r['ratio']:.2f}x training images/s (same batch, interleaved steps, median)")
    if r.get("sampling"):
        print("\n| model | sampler | images | steps | s | images/s |\n|---|---|---:|---:|---:|---:|")
        for s in r["sampling"]:
            print(
                f"| {s['config']} | {s['sampler']} | {s['images']} | {s['steps']} | {s['seconds']:.2f} | "
                f"{s['img_per_s']:.1f} |"
            )
    if r.get("epoch"):
        e = r["epoch"]
        print(
            f"\ntrain.py, default config: start-up {e['startup_s']:.1f} s; one epoch of {MNIST_TRAIN_IMAGES} "
            f"images {e['epoch_s']:.1f} s ({e['how']}); 5 epochs {5 * e['epoch_s'] / 60:.1f} min "
            f"+ start-up; {SEED_REPORT}"
        )


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.json:
        remove_created(prove_writable(args.json.parent, "--json"))
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16, compiled = settings(args, device)
    results = {
        "device": str(device),
        "machine": machine(device),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "bf16": bf16,
        "compile": compiled,
        "quick": args.quick,
        **training_throughput(args, device),
    }
    if "sampling" not in args.skip:
        results["sampling"] = [row for config in SAMPLING_CONFIGS for row in sampling_throughput(args, device, config)]
    if "epoch" not in args.skip:
        results["epoch"] = epoch_time(args, device)
    print_report(results)
    if args.json:
        try:
            atomic_write(args.json, lambda f: f.write((json.dumps(results, indent=2) + "\n").encode()))
        except OSError as err:
            raise UserError(
                f"cannot write --json {args.json} ({err.strerror}); the table above holds the results"
            ) from None
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
