"""Delta-LoRA layer, injection and checkpoint rebuild (raybranch.lora)."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from raybranch.lora import (
    PRESETS,
    DeltaLoRALinear,
    DeltaLoRAMultiheadAttention,
    delta_lora_layers,
    delta_lora_step,
    inject_delta_lora,
    linear_sites,
    load_lora_state,
    lora_anchor,
    lora_parameters,
    lora_state,
    merge_and_reinit_,
    merge_delta_lora,
    non_lora_parameters,
    reanchor,
)

torch.set_num_threads(1)


class LeNet(nn.Module):
    """LeNet-5-like: two convs, then a classifier of three Linears fc1..fc3 (28×28 input)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def tiny_vit():
    vit = torchvision.models.VisionTransformer(
        image_size=28, patch_size=7, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.3)  # torchvision zero-inits the head: outputs would be 0
    return vit


def randomise_lora(model, gen, std=0.1):
    """Give every B (and A) random values so that B A ≠ 0."""
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def train_steps(model, x, y, steps, lr=0.05, momentum=0.9):
    opt = torch.optim.SGD(lora_parameters(model) + non_lora_parameters(model), lr=lr, momentum=momentum)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        delta_lora_step(model)
        losses.append(loss.item())
    return losses


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ---- the layer ------------------------------------------------------------------------------

def test_defaults_rank_scale_init(gen):
    big = DeltaLoRALinear.from_linear(nn.Linear(100, 50), generator=gen)
    assert (big.rank, big.scale, big.lam) == (8, 0.5, 1.0)
    assert big.lora_A.shape == (8, 100) and big.lora_B.shape == (50, 8)
    assert torch.count_nonzero(big.lora_B) == 0 and torch.count_nonzero(big.lora_A) > 0
    bound = 1 / 100 ** 0.5  # kaiming_uniform(a=√5) on fan_in 100
    assert big.lora_A.abs().max() <= bound
    small = DeltaLoRALinear(5, 3)
    assert small.rank == 3
    lin = nn.Linear(7, 4)
    layer = DeltaLoRALinear.from_linear(lin)
    x = torch.randn(6, 7, generator=gen)
    assert torch.equal(layer(x), lin(x))  # B = 0: the layer is the Linear it replaced
    assert "weight" in dict(layer.named_buffers()) and "weight" not in dict(layer.named_parameters())
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": 5}, {"scale": 0.0}, {"init": "gauss"},
                                    {"lam": float("nan")}, {"init": "svd"}])
def test_bad_layer_arguments(kwargs):
    with pytest.raises(ValueError):
        DeltaLoRALinear(4, 6, **kwargs)


def test_forward_equals_merged_plain_linear(gen):
    layer = DeltaLoRALinear.from_linear(nn.Linear(12, 9), rank=4, scale=0.7)
    randomise_lora(layer, gen)
    x = torch.randn(5, 3, 12, generator=gen)
    plain = layer.to_linear()
    assert isinstance(plain, nn.Linear) and type(plain) is nn.Linear
    torch.testing.assert_close(layer(x), plain(x))
    torch.testing.assert_close(layer(x), F.linear(x, layer.merged_weight(), layer.bias))
    torch.testing.assert_close(layer.get_delta_weight(), 0.7 * layer.lora_B @ layer.lora_A)


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("init", ["lora", "svd"])
def test_delta_update_rule(gen, lam, init):
    delta = torch.randn(9, 12, generator=gen) if init == "svd" else None
    layer = DeltaLoRALinear.from_linear(nn.Linear(12, 9), rank=3, scale=0.5, lam=lam, init=init, delta=delta)
    opt = torch.optim.SGD(lora_parameters(layer), lr=0.1)
    x, t = torch.randn(16, 12, generator=gen), torch.randn(16, 9, generator=gen)
    for _ in range(3):
        w_old = layer.weight.clone()
        ba_old = (layer.lora_B @ layer.lora_A).detach()
        opt.zero_grad()
        F.mse_loss(layer(x), t).backward()
        assert layer.weight.grad is None
        opt.step()
        assert torch.equal(layer.weight, w_old)  # the optimizer never touches W
        layer.delta_update()
        ba_new = (layer.lora_B @ layer.lora_A).detach()
        assert not torch.equal(ba_new, ba_old)
        torch.testing.assert_close(layer.weight - w_old, lam * 0.5 * (ba_new - ba_old), atol=1e-6, rtol=1e-5)


