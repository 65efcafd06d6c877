"""UNet and EMA behaviour."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from models.ema import EMA
from models.unet import UNet, UNetConfig, Upsample, attention, plain_attention, timestep_embedding
from tests.helpers import ROOT
from training.config import load_config_file


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0, 5]), 4, max_period=100.0)
    freqs = torch.tensor([1.0, 100.0**-0.5])
    expected = torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)])
    torch.testing.assert_close(emb[1], expected)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))


@pytest.fixture(params=[False, True], ids=["up_blocks=layers", "up_blocks=layers+1"])
def net(request):
    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            widths=(16, 32, 32),
            attention=(False, True, True),
            layers_per_block=1,
            head_dim=16,
            extra_up_block=request.param,
        )
    )
    for module in net.modules():  # undo the zero inits so every path carries signal
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(module.weight, std=0.05)
    return net


def test_shapes_and_levels(net):
    x, t, ctx = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999]), torch.randn(3, 8, 512)
    assert net(x, t, ctx).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError):
        UNet(UNetConfig(widths=(16, 32), attention=(True,)))


def test_output_depends_on_text_time_and_image_and_all_weights_get_gradients(net):
    x, t, ctx = torch.randn(2, 1, 28, 28), torch.tensor([100, 100]), torch.randn(2, 8, 512)
    out = net(x, t, ctx)
    assert (net(x, t, torch.randn(2, 8, 512)) - out).abs().max() > 1e-4
    assert (net(x, torch.tensor([900, 900]), ctx) - out).abs().max() > 1e-4
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in net.parameters())


def test_samples_are_independent_in_a_batch(net):
    x, t, ctx = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4]), torch.randn(4, 8, 512)
    torch.testing.assert_close(net(x, t, ctx)[2:3], net(x[2:3], t[2:3], ctx[2:3]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("channels_in,channels_out,size", [(4, 6, 7), (3, 3, 14)])
def test_upsample_equals_nearest_then_conv(channels_in, channels_out, size):
    """The folded transposed conv against the plain form: nearest x2, then a padded 3x3 conv."""
    torch.manual_seed(0)
    up = Upsample(channels_in, channels_out)
    x = torch.randn(2, channels_in, size, size, requires_grad=True)
    out = up(x)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.weight, up.bias, padding=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, up.weight, up.bias], grad)
    want = torch.autograd.grad(expected, [x, up.weight, up.bias], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


def test_patches_equal_a_unet_on_rearranged_pixels():
    """patch_size 2 is the same UNet run on 14x14 maps whose 4 channels are each 2x2 patch's pixels
    (einops, independently of pixel_(un)shuffle), with its 4 output channels put back as pixels."""
    torch.manual_seed(0)
    cfg = dict(widths=(16, 32), attention=(False, True), layers_per_block=1, head_dim=16)
    patched, on_patches = UNet(UNetConfig(**cfg, patch_size=2)), UNet(UNetConfig(**cfg, in_channels=4))
    for module in patched.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(module.weight, std=0.05)
    on_patches.load_state_dict(patched.state_dict())
    x, t, ctx = torch.randn(2, 1, 28, 28), torch.tensor([3, 700]), torch.randn(2, 8, 512)
    patches = rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2)
    expected = rearrange(on_patches(patches, t, ctx), "b (c p q) h w -> b c (h p) (w q)", p=2, q=2)
    torch.testing.assert_close(patched(x, t, ctx), expected)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_is_valid_and_maps_digits_to_digits(path):
    cfg = load_config_file(path)
    cfg.validate()
    net = UNet(cfg.model)
    assert net(torch.randn(2, 1, 28, 28), torch.tensor([0, 999]), torch.randn(2, 8, 512)).shape == (2, 1, 28, 28)


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64 NumPy, an independent reference."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    logits = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return torch.from_numpy(weights / weights.sum(-1, keepdims=True) @ v)


@pytest.mark.parametrize("keys", [8, 49])  # cross-attention to 8 text tokens, self-attention at 7x7
def test_attention_paths_equal_the_formula(keys):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 49, 16), torch.randn(2, 2, keys, 16), torch.randn(2, 2, keys, 16)
    expected = reference_attention(q, k, v)
    torch.testing.assert_close(plain_attention(q, k, v).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v).double(), expected, atol=1e-5, rtol=1e-5)  # fused kernel
    low = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # the plain path, on the CPU
    torch.testing.assert_close(low.double(), expected, atol=3e-2, rtol=3e-2)


def test_up_path_layout():
    """layers_per_block up blocks per level, each fed its mirror's skip; or one more, fed by the downsamplers."""
    cfg = dict(widths=(16, 32), attention=(False, True), layers_per_block=2, head_dim=16)
    lean, extra = UNet(UNetConfig(**cfg)), UNet(UNetConfig(**cfg, extra_up_block=True))
    assert len(lean.up) == 4 and len(extra.up) == 6
    # up blocks' input channels: the path's width plus the skip's, in the down path's reverse order
    assert [b.res.conv1.in_channels for b in lean.up] == [32 + 32, 32 + 32, 32 + 16, 16 + 16]
    assert [b.res.conv1.in_channels for b in extra.up] == [32 + 32, 32 + 32, 32 + 16, 32 + 16, 16 + 16, 16 + 16]


def test_fresh_unet_predicts_zero():
    """Zero-initialised output layers: an untrained model predicts eps = 0 (the mean of the target)."""
    net = UNet(UNetConfig(widths=(16, 32), attention=(False, True), layers_per_block=1, head_dim=16))
    assert net(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), torch.randn(2, 8, 512)).abs().max() == 0


def test_ema_closed_form():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = EMA(model, decay=0.5)
    expected = 0.0
    for n in range(1, 6):
        torch.nn.init.constant_(model.weight, float(n))
        ema.update(model)
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * n
        assert ema.shadow.weight.item() == pytest.approx(expected)
    state = ema.state_dict()
    fresh = EMA(torch.nn.Linear(1, 1, bias=False), decay=0.5)
    fresh.load_state_dict(state)
    assert fresh.shadow.weight.item() == pytest.approx(expected) and fresh.updates == 5
