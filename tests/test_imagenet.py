"""The study's Q3: a photo's ImageNet classes, named from the weights' own metadata (torchvision's
``categories``), in process and through ``scenesweep predict --imagenet``."""
import pytest
import torch
from click.testing import CliRunner

from scenesweep.cli.main import main
from scenesweep.compute import backbone
from scenesweep.compute.imagenet import imagenet_categories, top_classes

from helpers import assert_one_error

pytestmark = pytest.mark.slow


def invoke(*args: str):
    """The CLI in this process: stdout, stderr, exit code."""
    return CliRunner().invoke(main, list(args))


def test_imagenet_top_classes_named_from_the_weights_metadata(tmp_path, flat_scenes):
    image = next(flat_scenes.glob("coast/*.png"))
    model = backbone.build_backbone("vgg16", "random", seed=0)
    state = model.state_dict()
    # fc8 answers golden retriever (207) whatever the image: weights zero, bias 20 for that class.
    state["classifier.6.weight"].zero_()
    state["classifier.6.bias"].zero_()
    state["classifier.6.bias"][207] = 20.0
    weights = tmp_path / "vgg16_golden.pt"
    torch.save(state, weights)
    (found,) = top_classes([image], weights=str(weights), image_size=32, top=3)
    assert found[0][:2] == (207, "golden retriever") and found[0][2] > 0.99
    assert [name for _, name, _ in found] == [imagenet_categories()[i] for i, _, _ in found]

    random_top = top_classes([image, image], weights="random", image_size=32)
    assert len(random_top) == 2 and len(random_top[0]) == 5 and random_top[0] == random_top[1]
    probabilities = [p for _, _, p in random_top[0]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6


def test_predict_imagenet_command(flat_scenes):
    image = next(flat_scenes.glob("forest/*.jpg"))
    result = invoke("predict", str(image), "--imagenet", "--weights", "random", "--top", "3", "--image_size", "32")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["file", "rank", "class_index", "name", "probability"] and len(lines) == 4
    names = imagenet_categories()
    for rank, line in enumerate(lines[1:], 1):
        cells = line.split()
        assert cells[0] == str(image) and cells[1] == str(rank)
        assert " ".join(cells[3:-1]) == names[int(cells[2])]

    assert_one_error(invoke("predict", str(image), "--imagenet", "--model-uri", "models:/scene-classifier@champion"),
                     "--model-uri and --imagenet exclude each other: --imagenet uses the full network, not a model")
    assert_one_error(invoke("predict", str(image), "--top", "3"), "--top: only with --imagenet")
    assert_one_error(invoke("predict", str(image), "--imagenet", "--top", "0"),
                     "top=0: expected an integer from 1 to 1000")
