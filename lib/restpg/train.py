"""Training stage: one (variant, iteration) slice of ``training_sets`` → checkpoint → MLflow model version.

SFT (iteration 0, every weight 1.0) and the M-step of REST-PG (Algorithm 1, line 11: reward-weighted
NLL on completion tokens) are the same loop; only the rows' weights differ. Read top to bottom:
features → batches → loss → schedule → device → `fit` (the loop) → `train_worker` (one process: load,
fit, save) → `run` (the stage: read the table, split, launch, register).

The loop runs on an XLA device through torch-xla (PJRT CPU locally, TPU/GPU on a cluster), on CUDA,
or eagerly on the CPU. On XLA every micro-batch is padded to one of a few bucket lengths and ends
with a graph cut, so few graphs get compiled; their number is reported as ``compilations``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from restpg.config import Settings, TrainConfig
from restpg.tracking import say

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHECKPOINT_META = "restpg_checkpoint.json"


# --------------------------------------------------------------------------- features and batches

def build_features(tokenizer, prompt: str, completion: str, max_input_tokens: int, max_output_tokens: int) -> dict:
    """Token ids of prompt + completion + EOS, and labels with every prompt position masked (-100).

    The prompt keeps its last ``max_input_tokens`` tokens (the end, next to the answer, matters most)
    after the tokenizer's own leading special tokens (BOS for Llama-style tokenizers); the completion
    keeps its first ``max_output_tokens - 1`` tokens, then EOS so that the model learns to stop.
    """
    lead = tokenizer("", add_special_tokens=True)["input_ids"]
    body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = max(0, max_input_tokens - len(lead))
    prompt_ids = lead + (body[-keep:] if keep else [])
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"][: max(0, max_output_tokens - 1)]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def bucket_length(n: int, buckets) -> int:
    """Smallest bucket ≥ n; past the largest, n rounded up to a multiple of 128 (one more XLA shape)."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    return -(-n // 128) * 128


