"""Device and precision choice: one rule shared by train.py, sample.py, evaluate.py and the benchmarks."""

import pytest
import torch

from ddpm import GaussianDiffusion, SamplingOptions, cosine_beta_schedule, generate
from runtime import devices
from runtime.errors import UserError

FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra} lm\nbugs\t\t: none\n"


@pytest.mark.parametrize(
    "extra, native", [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512_vnni", False), ("", False)]
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, extra, native):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # as on either kind of machine
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FLAGS.format(extra=extra))
    assert devices.cpu_has_native_bf16(cpuinfo) is native


def test_pytorch_held_to_avx2_means_no_native_bf16(tmp_path, monkeypatch):
    """``ATEN_CPU_CAPABILITY=avx2`` (AVX2 emulation on an AVX512 machine) trains in fp32, as the AVX2 kind does."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(FLAGS.format(extra="avx512_bf16"))
    assert devices.cpu_has_native_bf16(cpuinfo) is False


@pytest.mark.parametrize(
    "flags, capability, kind",
    [
        ("fpu avx2 avx512f avx512_bf16", "AVX512", "AVX512-BF16"),
        ("fpu avx2 avx512f avx512_bf16", "AVX2", "AVX2 emulated on AVX512"),
        ("fpu sse2 avx2 fma", "AVX2", "AVX2"),
    ],
)
def test_a_benchmark_names_the_cpu_kind_emulation_included(tmp_path, monkeypatch, flags, capability, kind):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert devices.cpu_kind(cpuinfo) == kind


def test_a_benchmark_names_the_cpu_generation_beside_its_kind(tmp_path, monkeypatch):
    """Two AVX2-only EPYCs differ 1.7x in training speed: the family and model tell them apart."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpuinfo = tmp_path / "cpuinfo"
    fields = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n"
    cpuinfo.write_text(fields)
    assert devices.cpu_kind(cpuinfo) == "AVX2 (AMD EPYC, family 25 model 1)"


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert devices.cpu_has_native_bf16(tmp_path / "absent") is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_the_cpu_follows_the_hardware(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert devices.use_bf16("auto", cpu) is native
    assert devices.use_bf16("bf16", cpu) is True
    assert devices.use_bf16("fp32", cpu) is False


def test_unknown_precision_and_device_are_user_errors():
    with pytest.raises(UserError, match="precision must be one of auto, fp32, bf16"):
        devices.use_bf16("fp16", torch.device("cpu"))
    with pytest.raises(UserError, match="--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        devices.pick_device("gpu")
    assert devices.pick_device("cpu") == torch.device("cpu")


def test_compile_is_on_by_default_only_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [devices.use_compile(flag, cpu) for flag in ("auto", "on", "off")] == [False, True, False]
    assert [devices.use_compile(flag, cuda) for flag in ("auto", "on", "off")] == [True, True, False]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_names_the_fix():
    with pytest.raises(UserError, match="use --device cpu"):
        devices.pick_device("cuda:1")


@pytest.mark.parametrize("bf16", [True, False])
def test_generate_runs_the_network_under_bf16_autocast_only_when_asked(bf16):
    seen = []

    def net(x, t, context):
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.zeros_like(x)

    diffusion = GaussianDiffusion(cosine_beta_schedule(1000))
    cond, uncond = torch.zeros(3, 8, 512), torch.zeros(1, 8, 512)
    images = generate(
        net, diffusion, cond, uncond, SamplingOptions(steps=3, guidance_scale=2.0), image_shape=(1, 28, 28), bf16=bf16
    )
    assert set(seen) == {bf16}
    assert images.dtype == torch.float32 and images.shape == (3, 1, 28, 28)
