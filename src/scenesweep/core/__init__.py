"""The bottom layer, imported by every other: names and parameters (``config``), the errors a
user can cause (``errors``), and where the stores live (``stores``). No MLflow, Optuna or click."""
