"""Which device to run on, and whether to autocast to bf16 and torch.compile there: one rule for
training, sampling, evaluation and the benchmarks."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import torch

from runtime.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_CHOICES = ("auto", "on", "off")
PRECISION_HELP = "network precision: auto = bf16 autocast where the hardware does bf16 natively, else fp32"


def pick_device(flag: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; anything else is a UserError."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag != "cpu" and not re.fullmatch(r"cuda(:\d+)?", flag):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {flag!r}")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {flag} asked for CUDA but none is available; use --device cpu")
    return torch.device(flag)


@cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU multiplies bf16 in hardware (its flags list AVX512-BF16 or AMX-BF16) and
    PyTorch uses its AVX512 kernels there.

    Elsewhere bf16 autocast on the CPU is emulated and slower than fp32, so ``auto`` keeps fp32;
    so does a system without /proc/cpuinfo, and one where ``ATEN_CPU_CAPABILITY=avx2`` holds PyTorch
    to AVX2 (how an AVX512 machine approximates the AVX2-only kind, which then trains in fp32 as it does).
    """
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\b(avx512_bf16|amx_bf16)\b", text, flags=re.MULTILINE) is not None


def cpu_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU a benchmark names beside its times: its kind, "AVX512-BF16", "AVX2" or "AVX2 emulated on
    AVX512" (``ATEN_CPU_CAPABILITY=avx2`` on an AVX512 machine), then its model name, family and model.

    The generation matters as much as the kind: two AVX2-only AMD EPYCs of this project trained the
    quick start at 202-207 and at 335-378 img/s (docs/speed.md)."""
    try:
        text = cpuinfo.read_text()
        flags = set(re.findall(r"^flags\s*:(.*)$", text, flags=re.MULTILINE)[0].split())
    except (OSError, IndexError):
        return f"unknown CPU (PyTorch's {torch.backends.cpu.get_cpu_capability()} kernels)"
    if torch.backends.cpu.get_cpu_capability() == "AVX2" and "avx512f" in flags:
        kind = "AVX2 emulated on AVX512"
    elif cpu_has_native_bf16(cpuinfo):
        kind = "AVX512-BF16"
    else:
        kind = "AVX2" if "avx2" in flags else "neither AVX2 nor AVX512"
    name, family, model = (_cpuinfo_field(text, key) for key in ("model name", "cpu family", "model"))
    described = ", ".join(filter(None, (name, family and model and f"family {family} model {model}")))
    return f"{kind} ({described})" if described else kind


def device_name(device: torch.device) -> str:
    """What a benchmark names beside its times: the GPU's name, or the CPU's (``cpu_kind``)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_kind()


def _cpuinfo_field(text: str, key: str) -> str | None:
    match = re.search(rf"^{key}\s*:\s*(.*)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else None


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast to bf16: ``bf16`` always, ``fp32`` never, ``auto`` where the hardware
    does bf16 natively (CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def use_compile(flag: str, device: torch.device) -> bool:
    """Whether to torch.compile: ``on`` always, ``off`` never, ``auto`` on CUDA only (on this
    project's 2-core CPU a cpu.yaml training step gained 1.18x, after 90 s of compiling)."""
    return flag == "on" or (flag == "auto" and device.type == "cuda")
