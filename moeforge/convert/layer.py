"""Convert one dense FFN into one MoE block: construction, router init, scale, refinement.

Order of the steps for layer l (each documented in its own module):

1. :mod:`~moeforge.convert.methods` builds the experts from the dense weights (and, for
   data-driven methods, the layer's calibration data).
2. :mod:`~moeforge.convert.gate_init` initialises the router.
3. :mod:`~moeforge.convert.rescale` sets the output scale s.
4. With calibration data and a data-driven router (centroid with data, activation), the router's
   temperature is chosen from {1/8, ..., 8} x to minimise the layer's output error given s
   (the top-k choice does not depend on it, only the combine weights do).
5. :mod:`~moeforge.convert.refine` optionally distils the block toward the dense FFN.

When calibration data exists, the layer's relative output error
||y - y_moe||^2 / ||y||^2 on the calibration tokens is measured before refinement and at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..formats.export import MoELayerWeights
from ..moe.config import MoEConfig
from ..moe.routers import build_router
from .config import ConvertConfig
from .gate_init import init_router
from .methods.base import DenseFFN, LayerCalibration, LayerContext, LayerExperts, get_method
from .refine import refine_all, refine_router
from .rescale import fixed_scale, norm_matching_scale
from .routing_sim import relative_error, routed_sum

TEMPERATURES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class LayerReport:
    """What happened to one layer (errors are relative squared errors on calibration tokens)."""

    index: int
    output_scale: float
    error: float | None = None
    error_before_refine: float | None = None
    refine_seconds: float | None = None
    temperature: float | None = None
    info: dict = field(default_factory=dict)


def layer_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + index)


def router_extra_state(moe: MoEConfig, weight: Tensor, seed: int, index: int) -> dict[str, Tensor]:
    """The router's other parameters and persistent buffers at their initial values (noise, bias...)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + index + 7)
        router = build_router(moe)
    state = router.state_dict()
    state.pop("weight")
    return {k: v.detach().float().clone() for k, v in state.items()}


class LayerConverter:
    """Applies a :class:`ConvertConfig` to dense FFNs, one layer at a time."""

    def __init__(self, cfg: ConvertConfig, moe: MoEConfig) -> None:
        self.cfg = cfg
        self.moe = moe
        self.method = get_method(cfg.method)

    def convert(
        self,
        index: int,
        ffn: DenseFFN,
        *,
        norm_weight: Tensor,
        calib: LayerCalibration | None,
    ) -> tuple[MoELayerWeights, LayerReport]:
        import time

        cfg = self.cfg
        ctx = LayerContext(index=index, config=cfg, generator=layer_generator(cfg.seed, index), calib=calib)
        experts: LayerExperts = self.method.build(ffn, ctx)
        expert_out = shared_out = None
        if calib is not None:
            expert_out = experts.expert_outputs(calib.x)
            shared_out = experts.shared_output(calib.x)
        router = init_router(cfg.gate_init, experts, ffn, ctx, norm_weight=norm_weight, expert_out=expert_out)
        scale = fixed_scale(cfg, experts.default_scale)
        report = LayerReport(index=index, output_scale=1.0, info=dict(experts.info))

        def evaluate(weight: Tensor, s: float | None) -> tuple[float, float]:
            """(error, scale) of a router weight, fitting s by norm matching when s is None."""
            routed = routed_sum(self.moe, weight, calib.x, expert_out)
            if s is None:
                s = norm_matching_scale(calib.y, routed, shared_out)
            out = s * routed + (shared_out if shared_out is not None else 0.0)
            return relative_error(calib.y, out), s

        if calib is None:
            report.output_scale = scale if scale is not None else 1.0
        else:
            data_router = cfg.gate_init in ("centroid", "activation")
            temps = TEMPERATURES if data_router else (1.0,)
            best = None
            for t in temps:
                err, s = evaluate(router * t, scale)
                if best is None or err < best[0]:
                    best = (err, s, t)
            err, s, t = best
            router = router * t
            report.output_scale, report.error = s, err
            if data_router:
                report.temperature = t
            if cfg.refine != "none":
                t0 = time.perf_counter()
                report.error_before_refine = err
                if cfg.refine == "router":
                    res = refine_router(
                        self.moe, router, s, calib.x, calib.y, expert_out, shared_out,
                        steps=cfg.refine_steps, lr=cfg.refine_lr or 1e-2, train_scale=cfg.rescale == "layerwise",
                    )
                else:
                    res, experts = refine_all(
                        self.moe, experts, router, s,
                        calib.x, calib.y, steps=cfg.refine_steps, lr=cfg.refine_lr or 1e-4, generator=ctx.generator,
                    )
                router, report.output_scale, report.error = res.router, res.scale, res.error_after
                report.refine_seconds = time.perf_counter() - t0
        weights = MoELayerWeights(
            router=router.float().contiguous(),
            gate_up=experts.gate_up,
            down=experts.down,
            shared_gate=experts.shared_gate,
            shared_up=experts.shared_up,
            shared_down=experts.shared_down,
            output_scale=float(report.output_scale),
            router_extra=router_extra_state(self.moe, router, cfg.seed, index),
        )
        return weights, report
