"""Several processes: how this one was launched (torchrun, accelerate launch, plain python), the launches
refused, the Accelerator options that follow, and how the model is spread over processes (DDP or FSDP2)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from prefopt.errors import ConfigError, PrefoptError

log = logging.getLogger("prefopt")

# Variables a launcher sets for each of several processes: torch.distributed.run / accelerate, and MPI.
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def world_size() -> int:
    """How many processes the launcher started in all (1 when started alone)."""
    return _first_int(_WORLD_VARS, 1)


def rank() -> int:
    """This process's global rank (0 when started alone)."""
    return _first_int(_RANK_VARS, 0)


def is_main_process() -> bool:
    """True in the one process (global rank 0) that prints the summary and writes outputs."""
    return rank() == 0


def local_world_size() -> int:
    """Processes started on this machine."""
    return _first_int(("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"), world_size())


def use_cpu() -> bool:
    """Train on CPU: asked for (``accelerate launch --cpu``), or no CUDA device is visible."""
    return _flag("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """An accelerate config with ``distributed_type: FSDP`` launched this process."""
    return _flag("ACCELERATE_USE_FSDP")


def _check_fsdp_options() -> None:
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ConfigError(f"FSDP: fsdp_version {version} in the accelerate config; prefopt shards with FSDP2 only (set fsdp_config.fsdp_version: 2)")
    for name, why in (("FSDP_OFFLOAD_PARAMS", "CPU offload is not supported"),
                      ("FSDP_ACTIVATION_CHECKPOINTING", "use trainer.gradient_checkpointing instead")):
        if _flag(name):
            raise ConfigError(f"FSDP: {name.lower()} is set in the accelerate config; {why}")


def check_launch() -> None:
    """Refuse launches that would otherwise train wrongly or crash on one rank, with a message saying what to do."""
    several = world_size() > 1
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        # its clipping returns no norm, and its optimiser state is partitioned per process: prefopt's
        # checkpoints, resume and final save would not hold what they say
        raise ConfigError("DeepSpeed (an accelerate config with distributed_type: DEEPSPEED) is not supported; FSDP shards "
                          "the same states as ZeRO-3: use distributed_type: FSDP with fsdp_version: 2 "
                          "(as in prefopt's examples/accelerate/fsdp.yaml), or DDP")
    if fsdp_requested():
        _check_fsdp_options()
    if not several and _flag("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR"):
        # `accelerate launch --cpu --num_processes N` (N > 1) without --mpirun_hostfile starts a single
        # process and gives it a rendezvous address but no rank: it would train alone and say nothing.
        raise ConfigError(
            "accelerate launch --cpu with several processes started only this one (accelerate runs several CPU "
            "processes only through mpirun). Start them with `accelerate launch --multi_gpu --num_processes N` "
            "and CUDA_VISIBLE_DEVICES=\"\" or with `torchrun --nproc_per_node N -m prefopt ...`; for one process, "
            "drop --num_processes (or unset MASTER_ADDR)."
        )
    if several and not use_cpu():
        local, devices = local_world_size(), torch.cuda.device_count()
        if local > devices:
            raise ConfigError(
                f"{local} processes on this machine but {devices} CUDA device(s): start at most {devices} "
                f"(--nproc_per_node / --num_processes {devices}), or train on CPU with CUDA_VISIBLE_DEVICES=\"\""
            )


def accelerator_options() -> dict[str, Any]:
    """Keyword arguments for ``Accelerator`` that every launch needs."""
    return {
        # several processes on CPU train together over gloo only when accelerate is told to use the CPU
        "cpu": world_size() > 1 and use_cpu(),
        # the trainer steps the schedule once per optimiser step; accelerate would otherwise step a
        # prepared scheduler once per process per step (N times too fast under N processes)
        "step_scheduler_with_optimizer": False,
    }


def describe(accelerator: Any) -> None:
    """Log how many processes train together and on what."""
    kind = "FSDP2" if sharded(accelerator) else accelerator.distributed_type.value
    if accelerator.num_processes > 1:
        log.info("%d processes (%s on %s)", accelerator.num_processes, kind, accelerator.device.type)
    if accelerator.device.type == "cpu":
        log.info("CPU: %d threads per process (torch.get_num_threads(); set OMP_NUM_THREADS to change), %s cores visible",
                 torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


@contextmanager
def accelerate_without_fsdp() -> Iterator[None]:
    """Hide an FSDP launch from accelerate while it builds its state: prefopt shards the model itself
    (:func:`shard`), the same way on CPU (where accelerate would silently fall back to DDP) and on GPUs."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved
            # prefopt decides which process reads the weights (the first; the others receive their shards,
            # prepare()); transformers' own "CPU-RAM-efficient loading" would count on accelerate's FSDP.
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def sharded(accelerator: Any) -> bool:
    """This run shards its model with FSDP2."""
    return fsdp_requested() and accelerator.num_processes > 1


def on_main_process(accelerator: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the first process only; its result, or the error it raised, reaches every process
    (so no process waits in a collective for one that failed)."""
    if accelerator.num_processes == 1:
        return fn()
    box: list[Any] = [None]
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            box[0] = (fn(), None)
        except Exception as exc:  # noqa: BLE001 - raised below, on every process
            error = exc  # the others get a copy that surely pickles
            box[0] = (None, exc if isinstance(exc, PrefoptError) else RuntimeError(f"on the first process: {type(exc).__name__}: {exc}"))
    torch.distributed.broadcast_object_list(box, src=0)
    value, sent = box[0]
    if error is not None:
        raise error
    if sent is not None:
        raise sent
    return value


def _materialize(model: torch.nn.Module, full: dict[str, torch.Tensor] | None, buffers: dict[str, torch.Tensor],
                 device: torch.device) -> None:
    """Give a sharded model whose other processes hold no weights the first process's weights: every
    process allocates its shards, restores its buffers (non-persistent ones are in no state dict) and
    receives its part of ``full`` (the first process's whole state; ``None`` elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


_LOW = {torch.bfloat16, torch.float16}


def _low_precision_units(module: torch.nn.Module, skip: set[int]) -> list[torch.nn.Module]:
    """The largest submodules of ``module`` whose parameters are all bf16/fp16 (none in ``skip``)."""
    out = []
    for child in module.children():
        dtypes = {p.dtype for p in child.parameters()}
        if id(child) in skip or not dtypes & _LOW:
            continue
        out += [child] if dtypes <= _LOW else _low_precision_units(child, skip)
    return out


def shard(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """Shard a :class:`prefopt.engine.modeling.PreferenceModel` in place with FSDP2: each decoder layer of the policy
    and of a live reference is one unit, and the rest (embeddings, final norm, LM heads) is the root unit.

    A unit needs one dtype for all its parameters. A live reference holds its linear layers in the
    training precision and its norms and embeddings in fp32, so in each of its layers the attention
    and the MLP are units of their own."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(f"FSDP: needs torch >= 2.6 (fully_shard); this is torch {torch.__version__}") from None

    if getattr(model.policy, "peft_config", None) is not None:
        raise ConfigError("FSDP with model.lora is not supported; LoRA needs little memory: train it with DDP")
    # no model.to(device) first: fully_shard moves each shard (not the whole model) to the mesh's device
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() not in ("0", "false", "no")
    outside: list[torch.nn.Module] = []  # low-precision modules outside the decoder layers: the root unit's
    inside: set[int] = set()  # parameters of the decoder layers (their own units)
    for sub in (model.policy, model.reference):
        if sub is None:
            continue
        names = set(getattr(sub, "_no_split_modules", None) or [])
        layers = [m for m in sub.modules() if type(m).__name__ in names]
        if not layers:
            raise ConfigError(f"FSDP: cannot find the decoder layers of {type(sub).__name__} (no _no_split_modules)")
        for layer in layers:
            if len({p.dtype for p in layer.parameters()}) > 1:
                for unit in _low_precision_units(layer, set()):
                    fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        outside += _low_precision_units(sub, {id(layer) for layer in layers})
        inside |= {id(p) for layer in layers for p in layer.parameters()}
    # Outside the layers (an untied LM head, read by the log-prob kernels without a forward that
    # would unshard it), back to fp32 for the root unit: exact, and cast to bf16 again for the matmul.
    # Unless the root unit is in one dtype already (models held wholly in bf16: trainer.master_weights: none).
    if len({p.dtype for p in model.parameters() if id(p) not in inside}) > 1:
        for module in outside:
            module.float()
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def shard_from_first(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """:func:`shard` a model whose weights only the first process loaded (the others hold the architecture
    on the meta device), then give every process its shards of them. Collective."""
    full = model.state_dict() if accelerator.is_main_process else None  # kept until the shards are sent
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model = shard(model, accelerator)
    _materialize(model, full, buffers, accelerator.device)
    return model


def prepare(run: Any, make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> tuple[torch.nn.Module, Any, list[torch.nn.Parameter]]:
    """The run's model and optimiser ready to train (DDP through accelerate, or sharded with FSDP2, where
    the sharded policy then computes a pending reference cache), and the trainable parameters to clip."""
    accelerator = run.accelerator
    if not sharded(accelerator):
        if fsdp_requested():
            log.info("FSDP with one process: nothing to shard; training unsharded")
        params = [p for p in run.model.parameters() if p.requires_grad]
        model, optimizer = accelerator.prepare(run.model, make_optimizer(params))
        return model, optimizer, params
    if run.config.trainer.precision == "fp16":
        raise ConfigError("FSDP with trainer.precision fp16 is not supported (loss scaling of sharded gradients); use bf16")
    model = shard_from_first(run.model, accelerator)
    run.fill_pending_cache(model)  # a cached reference, computed by the sharded policy
    params = [p for p in model.parameters() if p.requires_grad]  # sharded: new parameter objects
    return model, accelerator.prepare(make_optimizer(params)), params
