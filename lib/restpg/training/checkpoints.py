"""Where a training job keeps its state: the model it starts from, periodic resume states, and the
selected checkpoint it hands to the registry.

A job's directory is keyed by what determines its result — variant, iteration, the training-set
version it read and a hash of the train config, the start checkpoint and the settings that shape
the data and the selection — never by the MLflow run id, so a killed job that is started again
(in a new run) finds its own resume state and nobody else's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from restpg.config import Settings, TrainConfig

CHECKPOINT_META = "restpg_checkpoint.json"


_PLACEMENT = ("num_workers", "checkpoint_root")  # train settings that say where a job runs, not what it computes


def job_dir(settings: Settings, *, variant: str, iteration: int, training_set_version: int, init_ref: str) -> Path:
    """``<train.checkpoint_root or home/checkpoints>/<variant>-it<t>-ts<version>-<hash>``: the same job always
    maps to the same directory. Where it runs (the root, the number of processes) is not part of the job:
    a job killed on one GPU count resumes on another."""
    train = {k: v for k, v in dataclasses.asdict(settings.train).items() if k not in _PLACEMENT}
    key = {"variant": variant, "train": train, "init_ref": init_ref,
           # they decide which rows are dropped as too long and how the selection reward is measured
           "prompt": dataclasses.asdict(settings.prompt), "reward": settings.judge.reward,
           "selection_decoding": [settings.evaluate.temperature, settings.evaluate.top_p, settings.sample.seed]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.=-]", "_", variant)
    root = Path(settings.train.checkpoint_root) if settings.train.checkpoint_root else settings.home_dir / "checkpoints"
    return root / f"{name}-it{iteration}-ts{training_set_version}-{digest}"


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class ResumeStore:
    """The latest resume state of one job (`state-<step>/state.pt`), written atomically: a state is
    written into a temporary directory and renamed into place, so a job killed while saving leaves
    the previous state intact. Older states are removed once a newer one is in place."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _states(self) -> list[Path]:
        return sorted(p for p in self.root.glob("state-*") if (p / "state.pt").exists())

    def latest(self) -> dict | None:
        for stale in self.root.glob(".tmp-*"):  # a save that was killed half way
            shutil.rmtree(stale, ignore_errors=True)
        states = self._states()
        return torch.load(states[-1] / "state.pt", map_location="cpu", weights_only=True) if states else None

    def save(self, state: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"state-{state['step']:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        torch.save(_to_cpu(state), tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in self._states():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def load_for_training(base_dir, cfg: TrainConfig):
    """The model in float32; wrapped with LoRA adapters when cfg.lora_rank > 0."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    return model


def save_model(model, tokenizer, out: Path, meta: dict) -> Path:
    """The selected state as a plain HF checkpoint (LoRA merged) with `restpg_checkpoint.json`, which
    carries what is needed to know where it came from; replaces `out` atomically."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=1, default=str))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out
