"""Continuous batching and shared prefill, each side by side in one run (packaged SmolLM2-135M-Instruct, float32).

(a) E-step on a mixed-length batch, a queue much longer than one batch (48 prompts x m=4, 16 rows at a time):
    chat prompts alternate between a short request the model answers in a few words, then its end-of-turn
    token (those rows stop early), and an open-ended one (those rows run to the cap), interleaved in length
    so that every fixed group holds both; `sample` with continuous batching vs without (today's fixed
    groups), same per-row seeds, and the outputs must be equal. Prints the generated lengths (rows under
    half the cap, rows at it), decode steps, row-steps, and the seconds each side spends in decode steps,
    regroup copies and prefills.
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
import statistics
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
# Requests the packaged model answers in a few words, then its end-of-turn token (rows that stop early) ...
SHORT = ["Reply with one word: yes or no. Is water wet?", "Reply with one word: yes or no. Is the sun hot?",
         "Reply with one word: yes or no. Is ice cold?", "Reply with one word: yes or no. Can fish swim?",
         "Reply with one word: yes or no. Is snow white?", "Reply with one word: yes or no. Do cats bark?",
         "What is 2+3? Answer with the number only.", "Reply with one word: yes or no. Is fire hot?"]
# ... and open-ended ones it writes on past any cap here (rows that run to the cap).
LONG = ["Write a long, detailed review of a hiking backpack.", "Write a long, detailed review of a toaster.",
        "Write a long, detailed review of a laptop.", "Write a long, detailed essay about the history of bicycles.",
        "Write a long, detailed review of a coffee grinder.", "Write a long, detailed story about a lighthouse keeper.",
        "Write a long, detailed review of a pair of running shoes.", "Write a long, detailed guide to growing tomatoes."]
FILLER = "Notes: " + PROFILE * 20


def mixed_prompts(tokenizer, n: int, base_tokens: int) -> tuple[list[str], list[str]]:
    """n chat prompts (the chat template, as the sampler's callers render them), a short request and an
    open-ended one in turn, and their kinds. Prompt k is base_tokens + k tokens long (a note of filler before
    the request), so that sorted by length, as `sample` takes them, they still alternate and every fixed
    group of the queue holds both kinds."""
    out, kinds = [], []
    for k in range(n):
        kind = ("short", "long")[k % 2]
        request = (SHORT, LONG)[k % 2][(k // 2) % len(SHORT)]
        frame = "{}\n\n" + request
        room = base_tokens + k - generation.count_tokens(tokenizer, generation.render_chat(tokenizer, frame.format("")))
        note = tokenizer.decode(tokenizer(FILLER, add_special_tokens=False).input_ids[:max(0, room)])
        out.append(generation.render_chat(tokenizer, frame.format(note)))
        kinds.append(kind)
    return out, kinds


class Clock:
    """Seconds `_decode` spends in each of the sampler's pieces (prefill, decode step, regroup copies, keep_rows,
    the token draw), by wrapping the module's functions while a run lasts."""

    PIECES = ("prefill", "step", "regroup", "keep_rows", "choose_tokens")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PIECES, 0.0)

    def __enter__(self):
        self.saved = {name: getattr(generation, name) for name in self.PIECES}
        for name, fn in self.saved.items():
            setattr(generation, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def timed_piece(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed_piece

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(generation, name, fn)


def bench_mixed(model, tokenizer, args) -> dict:
    prompts, kinds = mixed_prompts(tokenizer, args.mixed_prompts, args.mixed_prompt_tokens)
    seeds = [[generation.sample_seed(f"mixed{i}", j, 0, 0) for j in range(args.mixed_m)] for i in range(len(prompts))]
    budgets = {"max_new_tokens": args.mixed_new_tokens, "reasoning_tokens": args.mixed_reasoning_tokens}
    cap = args.mixed_new_tokens + ((args.mixed_reasoning_tokens or 0) + generation.SEPARATOR_ALLOWANCE
                                   if args.mixed_reasoning_tokens else 0)
    rows_at_once = args.mixed_rows
    order = [i for g in generation.length_groups(tokenizer, prompts, max(1, rows_at_once // args.mixed_m)) for i in g]
    groups = [order[s:s + rows_at_once // args.mixed_m] for s in range(0, len(order), rows_at_once // args.mixed_m)]
    mixed_groups = sum(len({kinds[i] for i in g}) == 2 for g in groups)
    print(f"  mixed: {len(prompts)} prompts x {args.mixed_m}, {rows_at_once} rows at a time, cap {cap} tokens; "
          f"{mixed_groups} of {len(groups)} fixed groups hold both kinds", flush=True)

    def run(continuous: bool):
        with Clock() as clock:
            out, stats = generation.sample(model, tokenizer, prompts, seeds, max_rows=rows_at_once,
                                           continuous=continuous, **budgets, **SAMPLING)
        return out, stats, clock.seconds

    generation.sample(model, tokenizer, prompts[:2], [row[:2] for row in seeds[:2]], max_new_tokens=2,
                      max_rows=rows_at_once, **SAMPLING)  # untimed: first-call costs land on neither side
    rounds = []
    for r in range(args.rounds):
        if r % 2:  # the order alternates, so a load change on this shared machine hits both sides
            t_cont, (cont, s_cont, c_cont) = timed(run, True)
            t_fixed, (fixed, s_fixed, c_fixed) = timed(run, False)
        else:
            t_fixed, (fixed, s_fixed, c_fixed) = timed(run, False)
            t_cont, (cont, s_cont, c_cont) = timed(run, True)
        lengths = {kind: [s.n_tokens for row, k in zip(fixed, kinds) if k == kind for s in row] for kind in ("short", "long")}
        every = lengths["short"] + lengths["long"]
        row = {"fixed_s": t_fixed, "continuous_s": t_cont, "same_outputs": cont == fixed,
               "rows_differing": sum(a != b for ra, rb in zip(cont, fixed) for a, b in zip(ra, rb)),
               "rows_differing_in_length": sum(a.n_tokens != b.n_tokens for ra, rb in zip(cont, fixed) for a, b in zip(ra, rb)), "tokens": n_tokens(fixed),
               "rows": len(every), "cap": cap, "rows_under_half_cap": sum(n < cap / 2 for n in every),
               "rows_at_cap": sum(n >= cap for n in every), "rows_ended": sum(s.finished for row in fixed for s in row),
               "short_rows_under_half_cap": sum(n < cap / 2 for n in lengths["short"]),
               "long_rows_at_cap": sum(n >= cap for n in lengths["long"]),
               "length_histogram": {f"{lo}-{lo + cap // 8 - 1}": sum(lo <= n < lo + cap // 8 for n in every)
                                    for lo in range(0, cap, cap // 8)} | {str(cap): sum(n >= cap for n in every)},
               "short_mean_tokens": statistics.mean(lengths["short"]), "long_mean_tokens": statistics.mean(lengths["long"]),
               "fixed_decode_passes": s_fixed.decode_passes, "continuous_decode_passes": s_cont.decode_passes,
               "fixed_row_steps": s_fixed.row_steps, "continuous_row_steps": s_cont.row_steps,
               "fixed_slot_use": s_fixed.row_steps / (s_fixed.decode_passes * rows_at_once),
               "continuous_slot_use": s_cont.row_steps / (s_cont.decode_passes * rows_at_once),
               "fixed_prefills": s_fixed.prefill_passes, "continuous_prefills": s_cont.prefill_passes,
               "refilled_rows": s_cont.refilled_rows,
               "fixed_seconds_in": {k: round(v, 2) for k, v in c_fixed.items()},
               "continuous_seconds_in": {k: round(v, 2) for k, v in c_cont.items()}}
        rounds.append(row)
        print(f"  mixed round {r + 1}: fixed {t_fixed:.1f}s, continuous {t_cont:.1f}s, "
              + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                          if not k.endswith("_s")), flush=True)
    return {"prompts": len(prompts), "m": args.mixed_m, "rows": rows_at_once, "prompt_tokens": args.mixed_prompt_tokens,
            "mixed_groups": mixed_groups, "groups": len(groups), **budgets, "rounds": rounds}


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
    rows = [ratio_row("E-step mixed-length batch, continuous", [r["fixed_s"] / r["continuous_s"] for r in mixed["rounds"]],
                      "x", 1.5, "sample, fixed groups (before)"),
            ratio_row("E-step m=32 tokens/s", [r["ours_tps"] / r["plain_tps"] for r in m32["rounds"]], "x", 3.0,
                      "generate(32 samples), once per prompt"),
            ratio_row("E-step m=32, share of fp32 limit", [r["ours_tps"] / limit for r in m32["rounds"]], " ", 0.35,
                      f"matmul peak: {limit:.0f} tok/s")]
    r0 = mixed["rounds"][-1]
    rows[0]["note"] = (f"{mixed['prompts']} prompts x {mixed['m']}, {mixed['rows']} rows at a time, cap {r0['cap']}; outputs "
                       f"equal: {all(r['same_outputs'] for r in mixed['rounds'])} ({r0['rows_differing']} rows differ, {r0['rows_differing_in_length']} in length); {r0['rows_under_half_cap']} of {r0['rows']} "
                       f"rows under half the cap, {r0['rows_at_cap']} at it; decode steps {r0['fixed_decode_passes']} → "
                       f"{r0['continuous_decode_passes']}, row-steps {r0['fixed_row_steps']} → {r0['continuous_row_steps']}, "
                       f"slots used {r0['fixed_slot_use']:.0%} → {r0['continuous_slot_use']:.0%}; continuous: "
                       f"{r0['continuous_seconds_in']['step']:.1f}s in decode steps, {r0['continuous_seconds_in']['regroup']:.1f}s "
                       f"in regroup, {r0['continuous_seconds_in']['prefill']:.1f}s in prefill (fixed: "
                       f"{r0['fixed_seconds_in']['step']:.1f}s in steps)")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=f"cpu{os.cpu_count()}-{platform.node() or 'host'}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs, numbers mean little")
    args = parser.parse_args()
    sizes = dict(prompt_tokens=60, new_tokens=16, mixed_prompts=48, mixed_m=4, mixed_rows=16, mixed_prompt_tokens=48,
                 mixed_new_tokens=32, mixed_reasoning_tokens=None)
    if args.quick:
        sizes.update(prompt_tokens=50, new_tokens=4, mixed_prompts=8, mixed_m=2, mixed_rows=4, mixed_new_tokens=8)
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
