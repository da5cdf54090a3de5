"""Fast on whatever machine it lands on: ``precision=auto`` follows what this machine measures, and
every run says which CPU it ran on in enough detail to explain its timings."""
import pytest
import torch

from scenesweep.compute import backbone, feature_cache, precision
from scenesweep.compute.training import fit_head, prepare
from scenesweep.core.config import make_config
from scenesweep.core.machine import hardware_summary, parse_cpuinfo

CPU = torch.device("cpu")

# The first processor's block of /proc/cpuinfo on the two machines of FACTS.md (flags shortened).
NO_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni avx512_fp16

processor\t: 1
vendor_id\t: GenuineIntel
"""
AMX = NO_AMX.replace("model\t\t: 207", "model\t\t: 143").replace("avx512_fp16", "avx512_fp16 amx_bf16 amx_tile amx_int8")


@pytest.fixture(autouse=True)
def _no_memo():
    precision._MEMO.clear()
    yield
    precision._MEMO.clear()


def injected(figures, calls):
    def measure():
        calls.append(figures)
        return dict(figures)
    return measure


@pytest.mark.parametrize("figures, expected", [
    ({"fp32": 7.9, "bf16": 5.4}, "fp32"),     # AVX-512 BF16 without AMX (FACTS: 0.69x)
    ({"fp32": 9.8, "bf16": 62.1}, "bf16"),    # AMX
    ({"fp32": 10.0, "bf16": 10.5}, "fp32"),   # a tie is not worth bf16's rounding
])
def test_auto_takes_the_faster_precision_as_measured(figures, expected, tmp_path):
    calls = []
    choice = precision.choose("auto", {"stage": "extraction"}, "img/s", CPU, tmp_path, injected(figures, calls))
    assert choice.precision == expected and choice.source == "measured" and len(calls) == 1
    other = "bf16" if expected == "fp32" else "fp32"
    assert choice.reason.startswith(f"{expected}: {figures[expected]:.1f} vs {other} {figures[other]:.1f} img/s")


def test_the_measurement_is_kept_per_machine_and_reused(tmp_path, monkeypatch):
    calls = []
    measure = injected({"fp32": 7.9, "bf16": 5.4}, calls)
    precision.choose("auto", {"stage": "extraction", "image_size": 224}, "img/s", CPU, tmp_path, measure)
    precision._MEMO.clear()  # a new process
    again = precision.choose("auto", {"stage": "extraction", "image_size": 224}, "img/s", CPU, tmp_path, measure)
    assert again.source == "cached" and "cached" in again.reason and len(calls) == 1
    assert len(list((tmp_path / "precision").glob("*.json"))) == 1
    # Other shapes, or another CPU with the same cache folder: measured again.
    precision.choose("auto", {"stage": "extraction", "image_size": 64}, "img/s", CPU, tmp_path, measure)
    assert len(calls) == 2
    identity = precision.machine_identity(CPU)
    # Another CPU: flags this one lacks (an AVX2-only CPU says "avx2 fma" itself).
    monkeypatch.setattr(precision, "machine_identity",
                        lambda device: {**identity, "cpu_flags": identity["cpu_flags"] + " amx_tile another-cpu"})
    precision._MEMO.clear()
    precision.choose("auto", {"stage": "extraction", "image_size": 224}, "img/s", CPU, tmp_path, measure)
    assert len(calls) == 3


def test_a_damaged_record_is_measured_again(tmp_path):
    calls = []
    measure = injected({"fp32": 1.0, "bf16": 3.0}, calls)
    precision.choose("auto", {"stage": "head"}, "steps/s", CPU, tmp_path, measure)
    for path in (tmp_path / "precision").glob("*.json"):
        path.write_text("{not json")
    precision._MEMO.clear()
    assert precision.choose("auto", {"stage": "head"}, "steps/s", CPU, tmp_path, measure).source == "measured"
    assert len(calls) == 2


@pytest.mark.parametrize("given", ["fp32", "bf16"])
def test_an_explicit_precision_is_obeyed_without_measuring(given, tmp_path):
    calls = []
    choice = precision.choose(given, {"stage": "extraction"}, "img/s", CPU, tmp_path, injected({"fp32": 1, "bf16": 9}, calls))
    assert choice.precision == given and choice.source == "given" and not calls


@pytest.mark.parametrize("figures, expected", [({"fp32": 7.9, "bf16": 5.4}, "fp32"), ({"fp32": 9.8, "bf16": 62.1}, "bf16")])
def test_extraction_runs_in_the_measured_precision_and_its_cache_key_says_so(figures, expected, flat_scenes, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(precision, "measure_convs", lambda shapes, device: dict(figures))
    config = make_config("svm", {"data": str(flat_scenes), "train_per_class": 10, "image_size": 32,
                                 "cache_dir": str(tmp_path / "cache")})
    got = prepare(config, progress=False).features
    assert got.precision == expected and got.precision_reason.startswith(expected)
    dataset = prepare(config, progress=False).dataset
    assert got.conv_key == feature_cache.cache_key(feature_cache.conv_key_parts(config, dataset, expected))


def test_the_probe_times_every_distinct_conv_shape_of_the_network():
    shapes = precision.conv_shapes(backbone.architecture("vgg16").features, 224, 8)
    assert [s.name for s in shapes][:3] == ["conv1_1", "conv1_2", "conv2_1"] and len(shapes) == 13
    assert len({s.signature for s in shapes}) == 9  # conv3_3 = conv3_2, conv4_3 = conv4_2, conv5_1..3
    assert sum(s.gflop for s in shapes) == pytest.approx(245.5, abs=0.5)  # floor.py's sum at 224, batch 8
    speed = precision.measure_convs(precision.conv_shapes(backbone.architecture("vgg11").features, 32, 2), CPU)
    assert set(speed) == {"fp32", "bf16"} and all(v > 0 for v in speed.values())


def test_an_mlp_head_trains_in_the_measured_precision(flat_scenes, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "measure_head_steps", lambda widths, batch, device: {"fp32": 1.0, "bf16": 2.0})
    config = make_config("mlp", {"data": str(flat_scenes), "train_per_class": 10, "image_size": 32, "layer": "pool5",
                                 "hidden": "16", "epochs": 2, "cache_dir": str(tmp_path / "cache")})
    result = fit_head(prepare(config, progress=False), config)
    assert result.head_precision.precision == "bf16" and result.head.precision == "bf16"
    assert result.metrics["val/acc"] >= 0  # trained under bf16 autocast, weights stay fp32
    assert next(result.head.model_.parameters()).dtype == torch.float32


def test_the_cpu_is_named_by_model_and_speed_flags_when_its_brand_is_generic():
    no_amx, amx = parse_cpuinfo(NO_AMX), parse_cpuinfo(AMX)
    assert no_amx.name == "Intel(R) Xeon(R) Processor (GenuineIntel family 6 model 207 stepping 2)"
    assert no_amx.flags_text() == "avx512_bf16 avx512_fp16 avx512_vnni avx512f avx_vnni avx2 fma"
    assert not no_amx.has_amx and amx.has_amx and amx.flags[:3] == ("amx_bf16", "amx_tile", "amx_int8")
    assert no_amx.as_dict()["cpu_amx"] == "false"
    line = hardware_summary({**amx.as_dict(), "cpu_capability": "AVX512", "torch": "2.14.1",
                             "cpu_cores_logical": "2", "torch_threads": "2", "memory_gib": "23.5", "device": "cpu"})
    assert "model 143" in line and "amx_bf16" in line and "torch 2.14.1 AVX512" in line