def test_delta_update_is_exact_at_anchor_and_idempotent(gen):
    delta = torch.randn(9, 12, generator=gen)
    layer = DeltaLoRALinear.from_linear(nn.Linear(12, 9), init="svd", delta=delta)
    w0 = layer.weight.clone()
    layer.delta_update()
    assert torch.equal(layer.weight, w0)  # A = A_a, B = B_a ⇒ W = W_a bit for bit
    randomise_lora(layer, gen)
    layer.delta_update()
    w1 = layer.weight.clone()
    layer.delta_update()
    assert torch.equal(layer.weight, w1)
    with pytest.raises(ValueError, match="reanchor_"):
        layer.delta_update(lam=2.0)
    layer.reanchor_(lam=2.0)
    layer.delta_update(lam=2.0)
    assert torch.equal(layer.weight, w1)


def test_svd_init_is_best_rank_r_approximation(gen):
    delta = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    r, s = 4, 0.5
    layer = DeltaLoRALinear(30, 20, rank=r, scale=s, init="svd", delta=delta, dtype=torch.float64)
    u, sig, vh = torch.linalg.svd(delta, full_matrices=False)
    best = u[:, :r] @ torch.diag(sig[:r]) @ vh[:r]
    torch.testing.assert_close(layer.get_delta_weight(), best)
    # singular values split symmetrically: BᵀB = A Aᵀ = Σ_r / s
    torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, torch.diag(sig[:r] / s))
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.diag(sig[:r] / s))
    # Eckart–Young: the residual is the tail of the spectrum
    err = torch.linalg.matrix_norm(delta - layer.get_delta_weight())
    torch.testing.assert_close(err, sig[r:].square().sum().sqrt())
    with pytest.raises(ValueError, match="shape"):
        DeltaLoRALinear(30, 20, rank=r, init="svd", delta=delta.T)


def test_merge_folds_product_and_reinitialises(gen):
    layer = DeltaLoRALinear.from_linear(nn.Linear(12, 9), rank=3)
    randomise_lora(layer, gen)
    x = torch.randn(4, 12, generator=gen)
    before, merged = layer(x), layer.merged_weight()
    layer.merge_(generator=gen)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer.weight, merged) and torch.equal(layer.anchor_weight, merged)
    torch.testing.assert_close(layer(x), before)


def test_load_state_dict_reanchors(gen):
    src = DeltaLoRALinear.from_linear(nn.Linear(12, 9), rank=3)
    randomise_lora(src, gen)
    src.delta_update()
    dst = DeltaLoRALinear(12, 9, rank=3)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.anchor_weight, src.weight) and torch.equal(dst.anchor_B, src.lora_B)
    dst.delta_update()  # W = loaded W exactly: loading made (W, A, B) the anchor
    assert torch.equal(dst.weight, src.weight)


# ---- attention wrapper ----------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_wrapper_matches_stock(gen, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
    wrap = DeltaLoRAMultiheadAttention.from_multihead_attention(mha).eval()
    shape = (3, 5, 16) if batch_first else (5, 3, 16)
    q = torch.randn(shape, generator=gen)
    kv = torch.randn(shape, generator=gen)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    cases = [dict(query=q, key=q, value=q, need_weights=False),
             dict(query=q, key=kv, value=kv, need_weights=True),
             dict(query=q, key=q, value=q, key_padding_mask=pad, attn_mask=causal, need_weights=True,
                  average_attn_weights=False),
             dict(query=q, key=q, value=q, key_padding_mask=pad, need_weights=False)]
    for case in cases:
        want, want_w = mha(**case)
        got, got_w = wrap(**case)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if want_w is None:
            assert got_w is None
        else:
            torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
    back = wrap.to_multihead_attention().eval()
    torch.testing.assert_close(back(q, q, q)[0], mha(q, q, q)[0])
    with pytest.raises(ValueError, match="kdim"):
        DeltaLoRAMultiheadAttention.from_multihead_attention(nn.MultiheadAttention(16, 2, kdim=8, vdim=8))


# ---- injection ------------------------------------------------------------------------------

