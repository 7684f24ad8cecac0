"""Model zoo: every model builds and maps a batch to [N, num_classes]."""
import time

import pytest
import torch
from torch import nn

from raybranch.models import MODEL_NAMES, ModelConfigError, WeightsNotFoundError, build_model, vit_patch_size

torch.set_num_threads(2)
SMALL = ["lenet5", "lenet5-tanh", "resnet-small", "alexnet-small", "vgg16-small", "vit-tiny", "vit-small"]


def test_registry_lists_every_model():
    assert set(MODEL_NAMES) == {*SMALL, "vgg16", "resnet50", "vit_b_16"}


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 7)])
def test_small_models_forward(name, channels, size, classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, in_channels=channels, image_size=size)
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, classes) and bool(torch.isfinite(out).all())
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert has_bn == (name == "resnet-small")  # the report's models have no BatchNorm; the codec benchmark's ResNet does


def test_lenet5_tanh_is_lecuns():
    model = build_model("lenet5-tanh")
    assert sum(p.numel() for p in model.parameters()) == 61706
    assert {type(m) for m in model.modules()} >= {nn.Tanh, nn.AvgPool2d} and not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in model.modules())


def test_resnet_small_has_skips_and_integer_buffers():
    sd = build_model("resnet-small").state_dict()
    assert any(k.endswith("num_batches_tracked") and not v.is_floating_point() for k, v in sd.items())
    assert any("shortcut" in k for k in sd)
    with pytest.raises(Exception, match="too small"):
        build_model("resnet-small", image_size=2)


def test_lenet5_is_the_classic_one():
    model = build_model("lenet5")
    assert sum(p.numel() for p in model.parameters()) == 61706  # LeNet-5 at 28 px with padding 2
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [6, 16]
    assert [lin.out_features for lin in linears] == [120, 84, 10]


def test_vit_configs_follow_the_report():
    tiny, small = build_model("vit-tiny"), build_model("vit-small")
    assert (tiny.hidden_dim, tiny.mlp_dim, len(tiny.encoder.layers), tiny.encoder.layers[0].self_attention.num_heads) == (8, 24, 2, 2)
    assert (small.hidden_dim, small.mlp_dim, len(small.encoder.layers), small.encoder.layers[0].self_attention.num_heads) == (512, 2048, 8, 8)
    assert tiny.patch_size == 4 and vit_patch_size(32) == 4 and vit_patch_size(224) == 16


def test_vgg16_small_trains_on_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model("vgg16-small")
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "vit_b_16"])
def test_torchvision_full_models_forward_at_224(name):
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(name, num_classes=10, in_channels=3, image_size=224).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 10)
    assert time.perf_counter() - start < 20


def test_one_channel_stem_for_full_models():
    model = build_model("resnet50", num_classes=4, in_channels=1, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)


def test_pretrained_reads_only_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        build_model("resnet50", pretrained=True)
    assert str(tmp_path) in str(err.value) and "https://" in str(err.value)
    # a cached ImageNet-shaped state dict is loaded, its stem summed to 1 channel, its head replaced
    torch.manual_seed(1)
    imagenet = build_model("resnet50", num_classes=1000, in_channels=3, image_size=224).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet, tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth")
    model = build_model("resnet50", num_classes=5, in_channels=1, pretrained=True)
    state = model.state_dict()
    torch.testing.assert_close(state["conv1.weight"], imagenet["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(state["layer4.2.conv3.weight"], imagenet["layer4.2.conv3.weight"])
    assert state["fc.weight"].shape == (5, 2048)


def test_bad_requests_are_errors():
    with pytest.raises(ModelConfigError, match="unknown model 'resnet18'"):
        build_model("resnet18")
    with pytest.raises(ModelConfigError, match="no pretrained weights"):
        build_model("lenet5", pretrained=True)
    with pytest.raises(ModelConfigError, match="multiple of the 16 px patch"):
        build_model("vit_b_16", image_size=28)
    with pytest.raises(ModelConfigError, match="too small"):
        build_model("lenet5", image_size=8)
