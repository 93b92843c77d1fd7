"""The training loop, top to bottom: resume → step 0 baseline → steps (loss, schedule, clip,
optimizer) with selection every `eval_every` steps and a resume state every `checkpoint_every` →
the selected state left in the model.

SFT (every weight 1.0) and the M-step of REST-PG (reward-weighted NLL) are this one loop; only the
rows' weights differ. Every job trains exactly `cfg.steps` optimizer steps whatever the number of
rows, and the checkpoint kept is the trained step (every `eval_every` multiple and the last step)
whose own outputs earn the highest mean reward on a fixed validation sample (the paper's checkpoint
selection), not the lowest loss. Step 0, the untrained start, is scored as the curve's baseline
(`initial_reward`) but is never kept: a training job always hands on a trained model.

On XLA every micro-batch is padded to one of a few bucket lengths and ends with a graph cut, so few
graphs get compiled; their number is reported as ``compilations``.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from restpg.config import TrainConfig
from restpg.tracking import say
from restpg.training.checkpoints import ResumeStore
from restpg.training.data import DataOrder, collate, token_grouped
from restpg.training.devices import pick_device, sync, xla_compilations
from restpg.training.objective import (autocast, autocast_dtype, completion_window, inert_decay_step, lr_at, make_optimizer,
                                       weighted_nll, weighted_tokens)

Select = Callable[[torch.nn.Module], float]  # model (eval mode) -> mean reward of its outputs


class TrainingInterrupted(RuntimeError):
    """Raised by `fit(stop_after_steps=n)` right after step n, as if the job had been killed there."""


@dataclass
class FitResult:
    steps: int
    first_loss: float
    final_loss: float
    best_step: int  # the step whose state the model holds now: a trained step (>= 1), never the start
    best_reward: float  # its selection reward (nan without a selector: then the last step is kept)
    initial_reward: float  # the selection reward of the starting checkpoint (step 0: baseline only, never kept)
    curve: list  # [(step, selection reward)], the step 0 baseline first
    tokens_per_s: float
    compilations: int
    device: str
    epochs: float  # passes over the training rows
    resumed_from: int = 0  # the step a resume state brought this job to (0 = a fresh start)
    step_seconds: list = field(default_factory=list)  # wall time per step of this process, exact only where the loss was fetched
    workers: int = 1  # processes that shared each step's micro-batches


def _trainable_state(model) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _keep_state(model, folder: str | None):
    """The best step's trainable parameters: a copy in memory, or with `folder` (train.best_state_on_disk) a file
    written from the live tensors without a copy, so the kept step costs no resident memory while training goes on
    (a float32 copy of the policy: 0.54 GB at 135M parameters)."""
    if folder is None:
        return _trainable_state(model)
    path = os.path.join(folder, "best.pt")
    torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, path)  # no copy on a CPU
    return path


def _state(kept) -> dict | None:
    """The parameters `_keep_state` kept (read back from its file, memory-mapped, where it wrote one)."""
    return torch.load(kept, mmap=True, weights_only=True) if isinstance(kept, str) else kept


def _format_ok_rate(select) -> float | None:
    """Share of format-ok outputs in the selector's latest call (`Selector.last`), None when it keeps none."""
    ok = getattr(select, "last", {}).get("format_ok")
    return sum(map(bool, ok)) / len(ok) if ok else None


def _reward(select: Select, model, twin, kind: str) -> float:
    """Selection reward of the model's current state. On XLA a CPU twin generates (token-by-token
    decoding would compile a graph per length); elsewhere the training model itself, in eval mode."""
    target = model
    if twin is not None:
        sync(kind)
        twin.load_state_dict(model.state_dict())
        target = twin
    target.eval()
    try:
        return float(select(target))
    finally:
        model.train()


