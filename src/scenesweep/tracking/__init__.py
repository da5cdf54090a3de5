"""MLflow tracking, a leaf below the drivers: the store (``store``), what a run ran on and with
(``provenance``), figures (``plots``) and the one sink that logs what it is handed (``sink``).
It imports nothing of search, models, runs or report. ``sqlite_store`` is the MLflow store plugin.
Kept empty: MLflow imports ``sqlite_store`` while it starts."""
