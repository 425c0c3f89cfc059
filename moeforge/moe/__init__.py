"""Mixture-of-Experts building blocks: config, routers, stacked experts, the MoE layer."""

from .config import MoEConfig
from .experts import DenseMLP, StackedExperts
from .layer import MoELayer, MoEOutput, update_router_biases
from .routers import ROUTERS, Router, build_router, register_router
from .routing import Routing

__all__ = [
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Routing",
    "Router",
    "ROUTERS",
    "StackedExperts",
    "DenseMLP",
    "build_router",
    "register_router",
    "update_router_biases",
]
