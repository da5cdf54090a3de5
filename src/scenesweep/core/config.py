"""Registries of names and the one table of run parameters.

Every swappable piece has a name (heads and precisions here; pooling types, feature layers and
architectures in ``core.backbone_families``), and
every run parameter is declared once in ``PARAMETERS``: the CLI options, the MLproject entry
points, the study files' search spaces and the experiment files all use these names and
nothing else. This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

from . import backbone_families
from .errors import ConfigError

# Pooling types, feature layers (taps) and architectures: declared per backbone family in
# core/backbone_families.py (VGG: pool5 .. relu7 and four poolings inside its trunk; ResNet, ConvNeXt, ...:
# the global pooling's penultimate features). "lp1" is LPPool2d with p=1, the study's "sum"
# pooling; "lp2" its "norm-2" pooling.
POOLINGS = backbone_families.POOLINGS
LAYERS = backbone_families.LAYERS
ARCHS = backbone_families.ARCHS

# Heads trained on cached features: "svm" (study Q8/Q10, Q12.1) and "mlp" (study Q11/Q12.2).
HEADS = ("svm", "mlp")

DEVICES = ("auto", "cpu", "cuda")
# "auto" takes the faster of fp32 and bf16 as measured on the machine at the run's shapes
# (compute/precision.py); bf16 features are within 1 % of fp32 (see benchmarks/extract.py).
PRECISIONS = ("auto", "fp32", "bf16")

FC_WIDTH_MIN, FC_WIDTH_MAX, FC_WIDTH_PRETRAINED = 1024, 16384, 4096

# What each entry point runs: the head it trains ("extract" trains none).
ENTRY_HEADS = {"extract": None, "svm": "svm", "finetune": "mlp"}

# The registered model that sweeps (and `--register`) add versions to, and `promote` and
# `predict` use by default.
REGISTERED_MODEL = "scene-classifier"


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).strip()
        if text not in choices:
            raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return text

    return convert


def number(name: str, kind: type, low: float | None = None, high: float | None = None,
           low_open: bool = False, parse: bool = True) -> Callable[[Any], Any]:
    """The one number check: a converter to ``kind`` (int or float) within bounds, or a
    ConfigError naming the value ("name=value: expected ...", or "value: expected ..." unnamed).

    Args:
        low, high, low_open: the bounds (``low_open``: ``> low`` rather than ``>= low``).
        parse: take text too ("0.5" from a command line); False for values read from YAML,
            which must already be numbers of the kind (``n_trials: "3"`` is refused).
    """
    def label(value: Any) -> str:
        return f"{name}={value!r}" if name else repr(value)

    expected = "an integer" if kind is int else "a number"

    def convert(value: Any) -> Any:
        typed = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or (not parse and not typed):
            raise ConfigError(f"{label(value)}: expected {expected}")
        try:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            converted = kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError, OverflowError):  # int(float('inf')) overflows
            raise ConfigError(f"{label(value)}: expected {expected}") from None
        if not math.isfinite(converted):
            # nan passes every comparison below and inf trains to chance: refuse both.
            raise ConfigError(f"{label(value)}: expected a finite number")
        if low is not None and (converted <= low if low_open else converted < low):
            raise ConfigError(f"{label(value)}: expected a value {'>' if low_open else '>='} {low}")
        if high is not None and converted > high:
            raise ConfigError(f"{label(value)}: expected a value <= {high}")
        return converted

    return convert



def _fraction(name: str) -> Callable[[Any], float]:
    to_float = number(name, float)

    def convert(value: Any) -> float:
        fraction = to_float(value)
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"{name}={value!r}: expected a fraction strictly between 0 and 1")
        return fraction

    return convert


def _dropout(value: Any) -> float:
    probability = number("dropout", float, 0.0)(value)
    if probability >= 1.0:
        raise ConfigError(f"dropout={value!r}: expected a probability in [0, 1)")
    return probability


def parse_hidden(value: Any) -> tuple[int, ...]:
    """'1024,1024' (or a list) -> (1024, 1024); '' or 'none' -> () (a linear head)."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        text = str(value).strip().lower()
        parts = [] if text in ("", "none", "0") else [p for p in text.replace(" ", "").split(",")]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"hidden={value!r}: expected comma-separated layer widths such as '1024,1024'") from None
    if any(w < 1 for w in widths):
        raise ConfigError(f"hidden={value!r}: every width must be a positive integer")
    return widths