def _all_reduce(params, step_loss) -> None:
    """Sum every rank's gradients and step loss (one flat buffer, one collective). Each rank's loss is
    already divided by the whole step's token weight, so the sum is the single-process gradient."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [step_loss.reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    step_loss.copy_(flat[-1])


def fit(model, rows: list[dict], cfg: TrainConfig, *, pad_id: int, select: Select | None = None,
        store: ResumeStore | None = None, log_metrics=None, stop_after_steps: int | None = None,
        rank: int = 0, world: int = 1) -> FitResult:
    """Train `model` in place for cfg.steps steps on `rows` (features with a "weight"), leaving the
    selected state in it, on the CPU. `store`: resume from its latest state and save one every
    cfg.checkpoint_every steps and at the end. `log_metrics(metrics, step)`: loss, lr, tokens/s,
    selection_reward.

    With `world` > 1 this is one of `world` processes of an initialised torch.distributed group
    (`restpg.training.distributed`): every rank draws the same step (same seed, same row order) and
    computes the gradients of its share of the step's micro-batches; the summed gradients make every
    rank take the same optimizer step. Only rank 0 selects checkpoints and writes resume states."""
    dev, kind = pick_device(cfg.device)
    total_steps, order = cfg.steps, DataOrder(len(rows), cfg.seed)
    resume = store.latest() if store is not None else None
    if resume is not None:
        model.load_state_dict(resume["params"], strict=False)
        order.load_state_dict(resume["data_order"])
        torch.set_rng_state(resume["torch_rng"])
        if rank == 0:
            say(f"train: resuming at step {resume['step']}/{total_steps} from {store.root}")
    twin = copy.deepcopy(model) if select is not None and kind == "xla" else None
    kept_files = tempfile.TemporaryDirectory(prefix="restpg-best-") if cfg.best_state_on_disk and select is not None else None
    kept_dir = kept_files.name if kept_files is not None else None
    model.to(dev).train()
    precision = autocast_dtype(kind)  # bf16 matmuls on a CUDA GPU that has them; weights and optimizer stay float32
    use_cache = getattr(model.config, "use_cache", None)
    if cfg.gradient_checkpointing:  # activations recomputed layer by layer in backward (no KV cache in training)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    micro = max(1, min(cfg.micro_batch_size, cfg.batch_size))
    lengths = [len(r["input_ids"]) for r in rows]
    accum = max(1, cfg.batch_size // micro)
    compiled_before = xla_compilations() if kind == "xla" else 0
    inert = inert_decay_step(cfg, total_steps) if kind == "xla" else None
    if inert is not None and rank == 0:
        say(f"train: from step {inert} lr x weight_decay < 2**-25, so AdamW's decay factor is 1.0 in float32 and "
            f"XLA compiles one more graph there (raise train.lr_final_ratio or train.lr to avoid it)")
    log_metrics = log_metrics or (lambda metrics, step: None)

    start, curve = 0, []
    # candidates are trained steps only (step 0 is the baseline); without a selector the last step is kept
    best_step, best_reward, best_state = total_steps, -math.inf, None
    best_ok = -math.inf  # format-ok rate of the best step: breaks reward ties (see _format_ok_rate)
    first_loss = final_loss = math.nan
    tokens, train_seconds, step_seconds, pending = 0, 0.0, [], []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        start, curve = resume["step"], [tuple(x) for x in resume["curve"]]
        first_loss, final_loss = resume["first_loss"], resume["final_loss"]
        tokens, train_seconds = resume["tokens"], resume["train_seconds"]
        best_step, best_reward, best_state = resume["best"]["step"], resume["best"]["reward"], resume["best"]["params"]
        best_ok = resume["best"].get("ok", 0.0)
        if best_step == 0:  # saved by a version that let the untrained start compete: only trained steps do now
            best_step, best_reward, best_state, best_ok = total_steps, -math.inf, None, -math.inf
        if best_state is None and select is not None and best_step == start:  # saved once, as the current params
            best_state = _trainable_state(model)

    def evaluate(step: int) -> None:
        nonlocal best_step, best_reward, best_state, best_ok
        reward = _reward(select, model, twin, kind)
        ok = _format_ok_rate(select)
        curve.append((step, reward))
        log_metrics({"selection_reward": reward, **({} if ok is None else {"selection_format_ok": ok})}, step)
        say(f"train step {step}/{total_steps} | selection reward {reward:.4f}"
            + ("" if ok is None else f" | format ok {ok:.0%}") + (" | baseline, never kept" if step == 0 else ""))
        if step == 0:  # the untrained start is what training is measured against, not a result of it
            return
        # the higher reward wins, then the higher format-ok rate; full ties keep the earlier step; nan never wins
        if reward > best_reward or (reward == best_reward and (ok or 0.0) > best_ok):
            best_step, best_reward, best_state, best_ok = step, reward, _keep_state(model, kept_dir), ok or 0.0

    if select is not None and start == 0:
        evaluate(0)
    started = time.time()
    for step in range(start + 1, total_steps + 1):
        t0 = time.time()
        lr = lr_at(step - 1, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        drawn = order.take(micro * accum)  # the rows `accum` draws of `micro` take, in the same order
        if cfg.micro_batch_tokens > 0 and kind != "xla":  # XLA would compile a graph per micro-batch shape
            step_indices = token_grouped(drawn, lengths, micro, cfg.micro_batch_tokens, cfg.length_buckets)
        else:
            step_indices = [drawn[s:s + micro] for s in range(0, len(drawn), micro)]
        step_batches = [collate([rows[i] for i in idx], [rows[i]["weight"] for i in idx], cfg.length_buckets, pad_id)
                        for idx in step_indices]
        tokens += sum(len(rows[i]["input_ids"]) for idx in step_indices for i in idx)
        # one normaliser for the whole step, as a device tensor (a Python float would be a graph constant)
        denominator = torch.tensor(max(sum(weighted_tokens(b["labels"], b["weights"]) for b in step_batches), 1e-8), device=dev)
        step_loss = torch.zeros((), device=dev)
        for b in step_batches[rank::world]:
            # logits of the completion window only (the loss reads nothing before it); on XLA the whole
            # width, since a window that varies per batch would compile a graph per width
            window = completion_window(b["labels"]) if kind != "xla" else 0
            labels = b["labels"][:, -window:] if window else b["labels"]
            with autocast(dev.type, precision):
                logits = model(input_ids=b["input_ids"].to(dev), use_cache=False, logits_to_keep=window).logits
            loss = weighted_nll(logits, labels.to(dev), b["weights"].to(dev), denominator)
            loss.backward()
            step_loss = step_loss + loss.detach()
            sync(kind)
        if world > 1:
            _all_reduce(params, step_loss)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(kind)
        pending.append(step_loss)

        logging_step = step in (1, total_steps) or (cfg.log_every > 0 and step % cfg.log_every == 0)
        if logging_step:
            losses = [x.item() for x in pending]  # the only host sync of a training step
            pending = []
            first_loss = losses[0] if step == 1 else first_loss
            final_loss = losses[-1]
        step_seconds.append(time.time() - t0)
        train_seconds += step_seconds[-1]
        if logging_step:
            rate = tokens / max(train_seconds, 1e-9)
            eta = (time.time() - started) / (step - start) * (total_steps - step)
            if rank == 0:
                say(f"train step {step}/{total_steps} | loss {final_loss:.4f} | lr {lr:.2e} | {rate:.0f} tok/s | eta {eta:.0f}s")
            log_metrics({"loss": final_loss, "lr": lr, "tokens_per_s": rate}, step)

        if select is not None and (step == total_steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
            evaluate(step)
        if store is not None and rank == 0 and cfg.checkpoint_every > 0 and (step == total_steps or step % cfg.checkpoint_every == 0):
            store.save({"step": step, "params": _trainable_state(model), "optimizer": optimizer.state_dict(),
                        "data_order": order.state_dict(), "torch_rng": torch.get_rng_state(), "curve": curve,
                        "best": {"step": best_step, "reward": best_reward, "ok": best_ok,  # current params when best_step == step
                                 "params": _state(best_state) if best_step != step else None},
                        "first_loss": first_loss, "final_loss": final_loss, "tokens": tokens,
                        "train_seconds": train_seconds})
        if stop_after_steps is not None and step >= stop_after_steps:
            raise TrainingInterrupted(f"stopped after step {step}")

    if select is not None and best_reward == 0.0 and best_ok == 0.0:
        # no trained step wrote one usable output (every reward 0 for its format): no evidence for an earlier
        # step, so the most trained one is kept
        say(f"train: no selection output was usable at any trained step; keeping the last step ({total_steps})")
        best_step, best_state = total_steps, _trainable_state(model)
    compilations = xla_compilations() - compiled_before if kind == "xla" else 0
    if cfg.gradient_checkpointing:  # the checkpoint saved from this model generates with its cache, as before
        model.activation_checkpointing_disable()
        model.config.use_cache = use_cache
    model.to("cpu")
    if best_state is not None and best_step != total_steps:
        model.load_state_dict(_state(best_state), strict=False)
    if kept_files is not None:
        kept_files.cleanup()
    return FitResult(total_steps, first_loss, final_loss, best_step, best_reward if best_state is not None else math.nan,
                     curve[0][1] if curve else math.nan, curve, tokens / max(train_seconds, 1e-9), compilations, kind,
                     order.epochs, start, step_seconds, world)
