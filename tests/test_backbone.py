"""Backbones: VGG's parameter count (Q1), pooling types, feature layers and their widths, weights;
then every registered family, looped over the registry, so that a new one is tested for free."""
import functools

import pytest
import torch
import torchvision

from scenesweep.compute import backbone
from scenesweep.core.backbone_families import ARCHS, FAMILIES, family_of
from scenesweep.core.config import make_config
from scenesweep.core.errors import ConfigError

from helpers import run_cli

VGG = family_of("vgg16")


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


@pytest.mark.parametrize("pooling", VGG.poolings)
def test_every_pooling_replaces_every_max_pool(pooling, images):
    model = backbone.build_backbone("vgg16", "random", pooling, seed=0)
    kinds = {type(m) for m in model.features if not isinstance(m, (torch.nn.Conv2d, torch.nn.ReLU))}
    assert kinds == {type(backbone.WINDOW_POOLINGS[pooling]())}
    with torch.inference_mode():
        conv = backbone.trunk_forward(model, images)
    assert conv.shape == (2, 512, 2, 2)  # 64 px / 2^5


@functools.lru_cache(maxsize=None)
def random_vgg16(fc_width: int) -> torch.nn.Module:
    return backbone.build_backbone("vgg16", "random", "max", fc_width=fc_width, seed=0)


@pytest.mark.parametrize("layer", VGG.taps)
@pytest.mark.parametrize("fc_width", [1024, 4096])
def test_every_layer_has_its_width(layer, fc_width, images):
    model = random_vgg16(fc_width)
    with torch.inference_mode():
        out = backbone.from_trunk(model, backbone.trunk_forward(model, images), layer)
    assert out.shape == (2, backbone.layer_width("vgg16", layer, fc_width))
    if layer.startswith("relu"):
        assert out.min() >= 0


