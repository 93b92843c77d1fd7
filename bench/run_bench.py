"""`make bench`: one table of ratios, each side by side in one run, repeated, with median and spread.

Packaged SmolLM2-135M-Instruct (policy and judge) and all-MiniLM-L6-v2 (retrieval), demo-style prompts.
Every ratio is measured in rounds that time both sides back to back, so a load change on this shared
machine hits both; the table shows the median ratio of the rounds and their range. Spark sections run
in child processes, one per master (local[1], local[2]), with the worker threads `models.worker_env`
gives them; training under torch-xla runs in its own child too (bench_train.py). Writes
bench/results/<name>.json (machine, raw rounds, ratios, and the `rates` that `restpg estimate` reads).

    .venv/bin/python bench/run_bench.py [--name NAME] [--rounds 3] [--quick]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from restpg import generation, models, rewards, scoring  # noqa: E402
from restpg.config import load_settings  # noqa: E402

HERE = Path(__file__).resolve().parent
POLICY, RETRIEVER = "packaged:smollm2-135m-instruct", "packaged:all-minilm-l6-v2"
SAMPLING = {"temperature": 0.7, "top_p": 0.95}
E_STEP_ROWS = inspect.signature(generation.sample).parameters["max_rows"].default  # rows the E-step decodes together
PROFILE = ("I bought this kettle for my office. It boils fast, the handle stays cool, and the lid opens "
           "with one hand. The blue light is a bit bright at night. ")


# ----------------------------------------------------------------------------- helpers

class Budget:
    """Wall-clock shares of the bench's time: a section stops starting rounds past its share (after
    one round at least), so a busy machine yields fewer rounds rather than a bench past its budget."""

    def __init__(self, seconds: float):
        self.end = time.time() + seconds
        self.section_end = self.end

    def start(self, share: float) -> None:
        self.section_end = min(self.end, time.time() + share * max(self.left(), 0))

    def left(self) -> float:
        return self.end - time.time()

    def more(self, done: int) -> bool:
        return done == 0 or time.time() < self.section_end


def median_spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def machine(name: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    try:
        import torch_xla  # noqa: F401

        xla = True
    except ImportError:
        xla = False
    return {"name": name, "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "bf16_matmul_units": any(f in flags for f in ("avx512_bf16", "amx_bf16")), "cuda": torch.cuda.is_available(),
            "torch_xla": xla, "python": platform.python_version(), "load_avg_start": round(os.getloadavg()[0], 1)}


def make_prompt(tokenizer, target_tokens: int) -> str:
    """A chat prompt of about `target_tokens` tokens: past reviews, then the request."""
    frame = "My past reviews: {}\nWrite a long, detailed review of a toaster in my style."
    room = target_tokens - generation.count_tokens(tokenizer, generation.render_chat(tokenizer, frame.format("")))
    reviews = tokenizer.decode(tokenizer(PROFILE * 40, add_special_tokens=False).input_ids[:room])
    return generation.render_chat(tokenizer, frame.format(reviews))


def shared(model, tokenizer, prompts: list[str], m: int, new_tokens: int, tag: str = "bench"):
    seeds = [[generation.sample_seed(f"{tag}{i}", j, 0, 0) for j in range(m)] for i in range(len(prompts))]
    out, _ = generation.sample(model, tokenizer, prompts, seeds, max_new_tokens=new_tokens, **SAMPLING)
    return out


def plain(model, tokenizer, prompt: str, m: int, new_tokens: int) -> int:
    """Tokens `generate(num_return_sequences=m)` makes before each row's first end-of-sequence."""
    ids = torch.tensor([generation.encode(tokenizer, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=new_tokens,
                         num_return_sequences=m, pad_token_id=tokenizer.pad_token_id, **SAMPLING)
    stops = torch.tensor(sorted(generation.eos_ids(model, tokenizer)))
    ended = torch.isin(out[:, ids.shape[1]:], stops).int().cumsum(1) > 0
    return int((~ended).sum())


def n_tokens(samples) -> int:
    return sum(s.n_tokens for row in samples for s in row)


def params_of(model) -> int:
    """Weights a token's forward multiplies by: every matrix but the input embedding (a lookup); a tied
    output layer is counted once, as the output layer."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    return sum(p.numel() for p in model.parameters() if p.dim() >= 2) - (0 if tied else embed.numel())


# ----------------------------------------------------------------------------- in-process sections

def matmul_peak(dtype: torch.dtype, size: int, reps: int) -> float:
    """GFLOP/s of a square matmul, the best of `reps` (the machine's limit, not its average)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(timed(torch.matmul, a, b)[0] for _ in range(reps))
    return 2 * size ** 3 / best / 1e9


def bench_sampling(model, bf16_model, tokenizer, args, budget: Budget) -> dict:
    """The E-step's sampler vs the naive loop at m = 8, 32; sampler alone at m = 1 (one row) and in bf16.

    As the E-step batches them: enough prompts to fill one batch of the sampler's rows (`sample`'s max_rows:
    8 prompts x 8 or 2 x 32), sampled together, against `generate(num_return_sequences=m)` called once per
    prompt; same prompts, lengths and sampling settings."""
    rows = E_STEP_ROWS
    base = make_prompt(tokenizer, args.prompt_tokens)
    shared(model, tokenizer, [base], 2, 4)
    plain(model, tokenizer, base, 2, 4)
    out = {"prompt_tokens": generation.count_tokens(tokenizer, base), "new_tokens": args.new_tokens, "rows": rows, "rounds": {}}
    for m in (8, 32):
        prompts = [f"{base}({i}) " for i in range(max(1, rows // m) if not args.quick else 2)]
        out.setdefault("prompts", {})[m] = len(prompts)
        rounds = []
        budget.start(0.3 if m == 8 else 0.45)
        for r in range(args.rounds):
            if not budget.more(r):
                break
            t_plain, tok_plain = timed(lambda: sum(plain(model, tokenizer, p, m, args.new_tokens) for p in prompts))
            t_ours, samples = timed(shared, model, tokenizer, prompts, m, args.new_tokens, f"r{r}m{m}")
            row = {"plain_tps": tok_plain / t_plain, "ours_tps": n_tokens(samples) / t_ours}
            if m == 32 and bf16_model is not None:
                t_bf16, s16 = timed(shared, bf16_model, tokenizer, prompts, m, args.new_tokens, f"r{r}m{m}")
                row["bf16_tps"] = n_tokens(s16) / t_bf16
            rounds.append(row)
            print(f"  sampling m={m} x {len(prompts)} prompts round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()),
                  flush=True)
        out["rounds"][m] = rounds
    single = [n_tokens(s) / t for t, s in (timed(shared, model, tokenizer, [base], 1, args.new_tokens, f"one{r}")
                                           for r in range(2))]
    out["m1_tps"] = median_spread(single)
    return out


def bench_judging(model, tokenizer, args, budget: Budget) -> dict:
    """Seconds to judge the outputs of an E-step batch (as in bench_sampling: `sample`'s max_rows rows, m per
    prompt; LLM judge, the labels scored together, each input's m judge prompts sharing criteria, request and
    expected output, computed once) against seconds to sample them; and, on one input's m outputs, the same
    judging against every prompt prefilled whole, round by round."""
    rows = E_STEP_ROWS
    m = args.judge_m
    base = make_prompt(tokenizer, args.prompt_tokens)
    inputs = [(f"{base}({i}) ", f"Write a review of a toaster in my style ({i}).") for i in range(max(1, rows // m))]
    if args.quick:
        inputs = inputs[:2]
    template = rewards.judge_template((1, 3, 5, 7, 10))
    rounds = []
    for r in range(args.rounds):
        if not budget.more(r):
            break
        t_sample, samples = timed(shared, model, tokenizer, [p for p, _ in inputs], m, args.new_tokens, f"judge{r}")
        texts = [rewards.fit_judge_prompt(tokenizer, template, request, PROFILE, s.text, 4096)
                 for (_, request), row in zip(inputs, samples) for s in row]
        t_judge, judged = timed(rewards.judge_with, model, tokenizer, texts, template.scores)
        t_one, _ = timed(rewards.judge_with, model, tokenizer, texts[:m], template.scores)
        t_whole, _ = timed(scoring.score_candidates, model, tokenizer, texts[:m], template.labels, share=False)
        ids = [generation.encode(tokenizer, t) for t in texts]
        per_group = inspect.signature(scoring.score_candidates).parameters["max_rows"].default // len(template.labels)
        groups = scoring.prefix_groups(ids, max(1, per_group))  # as judge_with groups them: each prefix computed once
        computed = sum(len(ids[i]) - head for members, head in groups for i in members) + sum(head for _, head in groups)
        rounds.append({"sample_s": t_sample, "judge_s": t_judge, "outputs": len(judged), "one_input_s": t_one,
                       "judge_whole_s": t_whole, "judge_prompt_tokens": statistics.mean(len(i) for i in ids),
                       "judge_tokens_per_output": computed / len(ids), "sampled_tokens_per_output": n_tokens(samples) / len(ids)})
        print(f"  judging round {r + 1}: sample {t_sample:.1f}s, judge {t_judge:.1f}s for {len(judged)} outputs of "
              f"{len(inputs)} inputs; one input's {m}: {t_one:.1f}s shared, {t_whole:.1f}s prompts whole", flush=True)
    return {"rounds": rounds, "inputs": len(inputs), "m": m}


def bench_training(args, budget: Budget, bf16_slow: bool) -> dict:
    """Training tokens/s, eager float32 vs bf16 autocast, alternating optimizer steps on one model."""
    from transformers import AutoModelForCausalLM

    from restpg.training.data import IGNORE_INDEX, collate
    from restpg.training.objective import autocast, weighted_nll

    settings = load_settings("local")
    model = AutoModelForCausalLM.from_pretrained(models.checkpoint_dir(POLICY, settings), dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    length = args.train_length
    rows = []
    for _ in range(args.train_batch):
        ids = torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2:]})
    batch = collate(rows, [1.0] * len(rows), [length], 0)

    def train_step(dtype: str) -> float:
        t0 = time.perf_counter()
        with autocast("cpu", dtype):
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        weighted_nll(logits, batch["labels"], batch["weights"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    train_step("float32")  # warm-up: optimizer state
    tokens = args.train_batch * length
    rounds = []
    for r in range(args.rounds):
        if not budget.more(r) or (bf16_slow and r):  # emulated bf16: one round tells the story
            break
        row = {"eager_tps": tokens / train_step("float32"), "bf16_tps": tokens / train_step("bfloat16")}
        rounds.append(row)
        print(f"  training round {r + 1}: eager {row['eager_tps']:.0f} tok/s, bf16 autocast {row['bf16_tps']:.0f} tok/s", flush=True)
    return {"rounds": rounds, "tokens_per_step": tokens, "params": params_of(model)}


# ----------------------------------------------------------------------------- Spark children

def retrieval_texts(n: int) -> list[str]:
    from restpg import demo_data

    texts = []
    for rec in demo_data.generate(users_per_task=max(1, n // 24 + 1), profile_items=6, examples_per_user=1):
        texts += [" ".join(str(v) for v in item.values()) for item in rec["profile"]]
    return texts[:n]


def spark_child(master: str, args) -> dict:
    """In a Spark session of `master` (torch threads per task: `--threads`, 0 for restpg's default): E-step
    wall time through generate_df; on local[1] with the default threads also the overhead of the same batch
    through mapInPandas vs in-process; on local[2] retrieval through Spark vs in-process encode."""
    import pandas as pd
    from pyspark.sql import functions as F

    from restpg.embedding import embed_column, embed_with
    from restpg.runtime import get_spark

    home = tempfile.mkdtemp(prefix="restpg-bench-")
    cores = int(master[6:-1])
    settings = load_settings("local", [f"spark.master={master}", f"spark.shuffle_partitions={cores}",
                                       f"spark.torch_threads={args.threads}"], home=home)
    spark = get_spark(settings)
    model, tokenizer = models.load_causal_lm(POLICY, settings)
    prompt = make_prompt(tokenizer, args.prompt_tokens)
    out: dict = {"master": master, "worker_threads": models.worker_env(settings)["torch_threads"]}

    def spark_sample(n_prompts: int, m: int, partitions: int) -> tuple[float, int]:
        df = spark.createDataFrame(pd.DataFrame({"example_id": [f"p{i}" for i in range(n_prompts)],
                                                 "prompt": [prompt + f" ({i})" for i in range(n_prompts)]})).repartition(partitions)
        t, rows = timed(lambda: generation.generate_df(df, POLICY, settings, m=m, max_new_tokens=args.new_tokens, iteration=0,
                                                       seed=0, **SAMPLING).select("n_tokens").collect())
        return t, sum(r.n_tokens for r in rows)

    spark_sample(cores, 2, cores)  # warm-up: every worker loads the model once
    estep = [spark_sample(args.estep_prompts, args.estep_m, cores) for _ in range(args.spark_rounds)]
    budget = Budget(args.budget_s - (time.time() - args.child_started))
    budget.start(1.0)
    out["estep"] = [{"seconds": t, "tokens": n} for t, n in estep]
    if cores == 1 and args.threads:
        pass  # the scaling measure's one-core reference: E-step wall time only
    elif cores == 1:
        torch.set_num_threads(out["worker_threads"])  # the driver computes with what a worker gets
        rounds = []
        for r in range(args.spark_rounds):
            if not budget.more(r):
                break
            t_spark, n_spark = spark_sample(args.overhead_prompts, args.estep_m, 1)
            prompts = [prompt + f" ({i})" for i in range(args.overhead_prompts)]
            seeds = [[generation.sample_seed(f"p{i}", j, 0, 0) for j in range(args.estep_m)] for i in range(len(prompts))]
            t_local, (samples, _) = timed(generation.sample, model, tokenizer, prompts, seeds,
                                          max_new_tokens=args.new_tokens, **SAMPLING)
            rounds.append({"spark_s": t_spark, "local_s": t_local, "spark_tokens": n_spark, "local_tokens": n_tokens(samples)})
            print(f"  spark overhead round {r + 1}: mapInPandas {t_spark:.1f}s, in-process {t_local:.1f}s", file=sys.stderr, flush=True)
        out["overhead"] = rounds
    else:
        texts = retrieval_texts(args.retrieval_texts)
        tdf = spark.createDataFrame(pd.DataFrame({"text": texts})).coalesce(1)  # as a small table is read: one partition
        embedder = models.load_embedder(RETRIEVER, settings)
        # warm-up: workers load the embedder (a count() alone prunes the unused column, and the UDF with it)
        embed_column(tdf, "text", "vec", settings).select(F.size("vec")).collect()
        embed_with(embedder, texts[:32])
        rounds = []
        for r in range(args.spark_rounds):
            if not budget.more(r):
                break
            t_spark, _ = timed(lambda: embed_column(tdf, "text", "vec", settings).select("vec").collect())
            t_local, _ = timed(embed_with, embedder, texts, settings.retrieve.batch_size)
            rounds.append({"spark_tps": len(texts) / t_spark, "local_tps": len(texts) / t_local})
            print(f"  retrieval round {r + 1}: spark {len(texts) / t_spark:.0f} texts/s, in-process {len(texts) / t_local:.0f}",
                  file=sys.stderr, flush=True)
        # what one worker's single thread encodes: two such workers are what Spark can reach on local[2]
        threads = torch.get_num_threads()
        torch.set_num_threads(out["worker_threads"])
        t_one, _ = timed(embed_with, embedder, texts, settings.retrieve.batch_size)
        torch.set_num_threads(threads)
        out["retrieval"] = {"texts": len(texts), "rounds": rounds, "local_threads": threads,
                            "worker_thread_tps": len(texts) / t_one}
    spark.stop()
    return out


def run_child(argv: list[str], timeout: int) -> dict | None:
    """A child bench process; its last stdout line is its JSON result (None when it failed or ran out of time)."""
    # its own process group, so a timeout also ends the Spark JVM and Python workers it started
    child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=HERE.parent, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        print(f"  {' '.join(argv)}: no result within {timeout}s", flush=True)
        return None
    sys.stderr.write("".join(line + "\n" for line in stderr.splitlines() if line.startswith("  ")))
    lines = stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        print(f"  {' '.join(argv)} failed ({child.returncode}): {stderr[-2000:]}", flush=True)
        return None
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the table

def ratio_row(what: str, values: list[float], unit: str, goal: float | None, reference: str, higher: bool = True) -> dict:
    stats = median_spread(values)
    met = None if goal is None else (stats["median"] >= goal if higher else stats["median"] <= goal)
    return {"measure": what, "reference": reference, "unit": unit, **stats, "goal": goal, "goal_higher": higher, "met": met}


def table(rows: list[dict]) -> str:
    head = f"{'measure':<44}{'vs':<34}{'median':>9}{'spread':>17}{'goal':>9}  met"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("median") is None:
            lines.append(f"{r['measure']:<44}{r['reference']:<34}{'n/a':>9}{'':>17}{'':>9}  {r.get('why', '')}")
            continue
        goal = "" if r["goal"] is None else ("≥" if r["goal_higher"] else "≤") + f"{r['goal']:g}"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        spread = f"{r['min']:.2f}–{r['max']:.2f}"
        note = f"  ({r['note']})" if r.get("note") else ""
        lines.append(f"{r['measure']:<44}{r['reference']:<34}{r['median']:>8.2f}{r['unit']}{spread:>16}{goal:>9}  {met}{note}")
    return "\n".join(lines)


def summarize(res: dict) -> tuple[list[dict], dict]:
    s, peak, rows = res["sampling"], res["peak"], []
    limit_fp32 = peak["fp32_gflops"] * 1e9 / (2 * res["params"])
    limit_bf16 = peak["bf16_gflops"] * 1e9 / (2 * res["params"])
    for m in (8, 32):
        rounds = s["rounds"][m]
        n = s.get("prompts", {}).get(m, s.get("prompts", {}).get(str(m), 1))
        rows.append(ratio_row(f"E-step sampling m={m} x {n} prompts tokens/s", [r["ours_tps"] / r["plain_tps"] for r in rounds],
                              "x", 3.0, "generate(m samples), once per prompt"))
        plain_tps = statistics.median(r["plain_tps"] for r in rounds)
        rows[-1]["note"] = (f"plain generate decodes the {m} rows of one prompt per step ({plain_tps:.0f} tok/s) and prefills "
                            f"{m} copies of it; ours decodes {min(E_STEP_ROWS, n * m)} rows of {n} prompts per step after one "
                            f"prefill per prompt")
    m32 = s["rounds"][32]
    rows.append(ratio_row("E-step sampling m=32, share of fp32 limit", [r["ours_tps"] / limit_fp32 for r in m32], " ", 0.5,
                          f"matmul peak: {limit_fp32:.0f} tok/s"))
    weights_mb = res["params"] * 4 / 1e6  # float32: every decode step reads every weight once, however few rows
    n32 = s.get("prompts", {}).get(32, s.get("prompts", {}).get("32", 1))
    step_rows = min(E_STEP_ROWS, n32 * 32)
    tps = statistics.median(r["ours_tps"] for r in m32)
    rows[-1]["note"] = (f"a step of {step_rows} rows takes {step_rows / tps:.2f}s, {tps * 2 * res['params'] / 1e9:.0f} GFLOP/s "
                        f"against {peak['fp32_gflops']:.0f} for square 1024x1024 products: its products are {step_rows} rows "
                        f"by the weights, and attention and the nucleus draw add work the limit leaves out; one row alone "
                        f"makes {s['m1_tps']['median']:.0f} tok/s, its step bound by reading all {weights_mb:.0f} MB of weights")
    if "bf16_tps" in m32[0]:
        rows.append(ratio_row("E-step sampling m=32 bf16, share of bf16 limit", [r["bf16_tps"] / limit_bf16 for r in m32], " ",
                              0.5, f"matmul peak: {limit_bf16:.0f} tok/s"))
        rows.append(ratio_row("E-step sampling m=32 bf16 tokens/s", [r["bf16_tps"] / r["ours_tps"] for r in m32], "x", None,
                              "same sampler in float32"))
    else:
        rows.append({"measure": "E-step sampling m=32 bf16", "reference": "same sampler in float32", "median": None,
                     "why": f"skipped: bf16 matmul {peak['bf16_gflops']:.0f} vs fp32 {peak['fp32_gflops']:.0f} GFLOP/s (no bf16 units)"})
    j = res["judging"]["rounds"]
    rows.append(ratio_row("judging cost per output", [r["judge_s"] / r["sample_s"] for r in j], " ", 0.25,
                          "sampling that output (E-step batch)", higher=False))
    if "judge_tokens_per_output" in j[0]:
        read = statistics.median(r["judge_tokens_per_output"] for r in j)
        written = statistics.median(r["sampled_tokens_per_output"] for r in j)
        prefill = statistics.median(r["judge_tokens_per_output"] * r["outputs"] / r["judge_s"] for r in j)
        decode = statistics.median(r["sampled_tokens_per_output"] * r["outputs"] / r["sample_s"] for r in j)
        rows[-1]["note"] = (f"the judge reads {read:.0f} new prompt tokens per output at {prefill:.0f} tok/s; sampling wrote "
                            f"{written:.0f} at {decode:.0f} tok/s; the share is (read / prefill rate) / (written / decode rate)")
    if "one_input_s" in j[0]:
        rows.append(ratio_row("judging, shared prompt prefix", [r["judge_whole_s"] / r["one_input_s"] for r in j], "x", None,
                              "each judge prompt prefilled whole"))
    t = res["training"]
    train_limit = peak["fp32_gflops"] * 1e9 / (6 * res["params"])
    rows.append(ratio_row("training bf16 autocast tokens/s", [r["bf16_tps"] / r["eager_tps"] for r in t["rounds"]], "x", None,
                          "eager float32"))
    rows.append(ratio_row("training eager, share of fp32 limit", [r["eager_tps"] / train_limit for r in t["rounds"]], " ", None,
                          f"6·params flops: {train_limit:.0f} tok/s"))
    xla = res.get("xla")
    if xla:
        rows.append(ratio_row("training XLA (PJRT CPU) tokens/s", [xla["xla_over_eager_steady"]], "x", None,
                              "eager float32 (bench_train.py)"))
        rows.append(ratio_row("XLA compilations after warm-up", [xla["xla_compilations_after_warmup"]], " ", 0,
                              "steps 3.. (bench_train.py)", higher=False))
        if "xla_compilations_by_step" in xla:
            rows[-1]["note"] = "graphs compiled at steps 1.. : " + ", ".join(map(str, xla["xla_compilations_by_step"]))
    else:
        rows.append({"measure": "training XLA tokens/s", "reference": "eager float32", "median": None,
                     "why": res.get("xla_why", "torch_xla not installed")})
    one, two = res.get("spark_local1"), res.get("spark_local2")
    late = "n/a: the Spark child did not finish within its share of the budget"
    if one and one.get("overhead"):
        rows.append(ratio_row("Spark overhead (mapInPandas / in-process)", [r["spark_s"] / r["local_s"] - 1 for r in one["overhead"]],
                              " ", 0.10, "same batch, same threads, in-process", higher=False))
        extra = statistics.median(r["spark_s"] - r["local_s"] for r in one["overhead"])
        batch = statistics.median(r["local_s"] for r in one["overhead"])
        rows[-1]["note"] = f"{extra:.1f}s more per job on a {batch:.1f}s batch: a fixed cost per Spark job, less of a longer one"
    else:
        rows.append({"measure": "Spark overhead", "reference": "in-process", "median": None, "why": late})
    if two and two.get("retrieval", {}).get("rounds"):
        rows.append(ratio_row("retrieval texts/s through Spark", [r["spark_tps"] / r["local_tps"] for r in two["retrieval"]["rounds"]],
                              "x", 0.8, "sentence-transformers encode"))
        ret = two["retrieval"]
        if "worker_thread_tps" in ret:  # Spark against what its workers could do at most, and that against encode
            spark_tps = statistics.median(r["spark_tps"] for r in ret["rounds"])
            local_tps = statistics.median(r["local_tps"] for r in ret["rounds"])
            workers = int(two["master"][6:-1])
            ceiling = workers * ret["worker_thread_tps"]
            rows[-1]["note"] = (f"{spark_tps:.0f} texts/s through Spark = {spark_tps / ceiling:.0%} of its {workers} workers' "
                                f"ceiling ({ret['worker_thread_tps']:.0f} each on {two['worker_threads']} thread(s)); encode with "
                                f"{ret['local_threads']} threads in one process makes {local_tps:.0f}")
    else:
        rows.append({"measure": "retrieval texts/s through Spark", "reference": "encode", "median": None, "why": late})
    single = res.get("spark_local1_1thread")
    if single and two:  # Spark's scaling: one task slot on one core against two slots on two cores, one thread each
        pairs = zip(single["estep"], two["estep"])
        rows.append(ratio_row("E-step scaling local[2] / local[1]", [a["seconds"] / b["seconds"] for a, b in pairs], "x", 1.7,
                              f"local[1] ({single['worker_threads']} thr) vs [2] ({two['worker_threads']} thr)"))
        seconds = {name: statistics.median(r["seconds"] for r in run["estep"]) for name, run in
                   (("1x1", single), ("2x1", two), ("1x2", one)) if run}
        rows[-1]["note"] = "E-step " + ", ".join(f"{v:.1f}s on {k[0]} worker(s) x {k[2]} thread(s)" for k, v in seconds.items())
        if seconds["1x1"] < 1.5 * min(v for k, v in seconds.items() if k != "1x1"):
            rows[-1]["note"] += (": a second core adds little however it is used, so decoding is bound by what the cores"
                                 " share (memory bandwidth: every decode step reads all the weights), not by cores")
    else:
        rows.append({"measure": "E-step scaling local[2] / local[1]", "reference": "local[1]", "median": None, "why": late})
    if one and two:  # the same 2 cores split as 1 worker x 2 threads or 2 workers x 1 thread (>1: two workers win)
        pairs = zip(one["estep"], two["estep"])
        rows.append(ratio_row("E-step, 2 workers x 1 thread", [a["seconds"] / b["seconds"] for a, b in pairs], "x", None,
                              f"1 worker x {one['worker_threads']} threads"))
    rows += res.get("continuous", {}).get("ratios", []) if res.get("continuous") else [
        {"measure": "continuous batching (bench_continuous.py)", "reference": "", "median": None, "why": "not run or failed"}]
    rates = {"generate_tokens_per_s": s["m1_tps"]["median"],
             "sample_tokens_per_s": statistics.median(r["ours_tps"] for r in m32),
             "judge_outputs_per_s": statistics.median(r["outputs"] / r["judge_s"] for r in j),
             "train_tokens_per_s": statistics.median(r["eager_tps"] for r in t["rounds"])}
    if two and "retrieval" in two:
        rates["embed_texts_per_s"] = statistics.median(r["spark_tps"] for r in two["retrieval"]["rounds"])
    return rows, {k: round(v, 2) for k, v in rates.items()}


def show(path: Path) -> int:
    """The table of a saved result, recomputed from its raw measurements (JSON turned the rounds' m keys to text)."""
    res = json.loads(path.read_text())
    res["sampling"]["rounds"] = {int(m): rounds for m, rounds in res["sampling"]["rounds"].items()}
    rows, rates = summarize(res)
    saved = json.loads(path.read_text())
    saved.update(ratios=rows, rates=rates)
    path.write_text(json.dumps(saved, indent=1))
    print(table(rows))
    print(f"rates (restpg estimate): {json.dumps(rates)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=f"cpu{os.cpu_count()}-{platform.node() or 'host'}", help="result file name")
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds per in-process measure")
    parser.add_argument("--spark-rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs, numbers mean little")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--no-xla", action="store_true", help="skip the torch-xla training child")
    parser.add_argument("--budget-s", type=float, default=840, help="wall-clock budget; sections drop rounds to fit")
    parser.add_argument("--show", default=None, metavar="JSON",
                        help="print the table of a saved result (recomputed from its measurements) and store it there")
    args = parser.parse_args()
    if args.show:
        return show(Path(args.show))
    sizes = dict(prompt_tokens=170, new_tokens=32, judge_m=8, train_batch=1, train_length=256, estep_prompts=4, estep_m=8,
                 overhead_prompts=2, retrieval_texts=400)
    if args.quick:
        sizes = dict(prompt_tokens=60, new_tokens=6, judge_m=2, train_batch=1, train_length=32, estep_prompts=2, estep_m=2,
                     overhead_prompts=1, retrieval_texts=40)
        args.rounds, args.spark_rounds = min(args.rounds, 2), 1
    for k, v in sizes.items():
        setattr(args, k, v)
    if args.child:
        args.child_started = time.time()
        print(json.dumps(spark_child(args.child, args)))
        return 0

    started, budget = time.time(), Budget(args.budget_s)
    torch.manual_seed(0)
    res: dict = {"name": args.name, "machine": machine(args.name), "model": POLICY, "dtype": "float32", "sizes": sizes,
                 "rounds": args.rounds, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"bench {args.name}: {res['machine']['cpu']}, {res['machine']['cores']} cores, load {res['machine']['load_avg_start']}",
          flush=True)
    settings = load_settings("local")
    model, tokenizer = models.load_causal_lm(POLICY, settings)
    out = HERE / "results" / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)

    def save() -> None:  # after every section, so a bench stopped part-way keeps what it measured
        out.write_text(json.dumps(res, indent=1, default=str))

    res["params"] = params_of(model)
    size = 512 if args.quick else 1024
    res["peak"] = {"fp32_gflops": matmul_peak(torch.float32, size, 5), "bf16_gflops": matmul_peak(torch.bfloat16, size, 5)}
    print(f"matmul peak {res['peak']['fp32_gflops']:.0f} GFLOP/s fp32, {res['peak']['bf16_gflops']:.0f} bf16", flush=True)
    # without bf16 matmul units torch emulates bfloat16 and it runs slower than float32: sampling in it is skipped
    bf16_slow = res["peak"]["bf16_gflops"] < 0.5 * res["peak"]["fp32_gflops"]
    bf16_model = None if bf16_slow else models.load_causal_lm(POLICY, load_settings("local", ["models.dtype=bfloat16"]))[0]
    inproc = 0.55 * budget.left()  # in-process sections; the rest for the Spark and XLA children
    budget_in = Budget(inproc)
    res["sampling"] = bench_sampling(model, bf16_model, tokenizer, args, budget_in)
    save()
    budget_in.start(0.4)
    res["judging"] = bench_judging(model, tokenizer, args, budget_in)
    save()
    del bf16_model
    budget_in.start(1.0)
    res["training"] = bench_training(args, budget_in, bf16_slow)
    save()
    print("continuous batching and m=32 (bench_continuous.py) ...", flush=True)
    res["continuous"] = run_child(["bench/bench_continuous.py", "--name", args.name] + (["--quick"] if args.quick else []), 600)
    save()
    # the XLA child before the Spark ones: it needs a fixed ~2 minutes, the Spark children drop rounds to fit
    if res["machine"]["torch_xla"] and not args.no_xla and budget.left() > 120:
        print("torch-xla training ...", flush=True)
        steps = "3" if args.quick else "4"
        res["xla"] = run_child(["bench/bench_train.py", "--steps", steps, "--batch", str(args.train_batch),
                                "--length", str(args.train_length)], int(min(300, budget.left() - 60)))
        res["xla_why"] = "bench_train.py failed or ran past the budget" if res["xla"] is None else ""
    else:
        res["xla_why"] = ("torch_xla not installed" if not res["machine"]["torch_xla"]
                          else "skipped (--no-xla)" if args.no_xla else "no time left in the budget")
    save()
    # local[1] with its default threads (all cores) and with one, then local[2] (one thread per task)
    for i, (master, threads, key) in enumerate((("local[1]", 0, "spark_local1"), ("local[1]", 1, "spark_local1_1thread"),
                                                ("local[2]", 0, "spark_local2"))):
        share = max(60.0, budget.left() * (0.3, 0.25, 0.5)[i])
        print(f"Spark {master}{f', {threads} thread' if threads else ''} ({share:.0f}s) ...", flush=True)
        child = ["bench/run_bench.py", "--spark-rounds", str(args.spark_rounds), "--budget-s", str(share), "--child", master,
                 "--threads", str(threads)]
        res[key] = run_child(child + (["--quick"] if args.quick else []), int(share + 90))
        save()
    # the limit is the best matmul rate seen: measured again at the end, so one slow moment does not halve it
    again = matmul_peak(torch.float32, size, 5)
    res["peak"]["fp32_gflops_runs"] = [res["peak"]["fp32_gflops"], again]
    res["peak"]["fp32_gflops"] = max(res["peak"]["fp32_gflops"], again)
    rows, rates = summarize(res)
    res.update(ratios=rows, rates=rates, seconds=round(time.time() - started, 1),
               load_avg_end=round(os.getloadavg()[0], 1))
    save()
    print()
    print(table(rows))
    print(f"rates (restpg estimate): {json.dumps(rates)}")
    print(f"{res['seconds']:.0f}s, load {res['machine']['load_avg_start']} → {res['load_avg_end']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
