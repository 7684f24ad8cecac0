"""Conv2d Delta-LoRA adapters (raybranch.lora.conv): the adapted forward equals the merged
kernel's, the closed-form W update, bit-exact rebuilds and restores from a real store, safe
merges (NaN/Inf refused before anything is written), SVD init, and injection by layer type."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raybranch as rb
from raybranch.lora import (
    DeltaLoRAConv2d,
    conv_sites,
    delta_lora_layers,
    delta_lora_step,
    inject_delta_lora,
    load_lora_state,
    lora_anchor,
    lora_parameters,
    lora_state,
    merge_and_reinit_,
    merge_delta_lora,
    non_lora_parameters,
)
from raybranch.train.loop import checkpoint_state, load_checkpoint

torch.set_num_threads(1)


class ConvNet(nn.Module):
    """Convolutions of several shapes (stride, padding, dilation, 1×1) and a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv2d(24, 32, 1, bias=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        return self.fc(F.relu(self.c3(x)).mean((2, 3)))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def randomise(model, gen, std=0.1):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def steps(model, x, y, n, lr=0.05):
    opt = torch.optim.SGD(lora_parameters(model) + non_lora_parameters(model), lr=lr, momentum=0.9)
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        delta_lora_step(model)


@pytest.mark.parametrize("name", ["c1", "c2", "c3"])
def test_adapted_forward_equals_the_merged_kernel(gen, name):
    torch.manual_seed(0)
    conv = getattr(ConvNet(), name)
    layer = DeltaLoRAConv2d.from_conv2d(conv, rank=4, scale=0.5)
    x = torch.randn(2, conv.in_channels, 11, 11, generator=gen)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-6, rtol=1e-6)  # B = 0: the stock conv
    randomise(layer, gen)
    plain = layer.to_conv2d()
    assert isinstance(plain, nn.Conv2d) and plain.stride == conv.stride and plain.padding == conv.padding
    torch.testing.assert_close(plain(x), layer(x), atol=1e-5, rtol=1e-5)
    # P(B, A) is a rank-r kernel: rank of the d × (c·kh·kw) matrix
    assert torch.linalg.matrix_rank(layer.get_delta_weight().flatten(1)) == 4


def test_delta_update_closed_form(gen):
    layer = DeltaLoRAConv2d.from_conv2d(nn.Conv2d(6, 16, 5), rank=8, scale=0.5, lam=2.0)
    w_a = layer.weight.clone()
    randomise(layer, gen)
    delta_lora_step(nn.Sequential(layer))
    prod = (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)).view(16, 6, 5, 5)
    torch.testing.assert_close(layer.weight, w_a + 2.0 * 0.5 * prod)


def test_conv_adapters_rebuild_and_restore_bit_exact(gen, file_uri):
    torch.manual_seed(0)
    model = ConvNet()
    names = inject_delta_lora(model, "all", rank=4)
    assert names == ["c1", "c2", "c3", "fc"] and isinstance(model.c2, DeltaLoRAConv2d)
    x, y = torch.randn(16, 3, 12, 12, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    anchor = lora_anchor(model)
    steps(model, x, y, 4)
    state = {k: v.clone() for k, v in lora_state(model).items()}
    assert "c2.weight" not in state and state["c2.lora_A"].shape == (4, 16, 3, 3) and state["c2.lora_B"].shape == (24, 4, 1, 1)

    torch.manual_seed(1)  # another start: everything must come from the checkpoint
    rebuilt = ConvNet()
    inject_delta_lora(rebuilt, "all", rank=4, scale=0.25)
    load_lora_state(rebuilt, anchor, state)
    for (k, a), (k2, b) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(rebuilt(x), model(x))

    # through a real store: an exact checkpoint (snapshot) restores the live model bit for bit
    ck = rb.Checkpointer(file_uri, run="conv", segment_size=0)
    st, extra = checkpoint_state(model, True)
    ck.save(1, st, None, extra, snapshot=True)
    ck.flush()
    fresh = ConvNet()
    inject_delta_lora(fresh, "all", rank=4)
    load_checkpoint(fresh, ck.restore(1))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(fresh(x), model(x))


def test_merge_checks_for_nan_before_writing(gen):
    torch.manual_seed(0)
    model = ConvNet()
    inject_delta_lora(model, "all", rank=4)
    randomise(model, gen)
    x = torch.randn(2, 3, 12, 12, generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.c2.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in the merged weight of a DeltaLoRAConv2d"):
        model.c2.merge_()
    assert torch.equal(model.c2.weight, before["c2.weight"])  # nothing was written
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_delta_lora(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        merge_and_reinit_(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "c2.lora_B" not in k)  # no layer merged
    with torch.no_grad():
        model.fc.lora_A[0, 0] = float("inf")
    with pytest.raises(ValueError, match="DeltaLoRALinear"):
        model.fc.to_linear()
    with torch.no_grad():  # repaired: merges work and keep the function
        model.c2.lora_B[0, 0] = 0.0
        model.fc.lora_A[0, 0] = 0.0
    out = model(x)
    plain = merge_delta_lora(model)
    assert not delta_lora_layers(plain) and isinstance(plain.c2, nn.Conv2d)
    torch.testing.assert_close(plain(x), out, atol=1e-5, rtol=1e-5)
    merge_and_reinit_(model, gen)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    assert not model.c2.lora_B.any()


def test_svd_init_keeps_the_function_and_spans_the_update(gen):
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(2, 3, 12, 12, generator=gen)
    out = model(x)
    delta = {"c2": 0.01 * torch.randn(24, 16, 3, 3, generator=gen)}
    inject_delta_lora(model, "^c2$", rank=4, init="svd", deltas=delta, keep_function=True)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    approx = model.c2.get_delta_weight().flatten(1)
    u, s, vh = torch.linalg.svd(delta["c2"].flatten(1).double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(approx.double(), best, atol=1e-5, rtol=1e-4)


def test_injection_by_layer_type_and_size():
    torch.manual_seed(0)
    model = ConvNet()
    assert conv_sites(model) == ["c1", "c2", "c3"]
    assert inject_delta_lora(ConvNet(), "conv", rank=4) == ["c1", "c2", "c3"]
    assert inject_delta_lora(ConvNet(), "linear", rank=4) == ["fc"]
    # c1 (16 × 27) at rank 8 holds 8·43 = 344 < 432 numbers; fc (10 × 32): 8·42 = 336 > 320 is left dense
    assert inject_delta_lora(model, "all", rank=8, min_saving=1) == ["c1", "c2", "c3"]
    # at least 2× fewer numbers: c1 (432 vs 344) stays dense too; c2 (3456 vs 1344) and c3 (768 vs 448) do not
    assert inject_delta_lora(ConvNet(), "all", rank=8, min_saving=1.7) == ["c2", "c3"]
    with pytest.raises(ValueError, match="groups=1"):
        DeltaLoRAConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        DeltaLoRAConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="rank 40 outside"):
        DeltaLoRAConv2d.from_conv2d(nn.Conv2d(4, 4, 3), rank=40)