def test_lp1_pooling_sums_windows():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = backbone.WINDOW_POOLINGS["lp1"]()(x)
    assert torch.allclose(pooled, torch.tensor([[[[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]]], dtype=torch.float32))


def test_wider_fc_layers_are_new_seeded_layers():
    a = backbone.build_backbone("vgg11", "random", fc_width=1024, seed=0)
    b = backbone.build_backbone("vgg11", "random", fc_width=1024, seed=0)
    c = backbone.build_backbone("vgg11", "random", fc_width=1024, seed=1)
    assert a.classifier[0].weight.shape == (1024, 25088)
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


# Every registered backbone, at 32 px with random weights (ViT-B/16: two 16 px patches a side).
@functools.lru_cache(maxsize=2)  # a VGG is 0.5 GB: the tests of one architecture run one after the other
def small_network(arch: str, pooling: str | None = None) -> torch.nn.Module:
    return backbone.build_backbone(arch, "random", pooling, seed=0, image_size=32)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_backbone_gives_each_tap_at_its_declared_width_for_every_pooling(arch):
    """Shapes for every pooling on the meta device (no weights drawn); values with the
    backbone's own pooling and random weights."""
    family = family_of(arch)
    with torch.inference_mode():
        for pooling in family.poolings:
            model = backbone.architecture(arch, pooling, image_size=32)
            out = backbone.trunk_forward(model, torch.empty(2, 3, 32, 32, device="meta"))
            assert out.shape[:2] == (2, family.channels[arch])
            for tap in family.taps:
                assert backbone.from_trunk(model, out, tap).shape == (2, backbone.layer_width(arch, tap)), (pooling, tap)
        model = small_network(arch)
        out = backbone.trunk_forward(model, torch.randn(2, 3, 32, 32))
        for tap in family.taps:
            features = backbone.from_trunk(model, out, tap)
            assert features.dtype == torch.float32 and torch.isfinite(features).all(), tap


@pytest.mark.parametrize("arch", ARCHS)
def test_every_backbone_counts_torchvisions_parameters_and_keeps_only_what_its_taps_need(arch):
    rows = backbone.layer_table(backbone.architecture(arch), 224)
    expected = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.meta["num_params"]
    assert sum(r.weights + r.biases for r in rows) == expected
    model = backbone.architecture(arch)
    for tap in family_of(arch).taps:
        kept = backbone.tap_state_keys(model, tap)
        # The ImageNet classifier is never stored with a servable model.
        assert kept and not any(k.startswith(("fc.", "heads.", "classifier.6.", "classifier.2.", "classifier.1."))
                                for k in kept), kept


@pytest.mark.parametrize("arch", ARCHS)
def test_every_backbone_loads_a_state_dict_file_and_names_the_file_that_does_not_fit(arch, tmp_path):
    source = small_network(arch)
    path = tmp_path / f"{arch}.pt"
    torch.save(source.state_dict(), path)
    loaded = backbone.build_backbone(arch, str(path), seed=1, image_size=32)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    other = "resnet18" if family_of(arch).name != "resnet" else "vgg11"
    torch.save(small_network(other).state_dict(), tmp_path / "other.pt")
    with pytest.raises(backbone.WeightsError, match=f"other.pt: does not fit torchvision {arch}"):
        backbone.check_weights(arch, str(tmp_path / "other.pt"))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_backbone_reads_imagenet_weights_from_torchvisions_cache_with_its_own_transform(arch, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("SCENESWEEP_OFFLINE", "1")
    checkpoint = backbone.imagenet_checkpoint(arch)
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    assert checkpoint.name == weights.url.rsplit("/", 1)[1]
    with pytest.raises(backbone.WeightsError, match=f"{checkpoint.name} not found"):
        backbone.check_weights(arch, "imagenet")
    ours, theirs = backbone.preprocessing(arch, 224), weights.transforms()
    assert (ours.crop_size, ours.resize_size, ours.interpolation) == (theirs.crop_size, theirs.resize_size,
                                                                      theirs.interpolation)


def test_vit_weights_made_at_224_px_load_at_another_size():
    """ImageNet's ViT-B/16 has 14 x 14 patch positions; at 32 px the embedding is resized to 2 x 2."""
    made_at_224 = backbone.architecture("vit_b_16").state_dict()
    model = backbone.architecture("vit_b_16", image_size=32)
    adapted = backbone.FAMILY_CODE["vit"].adapt_state(model, made_at_224)
    assert adapted["encoder.pos_embedding"].shape == (1, 1 + 2 * 2, 768)


def test_a_backbone_refuses_what_it_does_not_have_and_lists_what_it_has():
    with pytest.raises(ConfigError, match="arch='resnet99': expected one of vgg11, .*resnet50.*vit_b_16"):
        make_config("svm", {"arch": "resnet99"})
    with pytest.raises(ConfigError, match="layer='relu7': resnet50 has the feature layers layer4, pool"):
        make_config("svm", {"arch": "resnet50", "layer": "relu7"})
    with pytest.raises(ConfigError, match="pooling='lp1': resnet18 takes the poolings avg, max, lp2, gem"):
        make_config("svm", {"arch": "resnet18", "pooling": "lp1"})
    with pytest.raises(ConfigError, match="fc_width=8192: convnext_tiny has no fc6/fc7"):
        make_config("svm", {"arch": "convnext_tiny", "fc_width": 8192})
    with pytest.raises(ConfigError, match="image_size=40: vit_b_16 reads 16 px patches"):
        make_config("svm", {"arch": "vit_b_16", "image_size": 40})


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_unless_told_a_backbone_uses_its_own_pooling_and_the_features_the_study_reads(family):
    arch = family.archs[0]
    for head in ("svm", "mlp", None):
        config = make_config(head, {"arch": arch})
        assert (config.layer, config.pooling) == (family.default_tap(head), family.own_pooling)
    assert make_config("svm", {}).layer == "relu7" and make_config("mlp", {}).layer == "pool5"


def test_global_poolings_compute_what_they_say():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    pooled = {kind: backbone.GlobalPool(kind)(x).item() for kind in backbone.GlobalPool.KINDS}
    assert pooled["avg"] == 2.5 and pooled["max"] == 4.0
    assert pooled["lp2"] == pytest.approx(30 ** 0.5)
    assert pooled["gem"] == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3))