def test_inject_classifier_preset_on_lenet(gen):
    torch.manual_seed(0)
    model = LeNet()
    x = torch.randn(4, 1, 28, 28, generator=gen)
    before = model(x)
    names = inject_delta_lora(model, "classifier")
    assert names == ["fc1", "fc2", "fc3"]
    assert [layer.rank for layer in delta_lora_layers(model).values()] == [8, 8, 8]
    assert isinstance(model.conv1, nn.Conv2d)
    torch.testing.assert_close(model(x), before)
    other = LeNet()
    assert inject_delta_lora(other, [r"^fc1$", r"^fc3$"], rank=2, scale=1.0) == ["fc1", "fc3"]
    assert isinstance(other.fc2, nn.Linear) and other.fc3.rank == 2 and other.fc3.scale == 1.0


def test_inject_nothing_matched_raises():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_delta_lora(LeNet(), "vit-msa")
    with pytest.raises(ValueError, match="bad regex"):
        inject_delta_lora(LeNet(), "fc(")
    with pytest.raises(ValueError, match="needs deltas"):
        inject_delta_lora(LeNet(), "classifier", init="svd")


VIT_EXPECTED = {
    "classifier": ["heads.head"],
    "vit-msa": [f"encoder.layers.encoder_layer_{i}.self_attention.{p}"
                for i in (0, 1) for p in ("in_proj", "out_proj")],
    "vit-mlp": [f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in (0, 1) for j in (0, 3)],
}
VIT_EXPECTED["vit-msa-mlp"] = sorted(VIT_EXPECTED["vit-msa"] + VIT_EXPECTED["vit-mlp"])
VIT_EXPECTED["linear"] = sorted(VIT_EXPECTED["vit-msa-mlp"] + VIT_EXPECTED["classifier"])
VIT_EXPECTED["conv"] = ["conv_proj"]  # the patchify stem
VIT_EXPECTED["all"] = sorted(VIT_EXPECTED["linear"] + VIT_EXPECTED["conv"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_inject_presets_on_tiny_vit(gen, preset):
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    keys = list(vit.state_dict())
    x = torch.randn(2, 3, 28, 28, generator=gen)
    before = vit(x)
    names = inject_delta_lora(vit, preset)
    assert sorted(names) == VIT_EXPECTED[preset]
    assert set(delta_lora_layers(vit)) == set(names)
    torch.testing.assert_close(vit(x), before, atol=1e-5, rtol=1e-5)
    if "msa" in preset:
        attn = vit.encoder.layers.encoder_layer_0.self_attention
        assert isinstance(attn, DeltaLoRAMultiheadAttention)
        assert attn.in_proj.lora_B.shape == (48, 8) and attn.in_proj.lora_A.shape == (8, 16)
    randomise_lora(vit, gen)
    delta_lora_step(vit)
    out = vit(x)
    assert not torch.allclose(out, before, atol=1e-3)
    plain = merge_delta_lora(vit).eval()
    assert list(plain.state_dict()) == keys  # the torchvision layout again
    assert not delta_lora_layers(plain) and delta_lora_layers(vit)
    torch.testing.assert_close(plain(x), out, atol=1e-5, rtol=1e-5)


def test_vit_training_step_with_msa_mlp(gen):
    """Gradients reach the in-projection factors through the attention wrapper."""
    torch.manual_seed(0)
    vit = tiny_vit()
    inject_delta_lora(vit, "vit-msa-mlp")
    randomise_lora(vit, gen, std=0.05)
    x, y = torch.randn(4, 3, 28, 28, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    F.cross_entropy(vit(x), y).backward()
    in_proj = vit.encoder.layers.encoder_layer_1.self_attention.in_proj
    assert in_proj.lora_A.grad is not None and in_proj.lora_A.grad.abs().sum() > 0


# ---- optimizer, checkpoint, export ----------------------------------------------------------

def test_optimizer_parameters_exclude_weight():
    model = LeNet()
    inject_delta_lora(model, "classifier")
    lora = lora_parameters(model)
    rest = non_lora_parameters(model)
    assert len(lora) == 6
    ids = {id(p) for p in lora + rest}
    weights = [layer.weight for layer in delta_lora_layers(model).values()]
    assert all(id(w) not in ids for w in weights)
    assert all(id(w) not in {id(p) for p in model.parameters()} for w in weights)
    assert {id(p) for p in rest} == {id(p) for p in (model.conv1.weight, model.conv1.bias,
                                                     model.conv2.weight, model.conv2.bias)}
    assert not {id(p) for p in lora} & {id(p) for p in rest}


@pytest.mark.parametrize("init", ["lora", "svd"])
def test_rebuild_from_anchor_and_state_is_bit_exact(gen, init):
    torch.manual_seed(0)
    model = LeNet()
    deltas = None
    if init == "svd":
        deltas = {n: 0.05 * torch.randn(m.weight.shape, generator=gen)
                  for n, m in model.named_modules() if n in ("fc1", "fc2", "fc3")}
    inject_delta_lora(model, "classifier", init=init, deltas=deltas)
    anchor = lora_anchor(model)
    x, y = torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    train_steps(model, x, y, steps=5)
    state = {k: v.clone() for k, v in lora_state(model).items()}
    assert not {f"fc{i}.weight" for i in (1, 2, 3)} & set(state)
    assert {f"fc{i}.lora_A" for i in (1, 2, 3)} <= set(state) and "conv1.weight" in state

    torch.manual_seed(1)  # a different starting point: everything must come from the checkpoint
    rebuilt = LeNet()
    inject_delta_lora(rebuilt, "classifier", scale=0.25, lam=3.0)
    load_lora_state(rebuilt, anchor, state)
    for (k, a), (k2, b) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(rebuilt(x), model(x))
    assert rebuilt.fc1.scale == 0.5 and rebuilt.fc1.lam == 1.0

    # a merge is a new anchor; training on from it rebuilds exactly too
    merge_and_reinit_(model, generator=gen)
    anchor2 = lora_anchor(model)
    assert torch.count_nonzero(anchor2["fc2.lora_B"]) == 0
    train_steps(model, x, y, steps=3)
    load_lora_state(rebuilt, anchor2, {k: v.clone() for k, v in lora_state(model).items()})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))


def test_rebuild_vit_msa_mlp_bit_exact(gen):
    torch.manual_seed(0)
    vit = tiny_vit()
    inject_delta_lora(vit, "vit-msa-mlp")
    reanchor(vit)
    anchor = lora_anchor(vit)
    x, y = torch.randn(8, 3, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    train_steps(vit, x, y, steps=3, lr=0.01)
    rebuilt = tiny_vit()
    inject_delta_lora(rebuilt, "vit-msa-mlp")
    load_lora_state(rebuilt, anchor, lora_state(vit))
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), rebuilt.state_dict().values()))


