"""Registries of checkpoint importers (``load``) and exporters (``convert --format``)."""

from __future__ import annotations

from collections.abc import Callable

#: model_type in config.json -> callable(directory, config_dict, *, dtype) -> model
IMPORTERS: dict[str, Callable] = {}
#: export format name -> exporter object (see moeforge.convert)
EXPORTERS: dict[str, object] = {}


def register_importer(model_type: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        if model_type in IMPORTERS:
            raise ValueError(f"an importer for {model_type!r} is already registered")
        IMPORTERS[model_type] = fn
        return fn

    return wrap
