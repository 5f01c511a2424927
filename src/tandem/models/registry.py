"""Model registry and the small building blocks every model family shares.

Every model is built from a per-layer width list, and every created model carries
``model.config`` (name, num_classes, in_channels, widths, kwargs): a pruned model is
saved as that config plus a state_dict and rebuilt later without its original definition.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import numbers
import os
import sys
from typing import Callable

import torch.nn as nn

from ..errors import TandemError
from ..registry import Registry

Builder = Callable[..., nn.Module]
Layout = Callable[..., list[tuple[str, int]]]
"""A layout maps a model's options to one (label, default width) pair per widths entry;
the label names the layer whose output channels the entry sets."""

MODELS = Registry("model")   # name -> (builder, layout)


def register_model(name: str, layout: Layout | None = None) -> Callable[[Builder], Builder]:
    """Register ``builder(num_classes, in_channels, widths, *, options...)`` under ``name``.

    Options must be keyword-only with defaults: they are how unknown options are
    rejected and how the config records every option's value.
    """

    def decorate(builder: Builder) -> Builder:
        MODELS.register(name, (builder, layout))
        return builder

    return decorate


def list_models() -> list[str]:
    return MODELS.names()


def _lookup(name: str) -> tuple[Builder, Layout | None]:
    return MODELS.get(name)


def _options(name: str, builder: Builder, kwargs: dict) -> dict:
    """The builder's keyword-only options with defaults filled in; unknown ones rejected."""
    params = inspect.signature(builder).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise TandemError(f"model {name!r} has no option {unknown[0]!r}; allowed options: {allowed}")
    return {**defaults, **kwargs}


def check_choice(name: str, option: str, value, allowed: tuple) -> None:
    """Reject an option value outside ``allowed`` with a message naming both."""
    if value not in allowed:
        raise TandemError(f"model {name!r}: {option}={value!r} is not allowed; choose one of {list(allowed)}")


def default_widths(name: str, **kwargs) -> list[int]:
    """The unpruned width list of ``name`` (for these options)."""
    builder, layout = _lookup(name)
    return [w for _, w in layout(**_options(name, builder, kwargs))] if layout else []


def _check_widths(name: str, layout: list[tuple[str, int]], widths) -> list[int]:
    labels = [label for label, _ in layout]
    if widths is None:
        return [w for _, w in layout]
    widths = list(widths)
    if len(widths) != len(labels):
        shown = labels if len(labels) <= 12 else labels[:6] + ["..."] + labels[-3:]
        raise TandemError(
            f"model {name!r} expects {len(labels)} widths, got {len(widths)}; each entry is the "
            f"output channel count of, in order: {', '.join(shown)} "
            f"(tandem.models.default_widths({name!r}) lists the unpruned values)"
        )
    for i, w in enumerate(widths):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not float(w).is_integer() or w <= 0:
            raise TandemError(
                f"model {name!r}: widths[{i}] ({labels[i]} output channels) must be a positive integer, got {w!r}"
            )
    return [int(w) for w in widths]


def is_factory(name: str) -> bool:
    """'pkg.module:function' names a user's model factory, anything else a registered model."""
    return ":" in name


def import_factory(path: str) -> Callable[..., nn.Module]:
    """The function (or class) `path` = 'pkg.module:attr' names; the module is imported from
    the current directory or the installed environment."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise TandemError(f"model factory {path!r}: write it as 'package.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:   # the `tandem` script does not add it
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module)
    except Exception as exc:
        raise TandemError(f"model factory {path!r}: cannot import {module!r} ({type(exc).__name__}: {exc}); it must "
                          f"be importable from the current directory ({os.getcwd()}) or the installed "
                          f"environment") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TandemError(f"model factory {path!r}: module {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TandemError(f"model factory {path!r} is not callable")
    return obj


def _from_factory(path: str, num_classes: int, in_channels: int, widths, options: dict) -> nn.Module:
    """factory(num_classes=..., in_channels=..., **options); each of the first two passed only
    when the factory takes it (or **kwargs)."""
    if widths:
        raise TandemError(f"model {path!r}: widths set the layers of a registered model; a factory builds its own "
                          f"architecture (pass its options instead)")
    fn = import_factory(path)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    args = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
            if takes_any or k in params}
    try:
        model = fn(**args, **options)
    except TypeError as exc:
        raise TandemError(f"model factory {path!r} called with {', '.join(sorted({**args, **options})) or 'nothing'}: "
                          f"{exc}") from None
    if not isinstance(model, nn.Module):
        raise TandemError(f"model factory {path!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, widths=None, **kwargs) -> nn.Module:
    """Build a registered model, or a user's (`name` = 'pkg.module:function', see
    `import_factory`); ``create_model(**model.config)`` rebuilds the same architecture.

    A nested ``kwargs`` dict (as found in a config) is merged into the options.
    """
    kwargs = {**(kwargs.pop("kwargs", None) or {}), **kwargs}
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise TandemError(f"model {name!r}: {what} must be a positive integer, got {value!r}")
    if is_factory(name):
        model, options, widths = _from_factory(name, num_classes, in_channels, widths, kwargs), kwargs, []
    else:
        builder, layout = _lookup(name)
        options = _options(name, builder, kwargs)
        if layout is not None:
            widths = _check_widths(name, layout(**options), widths)
        else:
            widths = [int(w) for w in widths or []]
        model = builder(num_classes, in_channels, widths, **options)
    model.config = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "widths": widths,
        "kwargs": options,
    }
    return model


def reinitialised(model: nn.Module) -> nn.Module:
    """A copy of `model` with every submodule's own `reset_parameters()` applied: a user's
    model started again from scratch, without calling its constructor."""
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


def model_config(model: nn.Module) -> dict:
    """The config ``create_model`` recorded, looking through DDP / torch.compile wrappers."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    config = getattr(model, "config", None) or getattr(getattr(model, "_orig_mod", None), "config", None)
    if config is None:
        raise TandemError(f"{type(model).__name__} was not built by tandem.models.create_model: it has no config")
    return {**config, "widths": list(config["widths"]), "kwargs": dict(config["kwargs"])}


# --- shared building blocks -------------------------------------------------------------


def conv_bn(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1, act=nn.ReLU):
    """Conv (no bias: BN follows) - BN - activation; ``act=None`` leaves the activation out."""
    layers = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> nn.Module:
    """He-normal convs (fan_out), as the CIFAR ResNet/VGG reference codes do; BN and linear
    keep PyTorch's defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
