"""Import and export of checkpoint formats (explicit weight-key tables)."""

from . import mixtral  # noqa: F401  registers the Mixtral importer
from .registry import EXPORTERS, IMPORTERS, register_importer

__all__ = ["IMPORTERS", "EXPORTERS", "register_importer"]
