"""One entry point (extract, svm, finetune) as one tracked MLflow run.

The setting is checked before the run starts (bad data, weights, device or cache folder: one
clear error, no run). Then: the layer table, features (cached), the run's context, the head and
its per-epoch metrics, the one test evaluation, plots, the head as a pyfunc model and, with
``register``, the servable image classifier in the registry.
"""
from __future__ import annotations

from typing import Any

import mlflow

from ..compute.backbone import setting_layer_table
from ..compute.training import RunResult, check_setting, fit_head, prepare
from ..core.config import ENTRY_HEADS, PARAMETER_BY_NAME, RunConfig, make_config
from ..models.logged import log_head_model
from ..models.registry import register_result
from ..tracking import lifecycle, mlflow_store, sink


def run_name(entry_point: str, config: RunConfig) -> str:
    """A name that says what the run is, e.g. 'svm relu7 C=0.1' or 'svm resnet50 pool C=1' (the
    architecture named unless it is the default VGG16)."""
    arch = "" if config.arch == PARAMETER_BY_NAME["arch"].default else f"{config.arch} "
    if entry_point == "svm":
        return f"svm {arch}{config.layer} C={config.C:g}" + ("" if config.fc_width == 4096 else f" fc={config.fc_width}")
    if entry_point == "finetune":
        return f"finetune {arch}{config.layer} {config.pooling} h={config.hidden} lr={config.lr:g}"
    return f"{entry_point} {arch}{config.layer} {config.pooling} {config.image_size}px"


def log_network(run_id: str, config: RunConfig) -> str:
    """The Q1 table of the configured network (from its structure alone) as ``layer_table.md``."""
    rows = setting_layer_table(config)
    return sink.log_layer_table(run_id, config, rows)


def track_single_run(entry_point: str, values: dict[str, Any], progress: bool = True,
                     register: str = "") -> tuple[str, RunResult | None]:
    """Run an entry point (extract, svm, finetune) as one tracked MLflow run.

    Bad configuration or data fails before any run is started (one clear error); the run ends as
    ``tracking.lifecycle`` says (FAILED with an ``error`` tag, KILLED on Ctrl-C).

    Returns:
        (run id, result); the result is None for ``extract``.
    """
    config = make_config(ENTRY_HEADS[entry_point], values)
    data = check_setting(config)  # bad data, weights, device or cache folder: before any run
    mlflow_store.setup_tracking()
    with lifecycle.start_run(entry_point, run_name(entry_point, config),
                             tags={"scenesweep.entry_point": entry_point}) as run:
        run_id = run.info.run_id
        log_network(run_id, config)
        prepared = prepare(config, progress=progress, data=data)
        sink.log_run_context(run_id, config, prepared, entry_point)
        if config.head is None:
            sink.log_batch(run_id, metrics={**sink.timing_metrics(prepared.features.stage_timing()),
                                            "features/dim": prepared.features.values.shape[1],
                                            "features/images": prepared.features.values.shape[0]})
            return run_id, None
        result = fit_head(prepared, config, on_epoch=sink.epoch_logger(run_id), evaluate_test=True,
                          progress=progress)
        sink.log_result(run_id, result, run_name(entry_point, config))
        mlflow.set_tag("model.head_uri", log_head_model(result))
        if register:
            register_result(run_id, result, register)
        return run_id, result
