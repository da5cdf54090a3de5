"""int8 against the faster float precision: VGG16's trunk and relu7 on the CPU at hand (issue 29, item 1).

What runs (random weights, ``backbone.build_backbone("vgg16", "random")``, 224 px, batch 8 by
default), each engine on the same uint8 (B, S, S, 3) batches that scenesweep's own data path makes
(``data.load_dataset`` + ``split_dataset``, ``extractor.batches`` with the weights' resize and crop):

* ``fp32`` and ``bf16``: the project's extractor module itself (``extractor.runner``: normalisation
  in the graph, trunk channels_last, ``torch.compile`` with inductor freezing);
* ``int8-torchao``: torchao's PT2E static quantization with ``X86InductorQuantizer`` (export,
  ``prepare_pt2e``, calibrate, ``convert_pt2e``, ``torch.compile`` with freezing);
* ``int8-openvino``: ``openvino.convert_model`` of the same fp32 module, ``nncf.quantize``;
  ``fp32-openvino`` is the converted model unquantized, for reference.

Both int8 routes are calibrated on images of the TRAINING split only (``split.train``), per dataset.
Speed: the trunk on decoded tensors (decoding left out), every engine on the same first batches,
round-robin per batch so that other processes' load is shared; median ms per batch. Accuracy:
every engine's trunk output goes through the same fp32 relu7 tap (``features.layer_from_conv``),
then the project's ``SVMHead(C=1, normalize=True)`` fitted on train, scored on val and test.
The last line: does the faster int8 route reach 1.4x the faster float precision with val accuracy
within 0.5 points of fp32's? Nothing is asserted: the figures are the machine at hand's.

Environment, apart from the project's .venv (these ran here in ~2.5 min; benchmarks/int8_requirements.txt
holds the same pins: `pip install -r` it after the first two lines):

    python3.11 -m venv /work/int8-venv
    /work/int8-venv/bin/pip install torch==2.14.1 torchvision==0.29.1                      # ~110 s
    /work/int8-venv/bin/pip install "torchao==0.18.*" "openvino==2026.4.*" "nncf==3.4.*" \
        "scikit-learn==1.9.1" "numpy>=2.0,<3" "pillow>=10" psutil tqdm pyyaml                # ~30 s
    /work/int8-venv/bin/pip install -e /work/main --no-deps                                 # ~7 s

Usage (the full run; then a smoke test of every path in ~2 min):
    .venv/bin/python benchmarks/make_scenes.py /tmp/scenes --exist-ok
    /work/int8-venv/bin/python benchmarks/int8.py --data /tmp/scenes,digits
    .venv/bin/python benchmarks/make_scenes.py /tmp/scenes-small --scale 0.03 --exist-ok
    /work/int8-venv/bin/python benchmarks/int8.py --data /tmp/scenes-small,digits --image-size 32 \
        --images 60 --train-per-class 4 --calibration-images 16 --timed-batches 2
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import load_average, median, table  # noqa: E402  (puts src/ on the path when needed)

import torch  # noqa: E402

from scenesweep.compute import backbone, data, extractor, features, hardware, heads  # noqa: E402
from scenesweep.core.config import default_cache_dir  # noqa: E402
from scenesweep.core.errors import first_line  # noqa: E402

ARCH = "vgg16"
CPU = torch.device("cpu")
ENGINES = ("fp32", "bf16", "int8-torchao", "int8-openvino", "fp32-openvino")
FLOATS = ("fp32", "bf16")  # the ratio's denominator: the faster of these
INT8 = ("int8-torchao", "int8-openvino")
SPEEDUP_BAR, ACCURACY_BAR = 1.4, 0.005  # the decision: >= 1.4x, val within 0.5 points


@dataclasses.dataclass
class Engine:
    name: str
    run: Callable[[torch.Tensor], np.ndarray]  # uint8 (B, S, S, 3) -> (B, 512, S/32, S/32) float32
    prepare_s: float  # build + quantize + first call (compile)
    note: str = ""


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in block.splitlines())}


def has_vnni(info: dict[str, str]) -> bool:
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(info.get("flags", "").split()))


def machine_lines() -> list[str]:
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    shown = [f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_vnni", "amx_int8", "avx_vnni", "avx512_bf16")]
    versions = []
    for package in ("torch", "torchvision", "torchao", "openvino", "nncf"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    lines = [f"Machine: {hardware.describe(CPU)}",
             f"CPU: {info.get('model name', 'n/a')}, family {info.get('cpu family', '?')} model "
             f"{info.get('model', '?')}; {', '.join(shown)}", "Versions: " + ", ".join(versions)]
    if not has_vnni(info):
        lines.append("NOTE: no VNNI here: int8 runs on oneDNN's AVX2 u8s8 path (vpmaddubsw + vpmaddwd, no int8 "
                     "dot-product instruction); these int8 figures do NOT stand for a VNNI or AMX CPU.")
    return lines


def take(indices: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``k`` of ``indices``, stratified: the first of each class, then the second of each, ..."""
    own = labels[indices]
    rank = np.zeros(len(indices), dtype=int)
    for label in np.unique(own):
        rank[own == label] = np.arange(int((own == label).sum()))
    return np.sort(indices[np.lexsort((own, rank))[:k]])