def _boolean(name: str) -> Callable[[Any], bool]:
    def convert(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r}: expected true or false")

    return convert


def _optional_choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    """A choice, or "" for "the backbone's own" (resolved by ``make_config``)."""
    convert = _choice(name, choices)
    return lambda value: "" if value is None or str(value).strip() == "" else convert(value)


BACKBONE_DEFAULT = "the backbone's own: VGG relu7 (svm, extract) or pool5 (mlp) and max; others pool and their own pooling"


def _text(value: Any) -> str:
    return str(value)


def _optional_text(value: Any) -> str:
    return "" if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One run parameter: its name, default, converter/validator and help text, and what it does.

    Attributes:
        heads: the heads it belongs to (empty: shared by every entry point), so a study's search
            space can be checked against "the parameters of what it tunes".
        changes_result: whether its value changes what a run measures: True for every head, a
            tuple for these heads only (``batch_size`` changes an mlp head's training, not the
            SVM's features), False for where and how fast it runs (``device``, ``cache_dir``). A
            study may resume under other values of the others; a study's name (an experiment's
            ``sweep@<setting>``) depends only on these.
        selects_data: it decides which images and which split a run reads (a study searching
            one cannot share one dataset between its trials).
        tuning: a study's tuning trials may run it differently (its file's ``tuning:`` block):
            settings for the speed of a search, which the study's own settings do not take.
    """

    name: str
    default: Any
    convert: Callable[[Any], Any]
    help: str
    heads: tuple[str, ...] = ()
    unit: str = ""
    changes_result: bool | tuple[str, ...] = True
    selects_data: bool = False
    tuning: bool = False
    shown_default: str = ""  # what help text says the default is, where "" means more than nothing

    def changes_result_of(self, head: str | None) -> bool:
        if isinstance(self.changes_result, bool):
            return self.changes_result
        return head in self.changes_result


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("data", "digits", _text,
              "'digits' (scikit-learn's bundled digits, offline) or a folder in the 15-Scene layout", selects_data=True),
    Parameter("weights", "random", _text,
              "'imagenet' (torchvision's IMAGENET1K_V1), 'random' (seeded init) or a state_dict file"),
    Parameter("arch", "vgg16", _choice("arch", ARCHS), "backbone: a torchvision classifier (core/backbone_families.py)"),
    Parameter("image_size", 32, number("image_size", int, 16, 1024), "input side in pixels (224 for the study)", unit="px"),
    # "" (the default): the backbone's own (core/backbone_families.py): VGG relu7 for the SVM, pool5 for
    # the new head, and its max-pools; the other families' penultimate "pool", their own pooling.
    Parameter("layer", "", _optional_choice("layer", LAYERS), "feature layer the head reads",
              shown_default=BACKBONE_DEFAULT),
    Parameter("pooling", "", _optional_choice("pooling", POOLINGS),
              "pooling swapped in: VGG's every max-pool, or another family's global pooling",
              shown_default=BACKBONE_DEFAULT),
    Parameter("fc_width", FC_WIDTH_PRETRAINED,
              number("fc_width", int, FC_WIDTH_MIN, FC_WIDTH_MAX),
              "width of fc6/fc7; other than 4096 gives new seeded random layers", unit="units"),
    Parameter("batch_size", 32, number("batch_size", int, 1), "images per batch (extraction and head training)",
              changes_result=("mlp",), tuning=True),
    Parameter("device", "auto", _choice("device", DEVICES), "cuda when present with 'auto'", changes_result=False,
              tuning=True),
    Parameter("precision", "auto", _choice("precision", PRECISIONS),
              "'auto' (the faster of fp32 and bf16, measured on this machine), 'fp32' or 'bf16'"),
    Parameter("seed", 0, number("seed", int, 0), "seed for splits, random weights and heads", selects_data=True),
    Parameter("train_per_class", 100, number("train_per_class", int, 1),
              "training images per class for a flat dataset (the rest is test)", selects_data=True),
    Parameter("val_fraction", 0.2, _fraction("val_fraction"),
              "fraction of the training images held out for model selection", selects_data=True),
    Parameter("cache_dir", "", _optional_text, "feature and dataset cache (default: <repo>/.cache)",
              changes_result=False),
    # svm head
    Parameter("C", 1.0, number("C", float, 0.0, low_open=True), "LinearSVC regularisation", heads=("svm",)),
    Parameter("normalize", True, _boolean("normalize"), "L2-normalise features before the SVM", heads=("svm",)),
    # mlp head
    Parameter("hidden", "1024,1024", lambda v: ",".join(map(str, parse_hidden(v))),
              "hidden widths of the new head, e.g. '1024,1024'", heads=("mlp",)),
    Parameter("dropout", 0.5, _dropout, "dropout after each hidden layer", heads=("mlp",)),
    Parameter("epochs", 10, number("epochs", int, 1), "training epochs of the head", heads=("mlp",), unit="epochs"),
    Parameter("lr", 1e-3, number("lr", float, 0.0, low_open=True), "Adam learning rate", heads=("mlp",)),
    Parameter("weight_decay", 0.0, number("weight_decay", float, 0.0), "Adam weight decay", heads=("mlp",)),
)
PARAMETER_BY_NAME = {p.name: p for p in PARAMETERS}


def result_parameters(head: str | None) -> tuple[str, ...]:
    """Names of the parameters that change what a run with this head measures."""
    return tuple(n for n in run_parameters(head) if PARAMETER_BY_NAME[n].changes_result_of(head))


def data_parameters() -> tuple[str, ...]:
    """Names of the parameters that decide which images and split a run reads."""
    return tuple(p.name for p in PARAMETERS if p.selects_data)


def tuning_parameters() -> tuple[str, ...]:
    """Names of the parameters a study's tuning trials may run differently (``tuning:``)."""
    return tuple(p.name for p in PARAMETERS if p.tuning)


