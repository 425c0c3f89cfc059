"""Multi-process training under ``torchrun``: process group, device, DDP or FSDP2 wrapping, reductions.

``torchrun --nproc-per-node N -m moeforge train CONFIG.yaml`` sets RANK / WORLD_SIZE /
LOCAL_RANK; :func:`setup` joins the process group with NCCL on GPUs and gloo on CPU. Without
those variables everything runs in one process and the helpers here are no-ops.

Data parallelism: every process computes the same global batch plan and takes its slice; DDP
averages gradients. FSDP2 (``fully_shard``) shards each decoder layer's parameters, gradients
and optimizer state across processes, for models that do not fit one device.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import MoeforgeError


@dataclass
class DistContext:
    """Where this process sits: rank, world size, device; ``initialized`` when a process group is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (in place; returns the tensor). Works on CPU tensors under NCCL too."""
        if not self.initialized:
            return tensor
        if self.device.type == "cuda" and tensor.device.type != "cuda":
            t = tensor.to(self.device)
            dist.all_reduce(t)
            tensor.copy_(t.cpu())
            return tensor
        dist.all_reduce(tensor)
        return tensor

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process."""
        if not self.initialized:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() == 0)

    def broadcast_object(self, obj):
        if not self.initialized:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(timeout_s: int = 1800, device: str = "auto") -> DistContext:
    """Join the torchrun process group if the environment asks for one; choose the device
    (``auto``: this process's GPU when there are GPUs, else the CPU; ``cpu``; ``cuda``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        raise MoeforgeError("device: cuda, but PyTorch sees no CUDA GPU here; set device: auto or cpu.")
    if device != "cpu" and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            raise MoeforgeError(
                f"{local_world} processes per node but {gpus} GPU(s): NCCL needs one GPU per process. "
                f"Launch with --nproc-per-node {gpus}, or set device: cpu to train on the CPU (gloo)."
            )
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    if world <= 1:
        return DistContext(0, 1, 0, chosen, initialized=False)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, initialized=True)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as err:  # rendezvous problems surface as several exception types
        raise MoeforgeError(
            f"could not join the process group ({backend}, rank {rank} of {world}): {err}. "
            "Launch with `torchrun --nproc-per-node N -m moeforge train CONFIG.yaml`."
        ) from None
    return DistContext(rank, world, local_rank, chosen, initialized=True, owns_group=True)


#: what empties each of DTensor's memo caches, as (module, attribute path of the function to call):
#: sharding propagation in Python (two) and in C++, redistribution plans, redistribution planners
#: (cached per mesh weakref, but each holds the mesh itself) and mesh topology
_DTENSOR_CACHE_CLEARS = (
    ("torch.distributed.tensor", "DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear"),
    ("torch.distributed.tensor", "DTensor._op_dispatcher.sharding_propagator._propagate_tensor_meta_cached.cache_clear"),
    ("torch._C", "_clear_DTensor_sharding_propagator_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
)


def clear_dtensor_caches() -> None:
    """Empty DTensor's memo caches (:data:`_DTENSOR_CACHE_CLEARS`), which keep the specs they saw,
    and through them the device mesh and its process group, alive after the sharded model is gone.
    These are private torch APIs, so each one is skipped when this torch lacks it."""
    import importlib

    for module, path in _DTENSOR_CACHE_CLEARS:
        try:
            obj = importlib.import_module(module)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            continue
        obj()


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one (``model.model.layers`` for LLaMA-family models)."""
    for path in ("model.layers", "model.model.layers", "base_model.model.model.layers", "transformer.h"):
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        if isinstance(node, nn.ModuleList):
            return list(node)
    return []


def wrap_model(model: nn.Module, ctx: DistContext, *, strategy: str, find_unused_parameters: bool = False) -> nn.Module:
    """DDP (replicated) or FSDP2 (sharded) model for ``ctx``; the model itself when not distributed."""
    if not ctx.distributed:
        return model
    if strategy == "fsdp":
        import warnings

        from torch.distributed.fsdp import fully_shard

        # moeforge's decoder layers return views (e.g. routing indices) but nothing modifies a layer's
        # output in place, which is the case this warning is about (tests compare FSDP to one process)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPMoeforgeDecoderLayer\) returned a view")
        from torch.distributed.device_mesh import init_device_mesh

        # the mesh on this process's device type (fully_shard's default mesh takes the GPU whenever
        # there is one, also when the config asked for the CPU)
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    import inspect
    import warnings

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # buffers are kept equal by the trainer itself (router loads are summed before bias updates), so
    # DDP must not overwrite them from rank 0 at every forward (that would clobber the load counts);
    # newer torch names the switch forward_sync_buffers (buffers start equal: every process seeds and
    # resumes alike, so its sync at construction changes nothing)
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        buffers = {"forward_sync_buffers": False}
    else:
        buffers = {"broadcast_buffers": False}
    if find_unused_parameters:
        # top-k adapters leave some experts without gradient in some steps only: DDP's note on steps
        # where every parameter happened to get one is expected, not a misconfiguration
        warnings.filterwarnings("ignore", message=r".*find_unused_parameters=True was specified in DDP constructor")
    return DDP(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters, **buffers)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, without a wrapper)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def no_sync(model: nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-batches (all but the last)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if skip and isinstance(model, DDP):
        return model.no_sync()
    if skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _restore_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def sync_router_loads(model: nn.Module, ctx: DistContext) -> None:
    """Sum the ``sigmoid_bias`` routers' pending expert loads over processes before their bias update,
    so every replica applies the same update (the one a single process would apply)."""
    if not ctx.initialized:
        return
    from ..moe.routers import SigmoidBiasRouter

    for module in model.modules():
        if isinstance(module, SigmoidBiasRouter):
            ctx.all_reduce_sum(module.pending_load)
