"""Multi-worker training (`train.num_workers` > 1): the same `trainer.fit` in N processes under
Spark's `TorchDistributor`, gradients summed over torch.distributed (gloo on CPUs, NCCL on GPUs).

Every rank loads the same start checkpoint with the same seed and draws the same steps; each
computes the gradients of its share of a step's micro-batches, so the global batch and the loss
curve are the single-process ones. Rank 0 alone selects checkpoints, writes resume states (under
the job directory, which every rank and the driver can read: a Volume path on Databricks, not
node-local disk) and the selected weights, which the driver then loads. Metrics are returned to the
driver, which logs them to MLflow; progress lines come from rank 0.

XLA is a single-process path here: distributed workers train on CUDA when the cluster has GPUs,
else on the CPU.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from restpg.config import TrainConfig
from restpg.training import checkpoints, trainer

SELECTED, RESULT = "selected.pt", "result.pt"  # rank 0's outputs in the job directory


def _save(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path.with_name(f".{path.name}.tmp"))
    os.replace(path.with_name(f".{path.name}.tmp"), path)


def _worker(start_dir: str, rows: list[dict], cfg: TrainConfig, pad_id: int, select, store_root: str | None,
            out_dir: str):
    """One rank (run by torchrun, which sets RANK / WORLD_SIZE / MASTER_ADDR): (FitResult, metrics) on rank 0."""
    import torch.distributed as dist

    gpu = cfg.device == "cuda"
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if not gpu:  # the node's cores shared between the ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        torch.manual_seed(cfg.seed)
        model = checkpoints.load_for_training(start_dir, cfg)
        metrics: list = []
        store = checkpoints.ResumeStore(Path(store_root)) if store_root else None
        fit = trainer.fit(model, rows, cfg, pad_id=pad_id, select=select if rank == 0 else None, store=store,
                          log_metrics=lambda m, step: metrics.append((m, step)), rank=rank, world=world)
        if rank == 0:  # every rank's return value goes to one file, last writer wins: rank 0 keeps its own
            _save(Path(out_dir) / SELECTED, model.state_dict())
            _save(Path(out_dir) / RESULT, (fit, metrics))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fit(start_dir, rows: list[dict], cfg: TrainConfig, *, num_workers: int, pad_id: int, select=None,
        store_root: Path | None = None, out_dir: Path, local_mode: bool = True):
    """`trainer.fit` in `num_workers` processes: (model holding the selected state, FitResult, [(metrics, step)])."""
    from pyspark.ml.torch.distributor import TorchDistributor

    gpu = cfg.device == "cuda" and torch.cuda.is_available()
    cfg = dataclasses.replace(cfg, device="cuda" if gpu else "cpu")
    out_dir = Path(out_dir)
    for stale in (SELECTED, RESULT):  # a killed earlier attempt's outputs must not pass for this one's
        (out_dir / stale).unlink(missing_ok=True)
    TorchDistributor(num_processes=num_workers, local_mode=local_mode, use_gpu=gpu).run(
        _worker, str(start_dir), rows, cfg, pad_id, select, str(store_root) if store_root else None, str(out_dir))
    if not (out_dir / RESULT).exists():
        raise RuntimeError(f"distributed training with {num_workers} workers ended without rank 0's result in {out_dir}")
    result, metrics = torch.load(out_dir / RESULT, map_location="cpu", weights_only=False)
    torch.manual_seed(cfg.seed)
    model = checkpoints.load_for_training(start_dir, cfg)
    model.load_state_dict(torch.load(out_dir / SELECTED, map_location="cpu"))
    return model, result, metrics
