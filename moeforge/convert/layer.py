"""Convert one dense FFN into one MoE block: construction, router init, scale, refinement.

Order of the steps for layer l (each documented in its own module):

1. :mod:`~moeforge.convert.methods` builds the experts from the dense weights (and, for
   data-driven methods, the layer's calibration data).
2. :mod:`~moeforge.convert.gate_init` initialises the router.
3. :mod:`~moeforge.convert.rescale` sets the output scale s.
4. With calibration data and a data-driven router (centroid with data, activation), the router's
   temperature is chosen from {1/64, ..., 4} x to minimise the layer's output error given s
   (the top-k choice does not depend on it, only the combine weights do; on SmolLM2 nearly flat
   weights win: the router's job at conversion time is to choose, not to weigh).
5. :mod:`~moeforge.convert.refine` optionally distils the block toward the dense FFN.

``--method merge`` takes its experts from other models, so steps 4-5 (fits to the input model's
FFN) do not apply; its calibration data only labels tokens for ``--gate-init domain``.

When calibration data exists, the layer's relative output error
||y - y_moe||^2 / ||y||^2 on the calibration tokens is measured before refinement and at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..formats.export import MoELayerWeights
from ..moe.config import MoEConfig
from ..moe.routers import build_router
from .config import ConvertConfig
from .gate_init import init_router
from .methods.base import DenseFFN, LayerCalibration, LayerContext, LayerExperts, get_method
from .refine import refine_all, refine_down, refine_router
from .rescale import fixed_scale, least_squares_scale, norm_matching_scale
from .routing_sim import make_router, relative_error, routed_sum

TEMPERATURES = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0)


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


def router_extra_state(moe: MoEConfig, seed: int, index: int) -> dict[str, Tensor]:
    """The router's other parameters and persistent buffers at their initial values (noise, bias...)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + index + 7)
        router = build_router(moe)
    state = router.state_dict()
    state.pop("weight")
    return {k: v.detach().float().clone() for k, v in state.items()}