def run_parameters(head: str | None) -> tuple[str, ...]:
    """Names of every parameter of a run with this head (shared ones plus the head's own)."""
    return tuple(p.name for p in PARAMETERS if not p.heads or (head is not None and head in p.heads))


def repo_root() -> Path:
    """The project folder: SCENESWEEP_HOME, else the checkout holding this package, else cwd."""
    env = os.environ.get("SCENESWEEP_HOME")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "MLproject").is_file():
            return parent
    return Path.cwd().resolve()


def default_cache_dir() -> Path:
    return repo_root() / ".cache"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The fully resolved configuration of one run: every parameter, validated."""

    head: str | None
    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def cache_path(self) -> Path:
        return Path(self.values["cache_dir"]) if self.values["cache_dir"] else default_cache_dir()

    def replace(self, **changes: Any) -> "RunConfig":
        return make_config(self.head, {**self.values, **changes})

    def as_dict(self) -> dict[str, Any]:
        return {"head": self.head, **self.values}


def make_config(head: str | None, values: dict[str, Any] | None = None) -> RunConfig:
    """Validate ``values`` for a run with ``head`` and fill in defaults.

    Raises:
        ConfigError: on an unknown parameter or a bad value, naming it.
    """
    if head is not None and head not in HEADS:
        raise ConfigError(f"head={head!r}: expected one of {', '.join(HEADS)}")
    allowed = run_parameters(head)
    values = dict(values or {})
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)} for head {head or 'none'}; "
                          f"expected some of: {', '.join(allowed)}")
    resolved = {}
    for name in allowed:
        param = PARAMETER_BY_NAME[name]
        raw = values.get(name, param.default)
        resolved[name] = param.convert(raw)
    # What the backbone decides: its own tap for this head and its own pooling unless told,
    # then whether it has them (core/backbone_families.py).
    family = backbone_families.family_of(resolved["arch"])
    resolved["layer"] = resolved["layer"] or family.default_tap(head)
    resolved["pooling"] = resolved["pooling"] or family.own_pooling
    backbone_families.check_backbone(resolved["arch"], resolved["layer"], resolved["pooling"], resolved["fc_width"],
                             FC_WIDTH_PRETRAINED, resolved["image_size"])
    return RunConfig(head, resolved)
