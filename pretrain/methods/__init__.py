"""Pretraining methods, selected by ``MODEL.METHOD``: the registry and the methods shipped with it.

A method is one module: a ``PretrainMethod`` subclass (its network, data, loss and parameter groups)
registered under a name with ``@register_method("name")``. The engine, its hooks (LR schedule, kNN and
BN monitors, checkpoints, writers), resume and DDP are shared by every method, and so are ``convert``,
``bench`` and ``pipeline``: every method's network keeps its backbone as a torchvision ResNet named
``encoder``.
"""

from pretrain.methods.base import METHODS, PretrainMethod, build_method, method_class, register_method
from pretrain.methods import simsiam, supervised  # noqa: F401,E402  (register the shipped methods)

__all__ = ["METHODS", "PretrainMethod", "build_method", "method_class", "register_method"]
