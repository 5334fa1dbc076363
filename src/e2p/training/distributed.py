"""Process-group set-up for data-parallel training launched by `torchrun` or `accelerate launch`.

Both launchers start one process per worker and set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `train_projector` then splits every global batch across the processes (see e2p.training.loop).
"""
from __future__ import annotations

import datetime
import logging
import os

log = logging.getLogger(__name__)


def default_backend() -> str:
    """gloo for CPU tensors; with CUDA, gloo for CPU tensors and NCCL for CUDA ones.

    The training loop keeps the projector's gradients wherever the projector lives (CPU today), and
    NCCL cannot reduce CPU tensors, so plain "nccl" would fail there; the composite backend
    routes each collective by the tensor's device. E2P_DIST_BACKEND overrides it.
    """
    import torch

    if os.environ.get("E2P_DIST_BACKEND"):
        return os.environ["E2P_DIST_BACKEND"]
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group when started by torchrun / accelerate (WORLD_SIZE > 1); return (rank, world).

    A no-op for a plain single process or when a group already exists. The timeout (E2P_DIST_TIMEOUT_S,
    default 1 hour) bounds how long ranks wait for each other, e.g. while rank 0 alone validates.
    """
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        backend = backend or default_backend()
        timeout_s = timeout_s if timeout_s is not None else float(os.environ.get("E2P_DIST_TIMEOUT_S", "3600"))
        if "nccl" in backend and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group): after rank 0 writes what the others read next."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
