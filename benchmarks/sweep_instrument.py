"""Instrumentation of benchmarks/sweep.py: the wall time of every feature computation, split
into backbone build, convolutions and fc layers, and the matching of those timings to trial runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterator


@dataclasses.dataclass
class FeatureTiming:
    """Wall time of one ``compute_features`` call, split into the stages that cost.

    Attributes:
        key: cache key of the layer entry it returned (a trial's ``cache_key`` param).
        layer, fc_width, pooling: what was asked for.
        total_s: the whole call (cache reads and writes included).
        build_s: building the backbone (random init of every layer: grows with fc_width).
        conv_s: the convolutional part over every image, image decoding included.
        fc_s: pool5 -> fc6/fc7 from the conv output (``features.layer_from_conv``).
        hit, conv_hit: the layer / conv entry came from the cache.
    """

    layer: str
    fc_width: int
    pooling: str
    key: str = ""
    total_s: float = 0.0
    build_s: float = 0.0
    conv_s: float = 0.0
    fc_s: float = 0.0
    hit: bool = False
    conv_hit: bool = False


class Instrument:
    """Times the stages of every feature computation, in whatever code path calls it.

    scenesweep records per-batch conv timings (warm-up batches left out) but not the wall time
    of the fc layers or of building the backbone, which is what sweep_fc saves or pays: so the
    benchmark wraps those functions while it runs. The wrappers only read the clock.
    """

    def __init__(self) -> None:
        self.records: list[FeatureTiming] = []
        self._current: FeatureTiming | None = None

    def _stage(self, attribute: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if self._current is not None:
                    setattr(self._current, attribute,
                            getattr(self._current, attribute) + time.perf_counter() - began)

        return timed

    @contextlib.contextmanager
    def active(self) -> Iterator["Instrument"]:
        """Install the wrappers; restore the originals on exit."""
        from scenesweep.compute import backbone, features, training

        # training imported compute_features by name, so it is patched there; features calls
        # extract_conv / layer_from_conv / backbone.build_backbone through module globals.
        originals = [(training, "compute_features"), (features, "extract_conv"),
                     (features, "layer_from_conv"), (backbone, "build_backbone")]
        saved = [(module, name, getattr(module, name)) for module, name in originals]
        compute = training.compute_features

        def compute_features(config, dataset, progress=True, **kwargs):
            record = FeatureTiming(config.layer, config.fc_width, config.pooling)
            self._current = record
            began = time.perf_counter()
            try:
                result = compute(config, dataset, progress=progress, **kwargs)
            finally:
                self._current = None
                record.total_s = time.perf_counter() - began
            record.key, record.hit, record.conv_hit = result.key, result.hit, result.conv_hit
            self.records.append(record)
            return result

        training.compute_features = compute_features
        features.extract_conv = self._stage("conv_s", features.extract_conv)
        features.layer_from_conv = self._stage("fc_s", features.layer_from_conv)
        backbone.build_backbone = self._stage("build_s", backbone.build_backbone)
        try:
            yield self
        finally:
            for module, name, value in saved:
                setattr(module, name, value)

    def since(self, start: int) -> list[FeatureTiming]:
        return self.records[start:]


def match_records(children: list, records: list[FeatureTiming]) -> dict[str, FeatureTiming]:
    """{run id: its feature timing}: trials call compute_features in trial order (n_jobs=1),
    so each child takes the next unused record with its ``cache_key``."""
    matched, used = {}, set()
    for child in children:
        key = child.data.tags.get("cache_key") or child.data.params.get("cache_key")
        for index, record in enumerate(records):
            if index not in used and record.key == key:
                matched[child.info.run_id] = record
                used.add(index)
                break
    return matched

