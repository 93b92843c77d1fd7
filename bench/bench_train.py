"""Training throughput of `restpg.training.trainer.fit`: SmolLM2-135M, float32, AdamW, batch 4 × 256 tokens,
eager CPU vs torch-xla PJRT CPU, side by side in one process.

    .venv/bin/python bench/bench_train.py [--steps 4] [--home .restpg]

Steady-state tokens/s leave out the first two steps (XLA compiles the forward/backward graph on
step 1 and the optimizer graph with its initialised state on step 2). Wall-clock rates depend on
what else runs on the machine; tokens per CPU-second (all threads of the process) do not, so both are
reported, with the load average. Prints one JSON line per device and a summary line; writes
bench/out/train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# The XLA device must exist before the first backward in this process (see training.devices.pick_device).
os.environ.setdefault("PJRT_DEVICE", "CPU")
import torch_xla  # noqa: E402

torch_xla.device()

import torch  # noqa: E402

from restpg.training import trainer  # noqa: E402
from restpg.training.devices import xla_compilations  # noqa: E402
from restpg.training.data import IGNORE_INDEX  # noqa: E402
from restpg.config import TrainConfig, load_settings  # noqa: E402

POLICY = "packaged:smollm2-135m-instruct"


def fixed_batches(vocab: int, n: int, length: int, seed: int = 0) -> list[dict]:
    """Full-length rows (no padding), the first half a masked prompt: every step has the same shape."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2:], "weight": 1.0})
    return rows


def bench(device: str, base_dir: Path, steps: int, batch: int, length: int, profile: TrainConfig) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # the profile's schedule: at lr·weight_decay < 2**-25 AdamW's decay factor 1 - lr·wd rounds to exactly 1.0 in
    # float32, and torch_xla traces a graph without that scalar (one more compilation at that step); a bench
    # that decays to 1e-8 measures that, not the pipeline's steady state
    cfg = TrainConfig(device=device, optimizer="adamw", lr=profile.lr, weight_decay=profile.weight_decay,
                      lr_final_ratio=profile.lr_final_ratio, warmup_steps=0, batch_size=batch, micro_batch_size=batch,
                      steps=steps, length_buckets=[length], eval_every=10 ** 9, checkpoint_every=0, log_every=1)
    data = fixed_batches(model.config.vocab_size, batch * steps, length)
    # CPU seconds per step (all threads of this process, XLA's included) do not depend on what else
    # runs on the machine; wall seconds do. log_every=1 makes fit sync and call back after every step.
    marks, compiled = [time.process_time()], [xla_compilations() if device == "xla" else 0]

    def mark(metrics, step) -> None:
        marks.append(time.process_time())
        compiled.append(xla_compilations() if device == "xla" else 0)

    started = time.time()
    result = trainer.fit(model, data, cfg, pad_id=0, log_metrics=mark)
    wall = time.time() - started
    cpu_seconds = [b - a for a, b in zip(marks, marks[1:])]
    tokens_per_step = batch * length
    steady = result.step_seconds[2:] or result.step_seconds[1:]
    steady_cpu = cpu_seconds[2:] or cpu_seconds[1:]
    return {"device": result.device, "steps": steps, "tokens_per_step": tokens_per_step,
            "first_step_s": round(result.step_seconds[0], 1), "second_step_s": round(result.step_seconds[1], 1),
            "steady_step_s": round(statistics.mean(steady), 2),
            "steady_tokens_per_s": round(tokens_per_step / statistics.mean(steady), 1),
            "overall_tokens_per_s": round(result.tokens_per_s, 1), "compilations": result.compilations,
            "compilations_after_warmup": compiled[-1] - compiled[min(2, len(compiled) - 1)],  # steps 3..n
            "compilations_by_step": [b - a for a, b in zip(compiled, compiled[1:])],
            "first_step_cpu_s": round(cpu_seconds[0], 1), "steady_step_cpu_s": round(statistics.mean(steady_cpu), 2),
            "tokens_per_cpu_s": round(tokens_per_step / statistics.mean(steady_cpu), 1),
            "wall_s": round(wall, 1), "first_loss": round(result.first_loss, 4), "final_loss": round(result.final_loss, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--home", default=None, help="restpg home holding the converted checkpoint cache")
    args = parser.parse_args()
    settings = load_settings("local", home=args.home)
    try:
        from restpg import models
    except ImportError:
        print("restpg.models is not there yet: nothing to benchmark", file=sys.stderr)
        return 0
    started = time.time()
    base_dir = models.checkpoint_dir(POLICY, settings)
    print(f"checkpoint {base_dir} ready in {time.time() - started:.0f}s", file=sys.stderr)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = [bench(device, base_dir, args.steps, args.batch, args.length, settings.train) for device in ("cpu", "xla")]
    for row in rows:
        print(json.dumps(row))
    cpu, xla = rows
    summary = {"model": POLICY, "dtype": "float32", "batch": f"{args.batch}x{args.length}", "threads": torch.get_num_threads(),
               "load_avg_1m": round(os.getloadavg()[0], 1),
               "xla_over_eager_steady": round(xla["steady_tokens_per_s"] / cpu["steady_tokens_per_s"], 2),
               "xla_over_eager_per_cpu_s": round(xla["tokens_per_cpu_s"] / cpu["tokens_per_cpu_s"], 2),
               "xla_compilations_after_warmup": xla["compilations_after_warmup"],
               "xla_compilations_by_step": xla["compilations_by_step"],
               "first_loss_rel_diff": abs(xla["first_loss"] - cpu["first_loss"]) / cpu["first_loss"]}
    print(json.dumps(summary))
    out = Path(__file__).with_name("out")
    out.mkdir(exist_ok=True)
    (out / "train.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
