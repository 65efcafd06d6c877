"""A small cross-attention UNet for 28x28 digits, written from scratch.

Layout (defaults, the seed's widths): 28x28 @ 32 -> 14x14 @ 64 -> 7x7 @ 64, residual blocks
with GroupNorm and SiLU at every level, and at the levels marked in ``attention`` a transformer
block (self-attention, cross-attention to the text tokens, feed-forward) after each residual
block, as in Stable Diffusion's UNet. The middle runs res -> transformer -> res at 7x7.
With ``patch_size`` p > 1 the UNet sees each p x p patch of pixels as p^2 channels of one position
(pixel unshuffle; the patchify of DiT and U-ViT) and unfolds its output the same way, so every level
works on a p-times smaller map: configs/cpu.yaml runs 14x14 -> 7x7 at about half the cost of a step.

Speed (bench/benchmark.py) shaped two choices: the up path has ``layers_per_block`` blocks per
level, each taking the skip of its mirror block on the way down (improved-diffusion and diffusers
add one more, fed by the downsampler's output: ``extra_up_block``), and the transformer's
feed-forward is ``ff_mult`` (2) times the width. Two paths compute the same function faster:
upsampling (nearest-neighbour x2, then a 3x3 conv) is one stride-2 transposed conv at 4/9 of the
multiply-adds (Upsample), and bf16 attention on the CPU avoids a slow fused kernel (attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from data.shapes import IMAGE_SHAPE, TEXT_DIM


@dataclass(frozen=True)
class UNetConfig:
    """The UNet's layout. Every field is also a training config key and flag (``--widths 32 64 64``),
    except the two fixed by the data and the text encoder (``fixed``), never configured, and
    ``distilled`` and ``negative_input``, which only distill.py sets (``distill_only``)."""

    widths: tuple[int, ...] = (32, 64, 64)
    attention: tuple[bool, ...] = (False, True, True)  # a transformer block after each block of that level
    layers_per_block: int = 2
    head_dim: int = 32
    groups: int = 8  # GroupNorm groups
    dropout: float = 0.0
    ff_mult: int = 2  # the transformer feed-forward's hidden width, in multiples of the block's width
    extra_up_block: bool = False  # up path: layers_per_block + 1 blocks per level (improved-diffusion's layout)
    patch_size: int = 1  # > 1: the UNet works on p x p pixel patches folded into channels (pixel unshuffle)
    # a distilled student's two more inputs, the guidance scale and the timestep its step lands on (distill.py)
    distilled: bool = field(default=False, metadata={"distill_only": True})
    # and a third: the negative prompt's tokens, whose mean is embedded like the scale (older students lack it)
    negative_input: bool = field(default=False, metadata={"distill_only": True})
    in_channels: int = field(default=IMAGE_SHAPE[0], metadata={"fixed": True})
    context_dim: int = field(default=TEXT_DIM, metadata={"fixed": True})

    def validate(self) -> None:
        """Raise ValueError for a layout the UNet cannot be built with."""
        if len(self.widths) != len(self.attention):
            raise ValueError("widths and attention must have one entry per resolution level")
        if any(w % self.groups or w % self.head_dim for w in self.widths):
            raise ValueError(f"every width must be divisible by groups={self.groups} and head_dim={self.head_dim}")
        if self.negative_input and not self.distilled:
            raise ValueError("only a distilled UNet takes a negative prompt as an input")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in "Attention Is All You Need"."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def zero_output_mlp(dim_in: int, dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear, its output zero until trained: a new input embedded this way leaves the
    network it is added to the function it was (a student starts as the model it is initialised from)."""
    mlp = nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the time embedding, twice, with a residual connection."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dimensions, as three plain ops."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention: PyTorch's fused kernel, except in bf16 on the CPU, where its flash
    kernel is 1.5x (14x14 self-attention) to 7x (7x7, and cross-attention to 8 tokens) slower than
    ``plain_attention`` at these sizes (measured with torch 2.14, fwd + bwd)."""
    if q.device.type == "cpu" and q.dtype != torch.float32:
        return plain_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head attention of x over ``context`` (x itself for self-attention)."""

    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        return self.out(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text tokens, and a GELU feed-forward, pre-norm,
    wrapped in GroupNorm and 1x1 projections so it maps a feature map to a feature map."""

    def __init__(self, dim: int, context_dim: int, head_dim: int, groups: int, ff_mult: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, dim, head_dim)
        self.norm2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, context_dim, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        h = self.proj_in(rearrange(self.norm(x), "b c y x -> b (y x) c"))
        n1 = self.norm1(h)
        h = h + self.self_attn(n1, n1)
        h = h + self.cross_attn(self.norm2(h), context)
        h = h + self.ff(self.norm3(h))
        return x + rearrange(self.proj_out(h), "b (y x) c -> b c y x", y=height)


def transformer(dim: int, cfg: UNetConfig) -> TransformerBlock:
    return TransformerBlock(dim, cfg.context_dim, cfg.head_dim, cfg.groups, cfg.ff_mult)


class Upsample(nn.Conv2d):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv, computed as one stride-2 transposed
    conv with a 4x4 kernel folded from the 3x3 one: the same function (and parameters) at 4/9 of
    the multiply-adds, since the plain form convolves four copies of every pixel.

    Along each axis, output 2m takes x[m-1] * w0 + x[m] * (w1 + w2) and output 2m+1 takes
    x[m] * (w0 + w1) + x[m+1] * w2; a transposed conv with padding 1 reads its kernel taps
    3, 1 (even outputs) and 2, 0 (odd), so the 4-tap kernel is (w2, w1 + w2, w0 + w1, w0).
    """

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(channels_in, channels_out, 3, padding=1)
        fold = torch.tensor([[0.0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]])
        self.register_buffer("fold", fold, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = torch.einsum("ka,oiab,lb->iokl", self.fold, self.weight, self.fold)
        return F.conv_transpose2d(x, kernel, self.bias, stride=2, padding=1)


class Stage(nn.Module):
    """A residual block, followed by a transformer block at attention levels."""

    def __init__(self, c_in: int, c_out: int, attention: bool, cfg: UNetConfig, emb_dim: int):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, cfg.groups, cfg.dropout)
        self.attn = transformer(c_out, cfg) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x, context) if self.attn is not None else x


