"""Where training runs: an XLA device through torch-xla (PJRT CPU locally, TPU/GPU on a cluster),
CUDA, or the CPU; the graph cut that ends an XLA step; the count of graphs XLA compiled."""
from __future__ import annotations

import logging
import os

import torch

from restpg.runtime import default_pjrt_device

log = logging.getLogger(__name__)


def pick_device(kind: str) -> tuple[torch.device, str]:
    """(device, kind actually used). xla → PJRT (CPU unless a TPU or PJRT_DEVICE says otherwise);
    falls back to cuda, then cpu, with a logged warning. The XLA device must be started before the
    process's first backward pass (autograd sizes its per-device queues then): a process that trains
    eagerly and then on XLA must call ``torch_xla.device()`` up front."""
    if kind == "xla":
        default_pjrt_device()
        try:
            import torch_xla

            return torch_xla.device(), "xla"
        except (ImportError, RuntimeError) as e:  # not installed, or its PJRT runtime did not start: no XLA here
            log.warning("torch_xla could not start (%s); training without XLA", e)
            kind = "cuda"
    if kind == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "cuda"
        log.warning("CUDA is not available; training on the CPU")
    return torch.device("cpu"), "cpu"


def sync(kind: str) -> None:
    """On XLA, cut the graph here: compile it (once per shape) and run it; elsewhere nothing."""
    if kind == "xla":
        import torch_xla

        torch_xla.sync()


def xla_compilations() -> int:
    """Graphs compiled so far in this process (torch-xla's UncachedCompile counter)."""
    try:
        import torch_xla.debug.metrics as met
    except ImportError:
        return 0
    return int(met.counter_value("UncachedCompile") or 0)
