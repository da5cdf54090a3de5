"""MLflow tracking, a leaf below the drivers: which store and its experiments (``mlflow_store``),
how a run starts and ends (``lifecycle``), what a run ran on and with (``provenance``), figures
(``plots``) and the one sink that logs what it is handed (``sink``). It imports nothing of search,
models, runs or report. ``sqlite_plugin`` is the MLflow store plugin.
Kept empty: MLflow imports ``sqlite_plugin`` while it starts."""
