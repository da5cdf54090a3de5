"""The bottom layer, imported by every other: names and parameters (``config``), backbone
families as data (``backbones``), the errors a user can cause (``errors``), where the stores live
(``store_urls``), the machine (``machine``), disk space, fault moments for tests (``faults``) and
progress bars. No MLflow, Optuna or click."""
