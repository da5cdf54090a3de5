"""The ``scenesweep`` command (``scenesweep.cli.main:main``): the group and every command module.

Each module of this package adds its commands to the group (``@main.command``); importing them
here is what registers them.
"""
from . import experiments, model_commands, report, run_commands, serve, services, ui  # noqa: F401  (they register commands)
from .group import main

if __name__ == "__main__":
    main()