@torch.no_grad()
def mean_routed_weight_sum(moe: MoEConfig, router: Tensor, x: Tensor, extra: dict[str, Tensor]) -> float:
    """A token's summed routing weights (over the experts it reaches), averaged over the rows of ``x``."""
    routing = make_router(moe, router, extra)(x.float(), None)
    return float(routing.weight.sum()) / x.shape[0]


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
        expert_ffns: list[DenseFFN] | None = None,
    ) -> tuple[MoELayerWeights, LayerReport]:
        """Build layer ``index``'s experts and router from its dense FFN (``expert_ffns``: the same
        layer of every expert model, method merge)."""
        cfg = self.cfg
        ctx = LayerContext(index=index, config=cfg, generator=layer_generator(cfg.seed, index), calib=calib,
                           expert_ffns=expert_ffns)
        experts: LayerExperts = self.method.build(ffn, ctx)
        # a merge's calibration only labels tokens by domain: there is no dense output to fit
        fits_dense = calib is not None and not cfg.merges
        expert_out = experts.expert_outputs(calib.x) if fits_dense else None
        # the router's other state (e.g. noisy top-k's router_mlp matrix) is fixed up front, so the
        # calibration below evaluates the router the export will hold
        extra = router_extra_state(self.moe, cfg.seed, index)
        report_info = dict(experts.info)
        router = init_router(cfg.gate_init, experts, ffn, ctx, norm_weight=norm_weight, expert_out=expert_out,
                             info=report_info)
        scale = fixed_scale(cfg, experts.default_scale)
        if (cfg.gate_init == "domain" and cfg.rescale == "auto" and cfg.routed_weight_sum != 1.0
                and self.moe.router != "expert_choice"):  # expert choice routes across a batch
            # the auto scale 1 / (summed weights under a uniform router) assumes a near-uniform router; a
            # fitted domain router is confident (a token's kept weights sum to nearly 1, not k/E), so the
            # scale is 1 over the summed weights this router gives the calibration tokens
            weight_sum = mean_routed_weight_sum(self.moe, router, calib.x, extra)
            report_info["routed_weight_sum"] = weight_sum
            scale = 1.0 / max(weight_sum, 1e-6)
        report = LayerReport(index=index, output_scale=scale if scale is not None else 1.0, info=report_info)
        if fits_dense and self.moe.router != "expert_choice":  # expert choice routes across a batch
            router, scale = self._calibrate(router, scale, experts, expert_out, calib, report, ctx, extra)
            report.output_scale = scale
        weights = MoELayerWeights(
            router=router.float().contiguous(),
            gate_up=experts.gate_up,
            down=experts.down,
            shared_gate=experts.shared_gate,
            shared_up=experts.shared_up,
            shared_down=experts.shared_down,
            output_scale=float(report.output_scale),
            router_extra=extra,
        )
        return weights, report

    def _scale_for(self, routed: Tensor, calib: LayerCalibration, shared_out: Tensor | None, scale: float | None) -> float:
        if scale is not None:
            return scale
        if self.cfg.rescale == "fit":
            return least_squares_scale(calib.y, routed, shared_out)
        return norm_matching_scale(calib.y, routed, shared_out)

    @torch.no_grad()
    def _error(self, router: Tensor, scale: float | None, expert_out: Tensor, shared_out: Tensor | None,
               calib: LayerCalibration, extra: dict[str, Tensor]) -> tuple[float, float]:
        routed = routed_sum(self.moe, router, calib.x, expert_out, extra=extra)
        s = self._scale_for(routed, calib, shared_out, scale)
        out = s * routed + (shared_out if shared_out is not None else 0.0)
        return relative_error(calib.y, out), s

    def _calibrate(self, router: Tensor, scale: float | None, experts: LayerExperts, expert_out: Tensor,
                   calib: LayerCalibration, report: LayerReport, ctx: LayerContext,
                   extra: dict[str, Tensor]) -> tuple[Tensor, float]:
        """Temperature, data-fitted scale and refinement; fills the report's errors.

        expert_out: (T, E, H) every routed expert's output on the calibration inputs.
        extra: the router's state besides its weight, as exported (:func:`router_extra_state`).
        """
        cfg = self.cfg
        shared_out = experts.shared_output(calib.x)
        temps = TEMPERATURES if cfg.gate_init in ("centroid", "activation") else (1.0,)
        best = None
        for t in temps:
            err, s = self._error(router * t, scale, expert_out, shared_out, calib, extra)
            if best is None or err < best[0]:
                best = (err, s, t)
        err, s, t = best
        router = router * t
        report.error = err
        if len(temps) > 1:
            report.temperature = t
        if cfg.refine == "none":
            return router, s
        t0 = time.perf_counter()
        report.error_before_refine = err
        trainable_scale = cfg.rescale in ("layerwise", "fit")
        held_before = None
        if cfg.refine in ("router", "router+down"):
            res = refine_router(self.moe, router, s, calib.x, calib.y, expert_out, shared_out,
                                steps=cfg.refine_steps, lr=cfg.refine_lr or 3e-3, train_scale=trainable_scale,
                                extra=extra)
            router, s, held_before = res.router, res.scale, res.error_before
        if cfg.refine in ("down", "router+down"):
            res, refined = refine_down(self.moe, experts, router, s, calib.x, calib.y, extra=extra)
            held_before = res.error_before if held_before is None else held_before
            report.info["down_ridge"] = refined.info.get("down_ridge")
            experts.down, experts.shared_down = refined.down, refined.shared_down
        if cfg.refine == "all":
            res, refined = refine_all(self.moe, experts, router, s, calib.x, calib.y, steps=cfg.refine_steps,
                                      lr=cfg.refine_lr or 1e-4, generator=ctx.generator, extra=extra)
            held_before = res.error_before
            experts.gate_up, experts.down = refined.gate_up, refined.down
            experts.shared_gate, experts.shared_up, experts.shared_down = (
                refined.shared_gate, refined.shared_up, refined.shared_down)
        if cfg.refine in ("down", "router+down", "all"):
            expert_out = experts.expert_outputs(calib.x)
            shared_out = experts.shared_output(calib.x)
        router, s = res.router, res.scale
        report.error, _ = self._error(router, s, expert_out, shared_out, calib, extra)
        report.refine_seconds = time.perf_counter() - t0
        report.info["refine_held_out_error"] = [held_before, res.error_after]
        return router, s