def collate(features: list[dict], weights: list[float], buckets, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the smallest bucket that fits the longest example.

    No attention mask: with right padding a causal model never lets a real token see a pad, and pad
    positions carry label -100, so the mask would change nothing but the graph XLA compiles.
    """
    length = bucket_length(max(len(f["input_ids"]) for f in features), buckets)
    input_ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
    return {"input_ids": input_ids, "labels": labels, "weights": torch.tensor(weights, dtype=torch.float32)}


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


# --------------------------------------------------------------------------- schedule and plan

def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate of 0-based `step`: linear warm-up to cfg.lr, then linear decay to lr * lr_final_ratio
    at the last step. Warm-up starts above zero (nanoGPT's (step+1)/(warmup+1)) so no step is wasted."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (1.0 - (1.0 - cfg.lr_final_ratio) * progress)


def plan_steps(cfg: TrainConfig, n_train: int) -> int:
    return max(1, min(cfg.max_steps, math.ceil(cfg.epochs * n_train / cfg.batch_size)))


def _micro_batches(n: int, size: int, seed: int, rank: int = 0, world: int = 1):
    """Endless index lists of `size`, reshuffled every epoch; every rank sees the same order and
    keeps every world-th micro-batch. Always full: one batch shape per bucket."""
    g = torch.Generator().manual_seed(seed)

    def indices():
        while True:
            yield from torch.randperm(n, generator=g).tolist()

    stream = indices()
    k = 0
    while True:
        batch = list(islice(stream, size))
        if k % world == rank:
            yield batch
        k += 1


# --------------------------------------------------------------------------- devices

def _tpu_present() -> bool:
    return any(k in os.environ for k in ("TPU_NAME", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")) or Path("/dev/accel0").exists()


def pick_device(kind: str) -> tuple[torch.device, str]:
    """(device, kind actually used). xla → PJRT (CPU unless a TPU or PJRT_DEVICE says otherwise);
    falls back to cuda, then cpu, with a logged warning. The XLA device must be started before the
    process's first backward pass (autograd sizes its per-device queues then): a process that trains
    eagerly and then on XLA must call ``torch_xla.device()`` up front."""
    if kind == "xla":
        if "PJRT_DEVICE" not in os.environ and not _tpu_present():
            os.environ["PJRT_DEVICE"] = "CPU"
        try:
            import torch_xla

            return torch_xla.device(), "xla"
        except Exception as e:  # noqa: BLE001 - any failure to start the runtime means "no XLA here"
            log.warning("torch_xla could not start (%s); training without XLA", e)
            kind = "cuda"
    if kind == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "cuda"
        if kind != "cpu":
            log.warning("CUDA is not available; training on the CPU")
    return torch.device("cpu"), "cpu"


def _sync(kind: str) -> None:
    if kind == "xla":
        import torch_xla

        torch_xla.sync()  # cut the graph here: compile (once per shape) and run it


def xla_compilations() -> int:
    """Graphs compiled so far in this process (torch-xla's UncachedCompile counter)."""
    try:
        import torch_xla.debug.metrics as met
    except ImportError:
        return 0
    return int(met.counter_value("UncachedCompile") or 0)


def _distributed_rank(kind: str) -> tuple[int, int]:
    """(rank, world size). WORLD_SIZE > 1 (torchrun / TorchDistributor) → a torch.distributed group;
    under torch_xla's launcher the XLA runtime knows both."""
    if kind == "xla":
        import torch_xla.runtime as xr

        return xr.global_ordinal(), xr.world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        return dist.get_rank(), world
    return 0, 1


def _average_gradients(params: list, kind: str, world: int) -> None:
    """Mean of the ranks' gradients (DDP's semantics). Each rank normalised its loss by its own weighted
    token count, so this equals one global batch only when the ranks' counts are equal."""
    grads = [p.grad for p in params if p.grad is not None]
    if kind == "xla":
        import torch_xla.core.xla_model as xm

        xm.all_reduce(xm.REDUCE_SUM, grads, scale=1.0 / world)
        return
    import torch.distributed as dist

    for g in grads:
        dist.all_reduce(g)
        g.div_(world)


# --------------------------------------------------------------------------- optimizer and the loop

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


@dataclass
class FitResult:
    steps: int
    first_loss: float
    final_loss: float
    best_val_loss: float
    best_step: int
    tokens_per_s: float
    compilations: int
    device: str
    step_seconds: list = field(default_factory=list)  # wall time per step, exact only where the loss was fetched
    initial_val_loss: float = math.nan  # the validation loss of the starting checkpoint


@torch.no_grad()
def evaluate(model, features: list[dict], micro: int, buckets, pad_id: int, dev, kind: str) -> float:
    """Weighted NLL over `features` (same normalisation as training)."""
    model.eval()
    total, denominator, one = torch.zeros((), device=dev), 0.0, torch.ones((), device=dev)
    for i in range(0, len(features), micro):
        chunk = features[i:i + micro]
        weights = [f["weight"] for f in chunk]
        # weight-0 copies fill the last batch: same shape (no new graph), no effect on the loss
        chunk, weights = chunk + [chunk[0]] * (micro - len(chunk)), weights + [0.0] * (micro - len(chunk))
        b = collate(chunk, weights, buckets, pad_id)
        denominator += weighted_tokens(b["labels"], b["weights"])
        logits = model(input_ids=b["input_ids"].to(dev), use_cache=False).logits
        total = total + weighted_nll(logits, b["labels"].to(dev), b["weights"].to(dev), one)
        _sync(kind)
    model.train()
    return total.item() / max(denominator, 1e-8)


def fit(model, train: list[dict], val: list[dict], cfg: TrainConfig, *, pad_id: int, log_metrics=None,
        rank: int = 0, world: int = 1) -> FitResult:
    """Train `model` in place on `train` (features with a "weight"); validate on `val` every
    cfg.eval_every steps and at the end; leave the best state (by validation loss) in `model`, on the CPU."""
    dev, kind = pick_device(cfg.device)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    micro = max(1, min(cfg.micro_batch_size, cfg.batch_size))
    accum = max(1, cfg.batch_size // micro // world)
    total_steps = plan_steps(cfg, len(train))
    batches = _micro_batches(len(train), micro, cfg.seed, rank, world)
    compiled_before = xla_compilations() if kind == "xla" else 0
    best_val, best_step, best_state = math.inf, 0, None
    pending, first_loss, final_loss, tokens, train_seconds, step_seconds = [], math.nan, math.nan, 0, 0.0, []
    initial_val = evaluate(model, val, micro, cfg.length_buckets, pad_id, dev, kind) if val else math.nan
    started = time.time()

    for step in range(1, total_steps + 1):
        t0 = time.time()
        lr = lr_at(step - 1, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_indices = list(islice(batches, accum))
        step_batches = [collate([train[i] for i in idx], [train[i]["weight"] for i in idx], cfg.length_buckets, pad_id)
                        for idx in step_indices]
        tokens += sum(len(train[i]["input_ids"]) for idx in step_indices for i in idx)
        # one normaliser for the whole step, as a device tensor (a Python float would be a graph constant)
        denominator = torch.tensor(max(sum(weighted_tokens(b["labels"], b["weights"]) for b in step_batches), 1e-8), device=dev)
        step_loss = torch.zeros((), device=dev)
        for b in step_batches:
            logits = model(input_ids=b["input_ids"].to(dev), use_cache=False).logits
            loss = weighted_nll(logits, b["labels"].to(dev), b["weights"].to(dev), denominator)
            loss.backward()
            step_loss = step_loss + loss.detach()
            _sync(kind)
        if world > 1:
            _average_gradients(params, kind, world)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(kind)
        pending.append(step_loss)

        logging_step = step == 1 or step % cfg.log_every == 0 or step == total_steps
        if logging_step:
            losses = [x.item() for x in pending]  # the only host sync of a training step
            pending = []
            first_loss = losses[0] if step == 1 else first_loss
            final_loss = losses[-1]
        step_seconds.append(time.time() - t0)
        train_seconds += step_seconds[-1]
        if logging_step and rank == 0:
            rate = tokens / max(train_seconds, 1e-9)
            eta = (time.time() - started) / step * (total_steps - step)
            say(f"train step {step}/{total_steps} | loss {final_loss:.4f} | lr {lr:.2e} | {rate:.0f} tok/s | eta {eta:.0f}s")
            if log_metrics:
                log_metrics({"loss": final_loss, "lr": lr, "tokens_per_s": rate}, step)

        if val and (step % cfg.eval_every == 0 or step == total_steps):
            val_loss = evaluate(model, val, micro, cfg.length_buckets, pad_id, dev, kind)
            if rank == 0 and log_metrics:
                log_metrics({"val_loss": val_loss}, step)
            if val_loss < best_val:
                best_val, best_step = val_loss, step
                best_state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    compilations = xla_compilations() - compiled_before if kind == "xla" else 0
    model.to("cpu")
    if best_state is not None and best_step != total_steps:
        model.load_state_dict(best_state, strict=False)
    return FitResult(total_steps, first_loss, final_loss, best_val, best_step, tokens / max(train_seconds, 1e-9),
                     compilations, kind, step_seconds, initial_val)


# --------------------------------------------------------------------------- one training process

@dataclass
class TrainJob:
    """What one training process needs. Picklable, so it can travel to TorchDistributor or torch_xla's
    launcher; on a cluster its paths must be on storage every worker sees (a Volume / DBFS path)."""
    base_dir: str
    out_dir: str
    cfg: TrainConfig
    train_rows: list  # (prompt, completion, weight)
    val_rows: list
    meta: dict  # lineage for restpg_checkpoint.json
    tracking_uri: str = ""
    mlflow_run_id: str = ""


def load_for_training(base_dir: str, cfg: TrainConfig):
    """(model, tokenizer) in float32; wrapped with LoRA adapters when cfg.lora_rank > 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model, tokenizer


def _metric_logger(job: TrainJob):
    if not job.mlflow_run_id:
        return None
    import mlflow

    if job.tracking_uri:
        mlflow.set_tracking_uri(job.tracking_uri)
    return lambda metrics, step: mlflow.log_metrics(metrics, step=step, run_id=job.mlflow_run_id)


def train_worker(job: TrainJob) -> dict:
    """Load, tokenize, fit, and (rank 0) save the best state as an HF checkpoint with
    restpg_checkpoint.json. The same function is the per-process `fn` of a multi-worker launch."""
    cfg = job.cfg
    _, kind = pick_device(cfg.device)
    rank, world = _distributed_rank(kind)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_for_training(job.base_dir, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def features(rows):
        return [dict(build_features(tokenizer, p, c, cfg.max_input_tokens, cfg.max_output_tokens), weight=float(w))
                for p, c, w in rows]

    train, val = features(job.train_rows), features(job.val_rows)
    if not val:
        log.warning("no validation rows: the best checkpoint is chosen by the loss on the training rows")
        val = train
    result = fit(model, train, val, cfg, pad_id=pad_id, log_metrics=_metric_logger(job) if rank == 0 else None,
                 rank=rank, world=world)
    summary = {**job.meta, "step": result.best_step, "steps": result.steps, "best_val_loss": result.best_val_loss,
               "first_loss": result.first_loss, "final_loss": result.final_loss, "tokens_per_s": result.tokens_per_s,
               "initial_val_loss": result.initial_val_loss,
               "compilations": result.compilations, "device": result.device, "world_size": world,
               "lora_rank": cfg.lora_rank, "train_config": dataclasses.asdict(cfg)}
    if rank == 0:
        if cfg.lora_rank > 0:
            model = model.merge_and_unload()
        out = Path(job.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / CHECKPOINT_META).write_text(json.dumps(summary, indent=1))
    return summary


def _xla_worker(index: int, job: TrainJob) -> None:
    train_worker(job)


def _launch(job: TrainJob, num_workers: int) -> dict:
    """One local process, or several: TPU/XLA devices through torch_xla's launcher (one process per
    local device), GPUs across the cluster through TorchDistributor (WORLD_SIZE set per process)."""
    if num_workers <= 1:
        return train_worker(job)
    if job.cfg.device == "xla":
        import torch_xla

        torch_xla.launch(_xla_worker, args=(job,))
    else:
        from pyspark.ml.torch.distributor import TorchDistributor

        TorchDistributor(num_processes=num_workers, local_mode=False, use_gpu=job.cfg.device == "cuda").run(train_worker, job)
    return json.loads((Path(job.out_dir) / CHECKPOINT_META).read_text())


# --------------------------------------------------------------------------- the stage

def resolve_checkpoint(ref: str, settings: Settings) -> Path:
    """HF directory of a model reference; a plain directory is used as it is."""
    if Path(ref).is_dir():
        return Path(ref)
    from restpg import models

    return Path(models.checkpoint_dir(ref, settings))


def read_training_slice(spark, settings: Settings, variant: str, iteration: int) -> tuple[int, list[dict]]:
    """(Delta version read, rows of the slice in a fixed order). Reads that exact version."""
    from pyspark.sql import functions as F

    from restpg import catalog

    version = catalog.version(spark, settings, "training_sets")
    df = (catalog.read(spark, settings, "training_sets", version=version)
          .where((F.col("variant") == variant) & (F.col("iteration") == iteration))
          .select("example_id", "sample_index", "prompt", "completion", "weight")
          .orderBy("example_id", "sample_index"))
    rows = [r.asDict() for r in df.collect()]
    if not rows:
        raise ValueError(f"training_sets has no rows for variant={variant!r} iteration={iteration} "
                         f"(table version {version}); run the stage that builds this slice first")
    return version, rows


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0 ** 64


def split_validation(rows: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val) by a hash of example_id: all samples of an example land on one side (no leakage)
    and the same examples are held out at every iteration. At least one example always trains; when
    the fraction selects none but there are two or more examples, the lowest-hash one is held out."""
    ids = sorted({r["example_id"] for r in rows}, key=_unit_hash)
    val_ids = {i for i in ids if _unit_hash(i) < val_fraction}
    if val_fraction > 0 and not val_ids and len(ids) >= 2:
        val_ids = {ids[0]}
    val_ids.discard(ids[-1])
    return [r for r in rows if r["example_id"] not in val_ids], [r for r in rows if r["example_id"] in val_ids]


def _mlflow_run(run_id: str | None, run_name: str):
    """The run to log into: `run_id` if given (reused as is when it is the active run), otherwise a
    new run, nested under the active one (the orchestrator's parent run) if there is one."""
    import contextlib

    import mlflow

    active = mlflow.active_run()
    if active is not None and run_id == active.info.run_id:
        return contextlib.nullcontext(active)
    if run_id:
        return mlflow.start_run(run_id=run_id, nested=active is not None)
    return mlflow.start_run(run_name=run_name, nested=active is not None)


def _policy_pyfunc():
    """A pyfunc that writes text from the checkpoint artifact (greedy, `max_new_tokens` param).
    Defined inside a function so cloudpickle stores the class by value: loading the model needs mlflow,
    torch and transformers, not restpg."""
    import mlflow.pyfunc

    class PolicyModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = context.artifacts["checkpoint"]
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path).eval()

        def predict(self, context, model_input, params=None):
            import torch

            prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
            max_new_tokens = int((params or {}).get("max_new_tokens", 64))
            texts = []
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
                with torch.no_grad():
                    out = self.model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
                texts.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            return texts

    return PolicyModel()


def register_checkpoint(settings: Settings, checkpoint: Path, tags: dict) -> tuple[str, str]:
    """Log `checkpoint` as a pyfunc model of the active run and register it as a new version of the
    policy model, tagged with its lineage; returns (models:/ URI, version)."""
    import mlflow
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]))
    name = settings.mlflow.policy_model_name
    info = mlflow.pyfunc.log_model(
        name="policy", python_model=_policy_pyfunc(), artifacts={"checkpoint": str(checkpoint)}, signature=signature,
        # explicit requirements: inferring them would load the model once more in a subprocess
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                          f"transformers=={transformers.__version__}", "accelerate", "safetensors"],
        registered_model_name=name)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return f"models:/{name}/{version}", version


