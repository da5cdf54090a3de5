"""The VGG backbone: parameter count (Q1), pooling types, feature layers and their widths, weights."""
import functools

import pytest
import torch
import torchvision

from scenesweep.compute import backbone
from scenesweep.core.config import LAYERS, POOLINGS

from conftest import run_cli


def test_vgg16_has_138_357_544_parameters_as_in_the_study():
    rows = backbone.layer_table(backbone.architecture("vgg16"), 224)
    assert sum(r.weights for r in rows) == 138_344_128
    assert sum(r.biases for r in rows) == 13_416
    assert sum(r.weights + r.biases for r in rows) == torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["num_params"]


def test_describe_prints_the_q1_table():
    result = run_cli("describe")
    assert result.returncode == 0, result.stderr
    assert "138,357,544 parameters" in result.stdout
    assert "| fc6 | Fully connected | 25088 | 4096 | 102,760,448 | 4,096 | 1 x 4096 |" in result.stdout
    assert "| conv1_1 | Convolution | 3 | 64 | 1,728 | 64 | 224 x 224 |" in result.stdout


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_pooling_replaces_every_max_pool(pooling, images):
    model = backbone.build_backbone("vgg16", "random", pooling, seed=0)
    kinds = {type(m) for m in model.features if not isinstance(m, (torch.nn.Conv2d, torch.nn.ReLU))}
    assert kinds == {type(backbone.POOLING_LAYERS[pooling]())}
    with torch.inference_mode():
        conv = backbone.conv(model, images)
    assert conv.shape == (2, 512, 2, 2)  # 64 px / 2^5


@functools.lru_cache(maxsize=None)
def random_vgg16(fc_width: int) -> torch.nn.Module:
    return backbone.build_backbone("vgg16", "random", "max", fc_width=fc_width, seed=0)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fc_width", [1024, 4096])
def test_every_layer_has_its_width(layer, fc_width, images):
    model = random_vgg16(fc_width)
    with torch.inference_mode():
        out = backbone.from_conv(model, backbone.conv(model, images), layer)
    assert out.shape == (2, backbone.layer_width(layer, fc_width))
    if layer.startswith("relu"):
        assert out.min() >= 0


def test_lp1_pooling_sums_windows():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = backbone.POOLING_LAYERS["lp1"]()(x)
    assert torch.allclose(pooled, torch.tensor([[[[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]]], dtype=torch.float32))


def test_wider_fc_layers_are_new_seeded_layers():
    a = backbone.build_backbone("vgg16", "random", fc_width=8192, seed=0)
    b = backbone.build_backbone("vgg16", "random", fc_width=8192, seed=0)
    c = backbone.build_backbone("vgg16", "random", fc_width=8192, seed=1)
    assert a.classifier[0].weight.shape == (8192, 25088)
    assert torch.equal(a.classifier[0].weight, b.classifier[0].weight)
    assert not torch.equal(a.classifier[0].weight, c.classifier[0].weight)


def test_weights_from_a_state_dict_file(tmp_path):
    source = backbone.build_backbone("vgg16", "random", seed=7)
    path = tmp_path / "vgg16.pt"
    torch.save(source.state_dict(), path)
    loaded = backbone.build_backbone("vgg16", str(path), seed=0)
    assert torch.equal(loaded.features[0].weight, source.features[0].weight)
    assert backbone.weights_identity(str(path), "vgg16", 0).startswith("vgg16:file:sha256=")


def test_imagenet_weights_are_read_from_torchvisions_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoint = backbone.imagenet_checkpoint("vgg16")
    assert checkpoint.name == "vgg16-397923af.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save(backbone.build_backbone("vgg16", "random", seed=3).state_dict(), checkpoint)
    model = backbone.build_backbone("vgg16", "imagenet", seed=0)
    assert torch.equal(model.features[0].weight, torch.load(checkpoint)["features.0.weight"])


def test_missing_imagenet_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(backbone.WeightsError, match="vgg16-397923af.pth.*weights=<path>"):
        backbone.build_backbone("vgg16", "imagenet")


def test_preprocessing_is_the_weights_own_transform_at_224():
    ours = backbone.preprocessing("vgg16", 224)
    theirs = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms()
    assert (ours.crop_size, ours.resize_size, ours.mean, ours.std) == (theirs.crop_size, theirs.resize_size, theirs.mean, theirs.std)
    assert backbone.preprocessing("vgg16", 32).crop_size == [32]
