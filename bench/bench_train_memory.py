"""Peak memory and speed of one training job's steps, side by side: micro-batch size and gradient checkpointing.

A training job of `restpg pipeline` runs in the driver, so its activations set the driver's peak memory. Rows
shaped like the shared Amazon sample's at the local profile's budgets (batch 4; a 320-token prompt, masked, and a
192-token completion: the local profile's prompt budget and its response cap), packaged SmolLM2-135M, float32,
AdamW, CPU. Each setting trains in a fresh process (a process's peak resident memory only grows), in turn,
`--rounds` times. Per setting: peak RSS, its growth over the loaded model, steady tokens/s (steps 2..n), and the
first step's loss (the gradient of a step does not depend on how it is cut into micro-batches: the losses
must agree).

    .venv/bin/python bench/bench_train_memory.py [--steps 4] [--rounds 1] [--name cpu2-vm]

Writes bench/results/train-memory-<name>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = [("micro 4", {"micro_batch_size": 4}), ("micro 2", {"micro_batch_size": 2}),
            ("micro 1", {"micro_batch_size": 1}),
            ("micro 4 + checkpointing", {"micro_batch_size": 4, "gradient_checkpointing": True})]

CHILD = r"""
import json, os, statistics, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM
from restpg import models
from restpg.config import TrainConfig, load_settings
from restpg.runtime import peak_rss_bytes, rss_bytes
from restpg.training import trainer
from restpg.training.data import IGNORE_INDEX

args = json.loads(sys.argv[1])
settings = load_settings("local", home=args["home"])
model = AutoModelForCausalLM.from_pretrained(models.checkpoint_dir("packaged:smollm2-135m-instruct", settings), dtype=torch.float32)
loaded = rss_bytes()
g = torch.Generator().manual_seed(0)
rows = []
for _ in range(args["batch"] * args["steps"]):
    ids = torch.randint(0, model.config.vocab_size, (args["prompt"] + args["completion"],), generator=g).tolist()
    rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * args["prompt"] + ids[args["prompt"]:], "weight": 1.0})
p = settings.train
cfg = TrainConfig(device="cpu", optimizer="adamw", lr=p.lr, warmup_steps=0, batch_size=args["batch"], steps=args["steps"],
                  length_buckets=[args["prompt"] + args["completion"]], eval_every=10 ** 9, checkpoint_every=0, log_every=1,
                  **args["setting"])
started = time.time()
result = trainer.fit(model, rows, cfg, pad_id=0)
steady = result.step_seconds[1:] or result.step_seconds
tokens = args["batch"] * (args["prompt"] + args["completion"])
print(json.dumps({"loaded_rss": loaded, "peak_rss": peak_rss_bytes(), "steady_tokens_per_s": tokens / statistics.mean(steady),
                  "first_loss": result.first_loss, "wall_s": time.time() - started}))
"""


def run_one(setting: dict, args) -> dict:
    payload = {"home": args.home, "batch": args.batch, "prompt": args.prompt, "completion": args.completion,
               "steps": args.steps, "setting": setting}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bench_train_memory: {setting} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    sys.path.insert(0, str(HERE))
    from run_bench import machine, ratio_row, table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=320)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--home", default=".restpg", help="restpg home holding the converted checkpoint cache")
    ap.add_argument("--name", default="cpu2-vm")
    args = ap.parse_args()
    started, runs = time.time(), {label: [] for label, _ in SETTINGS}
    for r in range(args.rounds):
        for label, setting in SETTINGS:
            res = run_one(setting, args)
            runs[label].append(res)
            print(f"round {r + 1} {label}: peak {res['peak_rss'] / 2**30:.2f} GB (model loaded {res['loaded_rss'] / 2**30:.2f}), "
                  f"{res['steady_tokens_per_s']:.0f} tok/s, first loss {res['first_loss']:.5f}", file=sys.stderr, flush=True)
    ref = runs["micro 4"]
    rows = []
    for label, _ in SETTINGS:
        got = runs[label]
        rows.append(ratio_row(f"{label}: peak RSS", [g["peak_rss"] / 2**30 for g in got], " GB", None, "whole process", higher=False))
        rows.append(ratio_row(f"{label}: tokens/s", [g["steady_tokens_per_s"] / f["steady_tokens_per_s"] for g, f in zip(got, ref)],
                              "x", None, "micro 4")
                    | {"note": f"loss at step 1 differs from micro 4's by "
                               f"{max(abs(g['first_loss'] - f['first_loss']) for g, f in zip(got, ref)):.1e}"})
    print(table(rows))
    out = HERE / "results" / f"train-memory-{args.name}.json"
    out.write_text(json.dumps({"name": args.name, "machine": machine(args.name), "shape": {
        "batch": args.batch, "prompt": args.prompt, "completion": args.completion, "steps": args.steps},
        "runs": runs, "ratios": rows, "seconds": time.time() - started}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
