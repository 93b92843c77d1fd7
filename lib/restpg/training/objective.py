"""What one optimizer step minimises and how: the reward-weighted NLL (Algorithm 1, line 11), the
learning-rate schedule, and the optimizer."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from restpg.config import TrainConfig
from restpg.training.data import IGNORE_INDEX


def weighted_tokens(labels: torch.Tensor, weights: torch.Tensor) -> float:
    """sum_i w_i * n_i: the normaliser of `weighted_nll` (n_i = completion tokens of example i)."""
    return float((weights[:, None] * (labels[:, 1:] != IGNORE_INDEX)).sum())


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, denominator=None) -> torch.Tensor:
    """Reward-weighted token NLL on completion tokens: sum_i w_i sum_t nll_it / sum_i w_i n_i.

    Labels are aligned with the inputs (HF convention); position t predicts label t+1. Dividing by the
    weighted token count makes weights of 1.0 give the plain mean-token NLL, an example of weight 0
    vanish from numerator and denominator (as if it were not in the batch), and weight 2 count exactly
    as the example twice. Pass ``denominator`` to normalise over a whole optimizer step of micro-batches
    (then the accumulated gradient equals that of one big batch); a tensor keeps XLA from recompiling.
    """
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    token_weights = weights[:, None].to(nll.dtype) * (targets != IGNORE_INDEX)
    if denominator is None:
        denominator = token_weights.sum().clamp_min(1e-8)
    return (nll * token_weights).sum() / denominator


def completion_window(labels: torch.Tensor) -> int:
    """Trailing positions of a right-padded batch whose logits the loss reads: from the position that predicts
    the earliest completion token of any row to the end (0 when no row has a completion token). The
    prompt's positions before it predict nothing the loss counts, so their logits (the output layer and
    a softmax over the whole vocabulary per position: most of Gemma's compute) need not be computed."""
    counted = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(counted) == 0:
        return 0
    return labels.shape[1] - int(counted[0]) + 1


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of 0-based `step`: linear warm-up to cfg.lr, then linear decay to lr * lr_final_ratio
    at the last step. Warm-up starts above zero (nanoGPT's (step+1)/(warmup+1)) so no step is wasted."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (1.0 - (1.0 - cfg.lr_final_ratio) * progress)


def inert_decay_step(cfg: TrainConfig, total_steps: int) -> int | None:
    """First 1-based step whose AdamW decay factor 1 - lr·weight_decay is exactly 1.0 in float32 (lr·wd
    below 2**-25), or None. torch_xla traces a different graph for a factor of 1.0 than for any other
    value (one fewer graph input), so a schedule that decays that far costs one more compilation there."""
    if cfg.optimizer != "adamw" or cfg.weight_decay <= 0:
        return None
    for step in range(total_steps):
        factor = torch.tensor(1.0 - lr_at(step, cfg, total_steps) * cfg.weight_decay, dtype=torch.float32)
        if factor.item() == 1.0:
            return step + 1
    return None


def make_optimizer(params: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not norms or biases), as in nanoGPT."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # scale_parameter=False also keeps a host sync (a Python max over a tensor) out of the XLA step
        return Adafactor(groups, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"train.optimizer must be adafactor or adamw, got {cfg.optimizer!r}")


AUTOCAST_DTYPES = ("float32", "bfloat16")


def autocast_dtype(kind: str, bf16_supported: bool | None = None) -> str:
    """The autocast dtype of a training device: bfloat16 on a CUDA GPU that supports it (Ampere and later:
    its tensor cores run bf16 matmuls many times faster than float32, and a Gemma-size logits tensor halves),
    float32 elsewhere (the CPU and XLA paths keep their measured float32)."""
    if kind != "cuda":
        return "float32"
    supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
    return "bfloat16" if supported else "float32"


def autocast(device_type: str, dtype: str = "float32"):
    """The context a forward pass runs in: "bfloat16" runs matmuls in bfloat16 under `torch.autocast`
    while weights, gradients and optimizer state stay float32 (the loss is taken in float32 by
    `weighted_nll`); "float32" changes nothing. On CPUs with bf16 matmul units (AVX512-BF16, AMX) this is
    the cheaper half of mixed precision; `make bench` measures it against eager float32."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast dtype must be one of {AUTOCAST_DTYPES}, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
