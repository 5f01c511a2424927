"""Model zoo: every model is built by name from a per-layer width list (see registry.py)."""

from . import mobilenetv2, resnet, resnet_cifar, small_cnn, vgg  # noqa: F401  (registers the models)
from .registry import create_model, default_widths, list_models, model_config, register_model

__all__ = ["create_model", "default_widths", "list_models", "model_config", "register_model"]