def subset(split: data.Split, labels: np.ndarray, images: int) -> data.Split:
    """At most ``images`` of the split: val whole while it is under a third of them (the decision
    reads it), train and test trimmed in proportion, each stratified."""
    total = len(split.train) + len(split.val) + len(split.test)
    if images <= 0 or images >= total:
        return split
    val = take(split.val, labels, min(len(split.val), images // 3))
    rest = images - len(val)
    train_k = max(len(np.unique(labels[split.train])), round(rest * len(split.train) / (len(split.train) + len(split.test))))
    return data.Split(take(split.train, labels, train_k), val, take(split.test, labels, rest - train_k))


def load(source: str, args) -> tuple[data.Dataset, data.Split, np.ndarray, list[tuple[torch.Tensor, int]], list[torch.Tensor]]:
    """(dataset, split, image order, decoded batches (uint8 (B, S, S, 3), real images), calibration batches)."""
    dataset = data.load_dataset(source, train_per_class=args.train_per_class, seed=0, cache_dir=args.cache_dir)
    split = subset(data.split_dataset(dataset, val_fraction=0.2, seed=0), dataset.labels, args.images)
    order = np.concatenate([split.train, split.val, split.test])
    resize, crop, interpolation = extractor.transform_sizes(ARCH, args.image_size)  # the weights' own transform

    def decode(indices: np.ndarray) -> list[tuple[torch.Tensor, int]]:
        return [(pixels, real) for pixels, real, _ in
                extractor.batches(dataset, indices, args.batch_size, resize, crop, interpolation=interpolation)]

    # Calibration comes from split.train only: never a validation or test image.
    calibration_ids = take(split.train, dataset.labels, args.calibration_images)
    assert not set(calibration_ids) & set(np.concatenate([split.val, split.test])), "calibration leaks val/test"
    return dataset, split, order, decode(order), [pixels for pixels, _ in decode(calibration_ids)]


def first_call(run: Callable, example: torch.Tensor, began: float, name: str, note: str = "") -> Engine:
    run(example)  # compiles (torch) or warms up (OpenVINO)
    return Engine(name, run, time.perf_counter() - began, note)


def torch_run(module: torch.nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    def run(pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():  # as extractor.run_batches calls it
            return module(pixels).float().numpy()  # (B, 512, S/32, S/32)
    return run


def torch_float(precision: str, calibration: list[torch.Tensor], args) -> Engine:
    """The project's extractor module (normalisation + trunk, channels_last), compiled with freezing."""
    began = time.perf_counter()
    module, mode = extractor.runner(backbone.build_backbone(ARCH, "random"), ARCH, CPU, precision, True, args.cache_dir)
    return first_call(torch_run(module), calibration[0], began, precision, mode)


def quantized_ops(graph_module: torch.fx.GraphModule) -> str:
    """'conv2d 13/13, ...': each op's count and how many read an int8 input (a dequantize node)."""
    counts: dict[str, list[int]] = {}
    for node in graph_module.graph.nodes:
        name = str(node.target).split(".")[-2] if node.op == "call_function" and "aten." in str(node.target) else ""
        if name in ("conv2d", "max_pool2d", "linear", "adaptive_avg_pool2d"):  # ReLU: fused into its conv
            source = node.args[0]
            counts.setdefault(name, [0, 0])[0] += 1
            counts[name][1] += isinstance(source, torch.fx.Node) and "dequantize" in str(source.target)
    return ", ".join(f"{name} {done}/{total} int8 in" for name, (total, done) in counts.items())


def torchao_int8(calibration: list[torch.Tensor], args) -> Engine:
    """PT2E: export the fp32 extractor module, observe on calibration batches, convert, compile."""
    from torch._dynamo.utils import counters
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    began = time.perf_counter()
    module, _ = extractor.runner(backbone.build_backbone(ARCH, "random"), ARCH, CPU, "fp32", False, args.cache_dir)
    exported = torch.export.export(module, (calibration[0],)).module()  # uint8 (B, S, S, 3) in
    # torchao's advice: 7-bit activations on CPUs without VNNI, where u8 x s8 pairs can saturate int16.
    config = xiq.get_default_x86_inductor_quantization_config(reduce_range=args.reduce_range)
    prepared = prepare_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)  # HistogramObserver on every conv input
    converted = convert_pt2e(prepared)
    ops = quantized_ops(converted)
    inductor_config.freezing = True  # int8 conv lowering to oneDNN qconv needs frozen weights
    counters.clear()
    engine = first_call(torch_run(torch.compile(converted)), calibration[0], began, "int8-torchao")
    fused = {k: v for k, v in counters["inductor"].items() if k.startswith("q") and k.endswith("matcher_count")}
    engine.note = f"reduce_range={args.reduce_range}; {ops}; inductor: " + (
        ", ".join(f"{k}={v}" for k, v in sorted(fused.items())) or "no int8 pattern counted")
    return engine


def openvino_engine(calibration: list[torch.Tensor], args, int8: bool) -> Engine:
    """The fp32 extractor module converted to OpenVINO (uint8 (B, S, S, 3) in), NNCF-quantized if ``int8``."""
    import openvino as ov

    began = time.perf_counter()
    module, _ = extractor.runner(backbone.build_backbone(ARCH, "random"), ARCH, CPU, "fp32", False, args.cache_dir)
    # From torch.export's program (static shape, uint8 in), not the deprecated TorchScript trace.
    model = ov.convert_model(torch.export.export(module, (calibration[0],)))
    note = ""
    if int8:
        import nncf

        batches = [batch.numpy() for batch in calibration]
        model = nncf.quantize(model, nncf.Dataset(batches), preset=nncf.QuantizationPreset.PERFORMANCE,
                              subset_size=len(batches))  # subset_size counts dataset items: batches
        note = "NNCF PTQ, preset performance, overflow_fix first_layer (its default: 7-bit first-conv weights)"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(pixels: torch.Tensor) -> np.ndarray:
        request.infer({0: pixels.numpy()})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)  # a copy: (B, 512, S/32, S/32)

    return first_call(run, calibration[0], began, "int8-openvino" if int8 else "fp32-openvino", note)


BUILDERS = {"fp32": lambda c, a: torch_float("fp32", c, a), "bf16": lambda c, a: torch_float("bf16", c, a),
            "int8-torchao": torchao_int8, "int8-openvino": lambda c, a: openvino_engine(c, a, True),
            "fp32-openvino": lambda c, a: openvino_engine(c, a, False)}


def build(names: list[str], calibration: list[torch.Tensor], args, skipped: dict[str, str]) -> dict[str, Engine]:
    """Each engine, or ``skipped[name]`` saying why not (a missing package, a failed quantize/compile)."""
    engines = {}
    for name in names:
        try:
            engines[name] = BUILDERS[name](calibration, args)
            print(f"  {name}: ready in {engines[name].prepare_s:.1f} s {engines[name].note}".rstrip(), flush=True)
        except ImportError as error:
            skipped[name] = f"not importable ({error})"
        except Exception as error:  # noqa: BLE001  (an engine that fails is reported, the others go on)
            skipped[name] = f"{error.__class__.__name__}: {first_line(error, 160)}"
        if name in skipped:
            print(f"  {name}: skipped: {skipped[name]}", flush=True)
    return engines


def run_pass(engines: dict[str, Engine], batches: list[tuple[torch.Tensor, int]], timed: int, repeats: int,
             accuracy: set[str]) -> tuple[dict[str, np.ndarray], dict[str, list[float]]]:
    """Round-robin per batch: every engine on the first ``timed`` batches (each ``repeats`` times,
    timed), then only the ``accuracy`` engines on the rest. Returns trunk outputs (N, 512, h, w) and seconds per call."""
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in engines}
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for index, (pixels, real) in enumerate(batches):
        for name, engine in engines.items():
            if index >= timed and name not in accuracy:
                continue
            for _ in range(repeats if index < timed else 1):
                began = time.perf_counter()
                out = engine.run(pixels)
                if index < timed:
                    seconds[name].append(time.perf_counter() - began)
            outputs[name].append(out[:real])  # the padded last batch cut back
    return {name: np.concatenate(parts) for name, parts in outputs.items() if parts}, seconds


def evaluate(trunk_out: dict[str, np.ndarray], labels: np.ndarray, split: data.Split, tap_model) -> dict[str, dict]:
    """relu7 from each engine's trunk output (the same fp32 tap), cosine against fp32 per image, SVM val/test."""
    n_train, n_val = len(split.train), len(split.val)
    y = labels[np.concatenate([split.train, split.val, split.test])]
    relu7 = {name: features.layer_from_conv(tap_model, out, "relu7", CPU, "fp32") for name, out in trunk_out.items()}
    reference = relu7["fp32"].astype(np.float64)  # (N, 4096)
    predictions, results = {}, {}
    for name, x in relu7.items():
        n = min(len(x), len(reference))
        x64 = x[:n].astype(np.float64)
        cos = np.sum(x64 * reference[:n], 1) / (np.linalg.norm(x64, axis=1) * np.linalg.norm(reference[:n], axis=1) + 1e-30)
        result = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "images": n}
        if n == len(y):
            head = heads.SVMHead(C=1.0, normalize=True).fit(x[:n_train], y[:n_train])
            predictions[name] = head.predict(x[n_train:])  # val then test
            result["val"] = float(np.mean(predictions[name][:n_val] == y[n_train:n_train + n_val]))
            result["test"] = float(np.mean(predictions[name][n_val:] == y[n_train + n_val:]))
            result["val_changed"] = int(np.sum(predictions[name][:n_val] != predictions["fp32"][:n_val]))
        results[name] = result
    return results