def test_load_lora_state_rejects_mismatched_keys():
    model = LeNet()
    inject_delta_lora(model, "classifier")
    anchor, state = lora_anchor(model), lora_state(model)
    with pytest.raises(ValueError, match="anchor keys"):
        load_lora_state(model, {k: v for k, v in anchor.items() if k != "fc1.lora_A"}, state)
    with pytest.raises(ValueError, match="state keys"):
        load_lora_state(model, anchor, {**state, "fc1.weight": anchor["fc1.weight"]})
    with pytest.raises(ValueError, match="no Delta-LoRA layer"):
        lora_state(LeNet())


def test_train_lenet_classifier_lora_decreases_loss_and_exports(gen):
    torch.manual_seed(0)
    model = LeNet()
    for p in model.parameters():  # only the LoRA factors train, like a fine-tune from a branch point
        p.requires_grad_(False)
    inject_delta_lora(model, "classifier")
    assert non_lora_parameters(model) == []
    frozen_conv = model.conv1.weight.clone()
    w0 = model.fc2.weight.clone()
    y = torch.randint(0, 10, (64,), generator=gen)
    x = 2 * torch.randn(10, 1, 28, 28, generator=gen)[y] + 0.5 * torch.randn(64, 1, 28, 28, generator=gen)
    losses = train_steps(model, x, y, steps=60, lr=0.1)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(model.conv1.weight, frozen_conv)
    assert not torch.equal(model.fc2.weight, w0)  # Delta-LoRA moved W
    plain = merge_delta_lora(model)
    assert all(type(plain.get_submodule(n)) is nn.Linear for n in ("fc1", "fc2", "fc3"))
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    assert linear_sites(plain) == ["fc1", "fc2", "fc3"]
    assert copy.deepcopy(model).fc1.rank == 8
