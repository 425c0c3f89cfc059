"""Data: built-in domains, sources (text, JSONL, ``datasets``), chat rendering, packing, mixture sampling."""

from .builtin import BUILTIN_DOMAINS, builtin_documents, builtin_text
from .chat import CHATML_TEMPLATE, IGNORE_INDEX, assistant_spans, tokenize_chat
from .dataset import DomainData, build_domain, build_domains
from .packing import Blocks, pack_chat, pack_text
from .sampler import MixtureSampler

__all__ = [
    "BUILTIN_DOMAINS",
    "builtin_documents",
    "builtin_text",
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "assistant_spans",
    "tokenize_chat",
    "DomainData",
    "build_domain",
    "build_domains",
    "Blocks",
    "pack_chat",
    "pack_text",
    "MixtureSampler",
]