def speed_table(engines: dict[str, Engine], seconds: dict[str, list[float]], args) -> dict[str, float]:
    speed = {name: args.batch_size / median(s) for name, s in seconds.items() if s}
    faster = max((speed[n] for n in FLOATS if n in speed), default=float("nan"))
    print(table(["engine", "median ms/batch", "best ms", "images/s", "/ faster float", "prepare s", "calls"],
                [[name, f"{median(seconds[name]) * 1e3:.0f}", f"{min(seconds[name]) * 1e3:.0f}", f"{speed[name]:.2f}",
                  f"{speed[name] / faster:.2f}x", f"{engines[name].prepare_s:.1f}", len(seconds[name])]
                 for name in speed]))
    return speed


def accuracy_table(results: dict[str, dict]) -> None:
    pct = lambda r, key: f"{100 * r[key]:.2f}" if key in r else "-"  # noqa: E731
    print(table(["engine", "relu7 cos mean", "cos min", "images", "val acc %", "test acc %", "val preds != fp32"],
                [[name, f"{r['cos_mean']:.6f}", f"{r['cos_min']:.6f}", r["images"], pct(r, "val"), pct(r, "test"),
                  r.get("val_changed", "-")] for name, r in results.items()]))


def decision(speed: dict[str, float], accuracy: dict[str, dict[str, dict]]) -> str:
    floats = {n: speed[n] for n in FLOATS if n in speed}
    ints = {n: speed[n] for n in INT8 if n in speed}
    if not ints or not floats:
        return "DECISION: no int8 route ran; nothing to decide (see the skipped lines)"
    best_float, best = max(floats, key=floats.get), max(ints, key=ints.get)
    ratio = ints[best] / floats[best_float]
    gaps = {data_name: r[best]["val"] - r["fp32"]["val"] for data_name, r in accuracy.items() if "val" in r.get(best, {})}
    fast, close = ratio >= SPEEDUP_BAR, bool(gaps) and all(abs(g) <= ACCURACY_BAR for g in gaps.values())
    shown = ", ".join(f"{name} {100 * gap:+.2f} points" for name, gap in gaps.items()) or "not measured"
    return (f"DECISION: the faster int8 route is {best} at {ratio:.2f}x the faster float ({best_float}) "
            f"[bar {SPEEDUP_BAR}x: {'met' if fast else 'NOT met'}]; val accuracy against fp32: {shown} "
            f"[bar {100 * ACCURACY_BAR:.1f} points: {'met' if close else 'NOT met'}] -> "
            f"{'YES: worth pursuing' if fast and close else 'NO'} on this machine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="/tmp/scenes,digits",
                        help="datasets, comma-separated: folders (benchmarks/make_scenes.py) or 'digits'; timed on the first")
    parser.add_argument("--image-size", type=int, default=224, help="VGG input side in pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (the last one padded)")
    parser.add_argument("--images", type=int, default=900, help="per dataset (0: all); val whole while under a third")
    parser.add_argument("--train-per-class", type=int, default=100, help="the study's split of a flat folder")
    parser.add_argument("--calibration-images", type=int, default=64, help="from the training split only")
    parser.add_argument("--timed-batches", type=int, default=16, help="first batches every engine is timed on")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per timed batch and engine")
    parser.add_argument("--engines", default=",".join(ENGINES), help="a subset, with fp32 (the reference)")
    parser.add_argument("--bf16-accuracy", choices=("auto", "on", "off"), default="auto",
                        help="bf16 on every image (auto: where oneDNN has native bf16; else the timed batches only)")
    parser.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                        help="torchao's 7-bit activations (auto: on without VNNI, as torchao advises)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="digits and inductor's cache")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "fp32" not in args.engines or set(args.engines) - set(ENGINES):
        parser.error(f"--engines: a subset of {','.join(ENGINES)} that includes fp32")
    if args.image_size < 32 or args.batch_size < 1 or args.timed_batches < 1 or args.repeats < 1:
        parser.error("expected --image-size >= 32, --batch-size, --timed-batches and --repeats >= 1")
    args.reduce_range = args.reduce_range == "on" or (args.reduce_range == "auto" and not has_vnni(cpu_info()))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    print("scenesweep int8 benchmark: VGG16 trunk + relu7, RANDOM weights (timings representative, accuracies "
          "those of an untrained network)", *machine_lines(), f"Load average at start: {load_average()}", sep="\n")
    print(f"Settings: {args.image_size} px, batch {args.batch_size}, {args.timed_batches} timed batches x "
          f"{args.repeats} per engine (round-robin), {args.calibration_images} calibration images from split.train")
    bf16_accuracy = args.bf16_accuracy == "on" or (args.bf16_accuracy == "auto" and hardware.cpu_has_native_bf16())
    tap_model = backbone.build_backbone(ARCH, "random")  # fc6/fc7 in fp32 for every engine's relu7
    skipped: dict[str, str] = {}
    floats: dict[str, Engine] = {}
    speed, accuracy = {}, {}
    for source in (s.strip() for s in args.data.split(",") if s.strip()):
        try:
            dataset, split, order, batches, calibration = load(source, args)
        except data.DataError as error:
            print(f"\n{source}: skipped: {error}" + ("" if source == "digits" else
                  f" (make it: .venv/bin/python benchmarks/make_scenes.py {source} --exist-ok)"))
            continue
        print(f"\n{source}: {len(order)} images (train {len(split.train)}, val {len(split.val)}, test {len(split.test)}), "
              f"{len(dataset.classes)} classes, {len(calibration)} calibration batches; building engines")
        if not floats:  # the float engines hold no calibration: built once
            floats = build([n for n in args.engines if n in FLOATS or n == "fp32-openvino"], calibration, args, skipped)
            if "fp32" not in floats:
                return 1  # the reference failed: its line above says why
        engines = {**floats, **build([n for n in args.engines if n in INT8], calibration, args, skipped)}
        engines = {n: engines[n] for n in ENGINES if n in engines}
        with_accuracy = {n for n in engines if n != "bf16" or bf16_accuracy}
        timed = 0 if speed else args.timed_batches  # speed is timed on the first dataset that loads
        trunk_out, seconds = run_pass(engines, batches, timed, args.repeats, with_accuracy)
        if timed:
            print(f"Speed on {source}: trunk on decoded uint8 batches, {args.image_size} px, batch {args.batch_size}")
            speed = speed_table(engines, seconds, args)
        accuracy[source] = evaluate(trunk_out, dataset.labels, split, tap_model)
        print(f"Accuracy on {source}: relu7 (fp32 fc6/fc7 on each engine's trunk output), SVMHead(C=1, normalize=True)")
        accuracy_table(accuracy[source])
        if timed and "bf16" in engines and not bf16_accuracy:
            print("  bf16: the timed batches only (no native bf16 here: --bf16-accuracy on runs every image)")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"\nLoad average at end: {load_average()}; {time.perf_counter() - began:.0f} s in all")
    print(decision(speed, accuracy) + ("" if has_vnni(cpu_info()) else " (no VNNI: int8 here is not what a VNNI CPU gets)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
