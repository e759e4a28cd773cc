"""Merge methods: pure tensor math, one module per family, declared in :mod:`.registry`."""

from mergetui.methods.registry import METHODS, MethodSpec, ParamSpec, get_method, method_names

__all__ = ["METHODS", "MethodSpec", "ParamSpec", "get_method", "method_names"]
