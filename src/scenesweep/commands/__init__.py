"""Sub-commands of ``scenesweep`` beyond the pipeline stages, one module per area.

Each module here adds its commands to ``scenesweep.cli.main`` with ``@main.command``; the CLI
imports every module of this package, so a new module needs no other registration.
"""
import importlib
import pkgutil


def load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