def run(spark, settings: Settings, variant: str, iteration: int, *, init_ref: str | None = None,
        run_id: str | None = None, register: bool = True, num_workers: int = 1) -> dict:
    """Train on the (variant, iteration) slice of training_sets from `init_ref` (default: the base
    policy); save the best checkpoint by validation loss and register it in MLflow.

    `run_id`: an MLflow run to log into (default: a new run, a child of the active one if any).
    `num_workers > 1`: multi-process training (TorchDistributor for cuda, torch_xla's launcher for xla).
    """
    import mlflow

    from restpg.runtime import setup_mlflow

    cfg = settings.train
    init_ref = init_ref or settings.models.policy
    version, rows = read_training_slice(spark, settings, variant, iteration)
    rows = [r for r in rows if r["weight"] > 0]  # they would only cost compute: weight 0 adds nothing
    if not rows:
        raise ValueError(f"training_sets slice variant={variant!r} iteration={iteration} has no row with weight > 0")
    train_rows, val_rows = split_validation(rows, cfg.val_fraction)
    base_dir = resolve_checkpoint(init_ref, settings)
    if mlflow.active_run() is None:
        setup_mlflow(settings)
    with _mlflow_run(run_id, f"train-{variant}-it{iteration}") as active:
        mlflow_run_id = active.info.run_id
        out_dir = settings.home_dir / "checkpoints" / f"{variant}-it{iteration}-{mlflow_run_id[:12]}"
        mlflow.set_tags({"restpg.stage": "train", "variant": variant, "iteration": iteration})
        mlflow.log_params({"variant": variant, "iteration": iteration, "init_ref": init_ref,
                           "training_set_version": version, "train_rows": len(train_rows), "val_rows": len(val_rows),
                           "num_workers": num_workers, **{f"train.{k}": v for k, v in dataclasses.asdict(cfg).items()}})
        meta = {"variant": variant, "iteration": iteration, "init_ref": init_ref, "base_checkpoint": str(base_dir),
                "training_set_version": version, "run_id": mlflow_run_id,
                "train_rows": len(train_rows), "val_rows": len(val_rows)}
        job = TrainJob(str(base_dir), str(out_dir), cfg,
                       [(r["prompt"], r["completion"], r["weight"]) for r in train_rows],
                       [(r["prompt"], r["completion"], r["weight"]) for r in val_rows],
                       meta, mlflow.get_tracking_uri(), mlflow_run_id)
        summary = _launch(job, num_workers)
        mlflow.log_metrics({"best_val_loss": summary["best_val_loss"], "best_step": summary["step"],
                            "train_tokens_per_s": summary["tokens_per_s"], "xla_compilations": summary["compilations"]})
        model_uri = model_version = None
        if register:
            model_uri, model_version = register_checkpoint(settings, out_dir, {
                "variant": variant, "iteration": iteration, "training_set_version": version,
                "val_loss": f"{summary['best_val_loss']:.6f}", "init_ref": init_ref, "run_id": mlflow_run_id})
    return {"model_uri": model_uri, "version": model_version, "run_id": mlflow_run_id, "steps": summary["steps"],
            "best_step": summary["step"], "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
            "initial_val_loss": summary["initial_val_loss"],
            "best_val_loss": summary["best_val_loss"], "tokens_per_s": summary["tokens_per_s"],
            "compilations": summary["compilations"], "device": summary["device"], "train_rows": len(train_rows),
            "val_rows": len(val_rows), "training_set_version": version, "checkpoint_dir": str(out_dir)}
