"""Data: built-in domains, tokenisation, packing and mixture sampling."""

from .builtin import BUILTIN_DOMAINS, builtin_documents, builtin_text

__all__ = ["BUILTIN_DOMAINS", "builtin_documents", "builtin_text"]
