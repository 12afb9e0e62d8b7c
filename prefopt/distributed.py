"""How this process was launched (torchrun, accelerate launch, plain python) and the Accelerator options that follow."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from prefopt.errors import ConfigError

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


def check_launch() -> None:
    """Refuse launches that would otherwise train wrongly or crash on one rank, with a message saying what to do."""
    several = world_size() > 1
    if _flag("ACCELERATE_USE_FSDP"):
        # accelerate shards only on accelerators: on CPU it quietly trains with DDP instead, and
        # prefopt's checkpoints and final save gather unsharded weights only.
        raise ConfigError(
            "FSDP (an accelerate config with distributed_type: FSDP) is not supported by this version of prefopt: "
            "its checkpoints and final model are written from unsharded weights, and on CPU accelerate would train "
            "with DDP instead. Use DDP (examples/accelerate/ddp.yaml), or a cached reference "
            "(reference.mode: cache), which holds no reference weights during training."
        )
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
    """Log how many processes train together and on what; warn that DeepSpeed is passed through untested."""
    kind = accelerator.distributed_type.value
    if accelerator.num_processes > 1:
        log.info("%d processes (%s on %s)", accelerator.num_processes, kind, accelerator.device.type)
    if kind == "DEEPSPEED":
        log.warning("DeepSpeed is passed through to accelerate untested: prefopt's gradient clipping, "
                    "checkpoints and final save assume DDP; check the run's results")