class UNet(nn.Module):
    """Predicts the noise (or v) of a noisy image ``x`` [B, C, 28, 28] at integer timesteps
    ``t`` [B], conditioned on text tokens ``context`` [B, L, context_dim]."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w0, emb_dim = cfg.widths[0], 4 * cfg.widths[0]
        self.time_mlp = nn.Sequential(nn.Linear(w0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.distilled:
            self.jump_mlp = zero_output_mlp(2 * w0, emb_dim)
        if cfg.negative_input:
            self.negative_mlp = zero_output_mlp(cfg.context_dim, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size**2, w0, 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_channels, c = [w0] if cfg.extra_up_block else [], w0
        for level, (width, attn) in enumerate(zip(cfg.widths, cfg.attention)):
            for _ in range(cfg.layers_per_block):
                self.down.append(Stage(c, width, attn, cfg, emb_dim))
                c = width
                skip_channels.append(c)
            if level < len(cfg.widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skip_channels += [c] if cfg.extra_up_block else []

        self.mid1 = ResBlock(c, c, emb_dim, cfg.groups, cfg.dropout)
        self.mid_attn = transformer(c, cfg)
        self.mid2 = ResBlock(c, c, emb_dim, cfg.groups, cfg.dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(cfg.widths))):
            width, attn = cfg.widths[level], cfg.attention[level]
            for _ in range(self.up_blocks_per_level):
                self.up.append(Stage(c + skip_channels.pop(), width, attn, cfg, emb_dim))
                c = width
            if level > 0:
                self.upsample.append(Upsample(c, c))

        self.norm_out = nn.GroupNorm(cfg.groups, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels * cfg.patch_size**2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def up_blocks_per_level(self) -> int:
        return self.cfg.layers_per_block + self.cfg.extra_up_block

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        guidance: torch.Tensor | None = None,
        lands_on: torch.Tensor | None = None,
        negative: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``guidance`` [B] (the guidance scale) and ``lands_on`` [B] (the timestep the sampler's step from
        t lands on, -1 for clean data) are a distilled student's inputs, required then and refused otherwise;
        ``negative`` [B or 1, L, context_dim], the negative prompt's tokens (the empty prompt's for none), is
        likewise a ``negative_input`` student's."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.widths[0]))
        if self.cfg.distilled != (guidance is not None and lands_on is not None):
            raise ValueError("a distilled UNet takes guidance and lands_on, and only a distilled UNet does")
        if self.cfg.negative_input != (negative is not None):
            raise ValueError("a negative_input UNet takes negative, and only such a UNet does")
        if self.cfg.distilled:
            w0 = self.cfg.widths[0]  # the scale in hundredths, so that its sinusoids resolve 1 from 1.5
            jump = torch.cat([timestep_embedding(100 * guidance, w0), timestep_embedding(lands_on + 1, w0)], dim=1)
            emb = emb + self.jump_mlp(jump)
        if self.cfg.negative_input:
            emb = emb + self.negative_mlp(negative.mean(dim=1))
        h = self.conv_in(F.pixel_unshuffle(x, self.cfg.patch_size))
        extra = self.cfg.extra_up_block  # the extra up blocks take conv_in's and the downsamplers' outputs
        skips = [h] if extra else []
        blocks = iter(self.down)
        for level in range(len(self.cfg.widths)):
            for _ in range(self.cfg.layers_per_block):
                h = next(blocks)(h, emb, context)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips += [h] if extra else []

        h = self.mid2(self.mid_attn(self.mid1(h, emb), context), emb)

        blocks = iter(self.up)
        for i, level in enumerate(reversed(range(len(self.cfg.widths)))):
            for _ in range(self.up_blocks_per_level):
                h = next(blocks)(torch.cat([h, skips.pop()], dim=1), emb, context)
            if level > 0:
                h = self.upsample[i](h)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.cfg.patch_size)
