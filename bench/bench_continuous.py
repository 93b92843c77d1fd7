"""Continuous batching and shared prefill, each side by side in one run (packaged SmolLM2-135M-Instruct, float32).

(a) E-step on a mixed-length reasoning batch: prompts alternate between a one-word question (its rows
    stop early) and a long review (its rows run to the cap), interleaved in length so that every fixed
    group holds both; `sample` with continuous batching vs without (today's fixed groups), same seeds,
    and the outputs must be equal.
(b) m = 32: `sample` vs `generate(num_return_sequences=32)` once per prompt, and `sample`'s share of the
    fp32 matmul limit (2 · params flops per token at the machine's best square-matmul rate).

    .venv/bin/python bench/bench_continuous.py [--name NAME] [--rounds 2] [--quick]

Writes bench/results/continuous-<name>.json; its last stdout line is the JSON (run_bench.py runs it as a child).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from restpg import generation, models  # noqa: E402
from restpg.config import load_settings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import (E_STEP_ROWS, POLICY, PROFILE, SAMPLING, machine, make_prompt, matmul_peak, n_tokens,  # noqa: E402
                       params_of, plain, ratio_row, shared, table, timed)

HERE = Path(__file__).resolve().parent
QUESTION = "Answer with one word only, yes or no: is a kettle used to boil water?"
REVIEW = "Write a very long, detailed review of a toaster in my style, with many paragraphs."


def mixed_prompts(tokenizer, n: int, base_tokens: int) -> list[str]:
    """n chat prompts, a question and a review in turn, prompt k about base_tokens + k tokens long: sorted by
    length (as `sample` takes them) they still alternate, so each fixed group mixes short and long rows."""
    out = []
    for k in range(n):
        request = (QUESTION, REVIEW)[k % 2]
        frame = "My past reviews: {}\n" + request
        room = base_tokens + k - generation.count_tokens(tokenizer, generation.render_chat(tokenizer, frame.format("")))
        reviews = tokenizer.decode(tokenizer(PROFILE * 20, add_special_tokens=False).input_ids[:room])
        out.append(generation.render_chat(tokenizer, frame.format(reviews)))
    return out


def bench_mixed(model, tokenizer, args) -> dict:
    prompts = mixed_prompts(tokenizer, args.mixed_prompts, args.prompt_tokens)
    seeds = [[generation.sample_seed(f"mixed{i}", j, 0, 0) for j in range(args.mixed_m)] for i in range(len(prompts))]
    budgets = {"max_new_tokens": args.response_tokens, "reasoning_tokens": args.reasoning_tokens}

    def run(continuous: bool):
        return generation.sample(model, tokenizer, prompts, seeds, max_rows=E_STEP_ROWS, continuous=continuous,
                                 **budgets, **SAMPLING)

    generation.sample(model, tokenizer, prompts[:2], [row[:2] for row in seeds[:2]], max_new_tokens=2,
                      reasoning_tokens=2, **SAMPLING)  # untimed: first-call costs land on neither side
    rounds = []
    for r in range(args.rounds):
        if r % 2:  # the order alternates, so a load change on this shared machine hits both sides
            t_cont, (cont, s_cont) = timed(run, True)
            t_fixed, (fixed, s_fixed) = timed(run, False)
        else:
            t_fixed, (fixed, s_fixed) = timed(run, False)
            t_cont, (cont, s_cont) = timed(run, True)
        lengths = [s.n_tokens for row in fixed for s in row]
        cap = args.reasoning_tokens + args.response_tokens + generation.SEPARATOR_ALLOWANCE
        row = {"fixed_s": t_fixed, "continuous_s": t_cont, "same_outputs": cont == fixed, "tokens": n_tokens(fixed),
               "rows": len(lengths), "rows_under_half_cap": sum(n < cap // 2 for n in lengths),
               "rows_at_cap": sum(not s.finished for row in fixed for s in row),
               "fixed_decode_passes": s_fixed.decode_passes, "continuous_decode_passes": s_cont.decode_passes,
               "fixed_slot_use": s_fixed.row_steps / (s_fixed.decode_passes * E_STEP_ROWS),
               "continuous_slot_use": s_cont.row_steps / (s_cont.decode_passes * E_STEP_ROWS),
               "continuous_prefills": s_cont.prefill_passes, "refilled_rows": s_cont.refilled_rows}
        rounds.append(row)
        print(f"  mixed round {r + 1}: fixed {t_fixed:.1f}s, continuous {t_cont:.1f}s, "
              + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                          if not k.endswith("_s")), flush=True)
    return {"prompts": len(prompts), "m": args.mixed_m, "prompt_tokens": args.prompt_tokens, **budgets, "rounds": rounds}


def bench_m32(model, tokenizer, args) -> dict:
    base = make_prompt(tokenizer, args.prompt_tokens)
    prompts = [f"{base}({i}) " for i in range(max(1, E_STEP_ROWS // 32))]
    shared(model, tokenizer, [base], 2, 2)
    plain(model, tokenizer, base, 2, 2)
    rounds = []
    for r in range(args.rounds):
        t_plain, tok_plain = timed(lambda: sum(plain(model, tokenizer, p, 32, args.new_tokens) for p in prompts))
        t_ours, samples = timed(shared, model, tokenizer, prompts, 32, args.new_tokens, f"c{r}")
        rounds.append({"plain_tps": tok_plain / t_plain, "ours_tps": n_tokens(samples) / t_ours})
        print(f"  m=32 round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()), flush=True)
    return {"prompts": len(prompts), "new_tokens": args.new_tokens, "rounds": rounds}


def summarize(res: dict) -> list[dict]:
    mixed, m32 = res["mixed"], res["m32"]
    limit = res["fp32_gflops"] * 1e9 / (2 * res["params"])
    rows = [ratio_row("E-step mixed-length reasoning batch", [r["fixed_s"] / r["continuous_s"] for r in mixed["rounds"]],
                      "x", 1.5, "sample, fixed groups (before)"),
            ratio_row("E-step m=32 tokens/s", [r["ours_tps"] / r["plain_tps"] for r in m32["rounds"]], "x", 3.0,
                      "generate(32 samples), once per prompt"),
            ratio_row("E-step m=32, share of fp32 limit", [r["ours_tps"] / limit for r in m32["rounds"]], " ", 0.35,
                      f"matmul peak: {limit:.0f} tok/s")]
    r0 = mixed["rounds"][-1]
    rows[0]["note"] = (f"{mixed['prompts']} prompts x {mixed['m']}, {E_STEP_ROWS} rows at a time; outputs equal: "
                       f"{all(r['same_outputs'] for r in mixed['rounds'])}; {r0['rows_under_half_cap']} of {r0['rows']} rows "
                       f"under half the cap, {r0['rows_at_cap']} cut at it; slots used {r0['fixed_slot_use']:.0%} → "
                       f"{r0['continuous_slot_use']:.0%}, decode steps {r0['fixed_decode_passes']} → "
                       f"{r0['continuous_decode_passes']}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=f"cpu{os.cpu_count()}-{platform.node() or 'host'}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs, numbers mean little")
    args = parser.parse_args()
    sizes = dict(prompt_tokens=60, mixed_prompts=16, mixed_m=8, reasoning_tokens=16, response_tokens=8, new_tokens=16)
    if args.quick:
        sizes.update(prompt_tokens=50, mixed_prompts=4, mixed_m=4, reasoning_tokens=6, response_tokens=4, new_tokens=4)
    for k, v in sizes.items():
        setattr(args, k, v)
    started = time.time()
    torch.manual_seed(0)
    model, tokenizer = models.load_causal_lm(POLICY, load_settings("local"))
    res = {"name": args.name, "machine": machine(args.name), "model": POLICY, "sizes": sizes, "rows": E_STEP_ROWS,
           "params": params_of(model), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    res["fp32_gflops"] = matmul_peak(torch.float32, 512 if args.quick else 1024, 5)
    res["mixed"] = bench_mixed(model, tokenizer, args)
    res["m32"] = bench_m32(model, tokenizer, args)
    res["fp32_gflops"] = max(res["fp32_gflops"], matmul_peak(torch.float32, 512 if args.quick else 1024, 5))
    res["ratios"] = summarize(res)
    res.update(seconds=round(time.time() - started, 1), load_avg_end=round(os.getloadavg()[0], 1))
    out = HERE / "results" / f"continuous-{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(table(res["ratios"]), file=sys.stderr)
    print(f"{res['seconds']:.0f}s, load {res['machine']['load_avg_start']} → {res['load_avg_end']}; wrote {out}", file=sys.stderr)
    print(json.dumps({"ratios": res["ratios"], "seconds": res["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
