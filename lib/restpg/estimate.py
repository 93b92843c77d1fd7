"""`restpg estimate`: what a run of a profile costs before it starts, so a data team can size a job.

Per stage and per EM iteration: generated tokens, judge passes (one per judged output), training
tokens and texts embedded, counted from the profile's settings and the run's data (the `examples`
table when it exists, else the demo data the profile would make), then wall time at the rates the
last `make bench` measured (`bench/results/*.json`, key `rates`). Every output is counted at its
length cap and every training row at prompt budget + output cap: the figures are upper bounds, and
the rates are those of the benchmark's model on the benchmark's machine. A response budget sized from the
data (`prompt.max_response_tokens: auto`) is resolved from the `examples` table, and counted at its cap
(`prompt.max_response_cap`) before there is one.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from restpg import extractive, prompts
from restpg import variants as V
from restpg.config import Settings
from restpg.tracking import say

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
RATE_KEYS = {  # rates a bench result carries → what they time
    "generate_tokens_per_s": "single-output generation (reasoning, selection, validation, evaluation)",
    "sample_tokens_per_s": "E-step sampling, m outputs per prompt sharing one prefill",
    "judge_outputs_per_s": "rewarded outputs per second",
    "train_tokens_per_s": "training tokens per second",
    "embed_texts_per_s": "texts embedded per second (retrieval)",
}


@dataclass(frozen=True)
class DataCounts:
    train_inputs: int  # after data.max_examples
    split_inputs: dict  # split → examples
    embed_texts: int  # distinct profile items + every example's input


@dataclass(frozen=True)
class Work:
    stage: str
    iteration: int | None
    variant: str
    generated_tokens: int = 0
    generated_outputs: int = 0
    sampled: bool = False  # m outputs per prompt (the E-step), timed at the sampling rate
    judge_passes: int = 0
    train_tokens: int = 0
    embedded_texts: int = 0
    rows: int = 1  # outputs decoded side by side (one batch) in single-output generation


def counts_of(records: list[dict], max_examples: int = 0) -> DataCounts:
    """DataCounts of examples given as dicts with split, input, user_id and profile (items with item_id, text)."""
    splits: dict = {}
    for r in records:
        splits[r["split"]] = splits.get(r["split"], 0) + 1
    train = splits.get("train", 0)
    items = {(r["user_id"], it["item_id"], it["text"]) for r in records for it in (r["profile"] or [])}
    return DataCounts(min(train, max_examples) if max_examples else train, splits, len(items) + len(records))


def away(spark, settings: Settings) -> bool:
    """A Unity Catalog profile in a session without its catalog (a local one, no workspace): no table to read."""
    from restpg import catalog

    return settings.catalog.kind == "uc" and catalog.namespace(settings)[0] not in {c.name for c in spark.catalog.listCatalogs()}


def has_examples(spark, settings: Settings) -> bool:
    from restpg import catalog

    return not away(spark, settings) and catalog.exists(spark, settings, "examples")


def data_counts(spark, settings: Settings) -> DataCounts:
    """Counts of the run's examples: from the `examples` table, else the demo data of the profile (also for
    a Unity Catalog profile away from its workspace, whose stages an estimate still sizes)."""
    from restpg import catalog

    if has_examples(spark, settings):
        rows = catalog.read(spark, settings, "examples").select("split", "input", "user_id", "profile").collect()
        records = [r.asDict(recursive=True) for r in rows]
    elif settings.data.source == "demo" or away(spark, settings):
        from restpg import demo_data

        d = settings.data
        if d.source != "demo":
            say(f"estimate: no catalog {settings.catalog.catalog!r} in this session (no workspace): inputs counted on "
                f"the demo data ({d.demo_users} users per task), not {d.source}")
        # raw LongLaMP records: user ids live under task-specific keys, so an item is known by its content
        records = [{**r, "user_id": "", "profile": [{"item_id": "", "text": json.dumps(p, sort_keys=True)} for p in r["profile"]]}
                   for r in demo_data.generate(d.demo_users, d.demo_profile_items, d.demo_examples_per_user, d.demo_seed)]
    else:
        raise LookupError(f"no examples table and data.source={settings.data.source!r} is not demo data: "
                          "run `restpg ingest` first (the estimate counts the ingested examples)")
    return counts_of(records, settings.data.max_examples)


def cap(settings: Settings, variant: str) -> int:
    p = settings.prompt
    return prompts.output_budget(variant, p.max_reasoning_tokens, p.max_response_tokens)


def _train(settings: Settings, variant: str, iteration: int) -> Work:
    """One training job: cfg.steps steps of batch_size rows at prompt budget + output cap, and the
    checkpoint selections (step 0, every eval_every steps, the last step) on selection_examples."""
    t, n = settings.train, cap(settings, variant)
    selections = 1 + (t.steps // t.eval_every if t.eval_every > 0 else 0) + (t.eval_every <= 0 or t.steps % t.eval_every != 0)
    outputs = selections * t.selection_examples
    return Work("train", iteration, variant, generated_tokens=outputs * n, generated_outputs=outputs, judge_passes=outputs,
                train_tokens=t.steps * t.batch_size * (settings.prompt.max_input_tokens + n), rows=batch(t.selection_examples))


def plan(settings: Settings, counts: DataCounts) -> list[Work]:
    """The work of a whole `restpg pipeline` run, stage by stage, EM iterations in order."""
    names = V.check(settings.loop.variants)
    sft = [v for v in V.SFT_NAMES if v in names or any(V.base_of(e) == v for e in names)]
    em = [v for v in names if V.is_em(v)]
    train_n, m = counts.train_inputs, settings.sample.m
    work = [Work("retrieve", None, "", embedded_texts=counts.embed_texts)]
    if any(V.uses_reasoning(v) for v in sft):  # the extractive teacher writes its slots without a model
        n = 0 if extractive.is_extractive(settings.models.teacher) else train_n
        work.append(Work("reason", None, "teacher", generated_tokens=n * settings.prompt.max_reasoning_tokens, generated_outputs=n,
                         rows=batch(n)))
    work += [_train(settings, v, 0) for v in sft]
    val = min(settings.validate.examples, counts.split_inputs.get(settings.validate.split, 0))
    base = sft[0] if sft else "sft"
    work.append(Work("validate_reward", None, base, generated_tokens=2 * val * cap(settings, base), generated_outputs=2 * val,
                     judge_passes=2 * val + 3 * val, rows=batch(val)))
    for t in range(1, settings.loop.iterations + 1):
        for v in em:
            outputs = train_n * m
            work.append(Work("sample", t, v, generated_tokens=outputs * cap(settings, v), generated_outputs=outputs, sampled=True))
            work.append(Work("judge", t, v, judge_passes=outputs))
            work.append(Work("train", t, v, **{k: getattr(_train(settings, v, t), k) for k in
                                               ("generated_tokens", "generated_outputs", "judge_passes", "train_tokens", "rows")}))
    for stage, split in (("evaluate", settings.evaluate.split), ("promote", settings.promote.split)):
        n = counts.split_inputs.get(split, 0)
        tokens = sum(n * cap(settings, v) for v in names)
        work.append(Work(stage, None, ",".join(names), generated_tokens=tokens, generated_outputs=n * len(names),
                         judge_passes=n * len(names), rows=batch(n)))  # a batch holds one variant's (one model's) prompts
    return work


def batch(outputs: int) -> int:
    """Outputs a single-output generation job decodes side by side: all of them, up to a batch's rows."""
    return max(1, min(outputs, INFERENCE_ROWS))


def generation_rate(w: Work, rates: dict) -> float | None:
    """Tokens per second of `w`'s generation. Single-output generation is timed at one row (`make bench`'s
    generate rate); a batch of `w.rows` rows reads the weights once per step for all of them, so it makes up
    to `rows` times that, never more than the measured E-step sampler (a full batch of rows)."""
    if w.sampled:
        return rates.get("sample_tokens_per_s")
    single = rates.get("generate_tokens_per_s")
    if not single:
        return None
    full = rates.get("sample_tokens_per_s") or single
    return min(w.rows * single, max(full, single))


def seconds(w: Work, rates: dict) -> float | None:
    """Wall seconds of `w` at `rates`; None when a rate it needs is missing."""
    parts = [(w.generated_tokens, "generation"),
             (w.judge_passes, "judge_outputs_per_s"), (w.train_tokens, "train_tokens_per_s"),
             (w.embedded_texts, "embed_texts_per_s")]
    total = 0.0
    for amount, key in parts:
        if amount:
            rate = generation_rate(w, rates) if key == "generation" else rates.get(key)
            if not rate:
                return None
            total += amount / rate
    return total


def latest_bench(results_dir: Path = RESULTS_DIR) -> Path | None:
    """The newest `make bench` result that carries rates (other benchmarks write their own JSON beside it)."""
    def has_rates(p: Path) -> bool:
        try:
            return bool(json.loads(p.read_text()).get("rates"))
        except (OSError, ValueError, AttributeError):
            return False

    files = sorted((p for p in results_dir.glob("*.json") if has_rates(p)), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def load_rates(path: Path | None) -> tuple[dict, str]:
    """(rates, where they come from) of a bench result file; ({}, why not) without one."""
    if path is None:
        return {}, "no bench result: run `make bench` for wall times"
    doc = json.loads(Path(path).read_text())
    rates = {k: float(v) for k, v in doc.get("rates", {}).items() if k in RATE_KEYS and v}
    machine = doc.get("machine", {})
    return rates, f"{path} ({machine.get('name', '?')}, {doc.get('model', '?')} {doc.get('dtype', '')})".rstrip()


def _fmt(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _hours(s: float | None) -> str:
    return "n/a" if s is None else f"{s / 3600:.2f}"


def table(work: list[Work], rates: dict) -> str:
    """One line per job, then the total and the EM iterations' share."""
    head = f"{'stage':<16}{'t':>3} {'variant':<22}{'gen tokens':>11}{'outputs':>9}{'judge':>9}{'train tok':>11}{'embed':>8}{'hours':>10}"
    lines = [head, "-" * len(head)]
    for w in work:
        lines.append(f"{w.stage:<16}{'' if w.iteration is None else w.iteration:>3} {w.variant[:21]:<22}"
                     f"{_fmt(w.generated_tokens):>11}{_fmt(w.generated_outputs):>9}{_fmt(w.judge_passes):>9}"
                     f"{_fmt(w.train_tokens):>11}{_fmt(w.embedded_texts):>8}{_hours(seconds(w, rates)):>10}")
    lines.append("-" * len(head))
    for label, rows in (("total", work), ("per EM iteration", [w for w in work if w.iteration == 1])):
        s = [seconds(w, rates) for w in rows]
        lines.append(f"{label:<42}{_fmt(sum(w.generated_tokens for w in rows)):>11}"
                     f"{_fmt(sum(w.generated_outputs for w in rows)):>9}{_fmt(sum(w.judge_passes for w in rows)):>9}"
                     f"{_fmt(sum(w.train_tokens for w in rows)):>11}{_fmt(sum(w.embedded_texts for w in rows)):>8}"
                     f"{_hours(None if None in s else sum(s)):>10}")
    return "\n".join(lines)


def totals(work: list[Work], rates: dict) -> dict:
    s = [seconds(w, rates) for w in work]
    em = [seconds(w, rates) for w in work if w.iteration == 1]
    return {"generated_tokens": sum(w.generated_tokens for w in work), "judge_passes": sum(w.judge_passes for w in work),
            "train_tokens": sum(w.train_tokens for w in work), "embedded_texts": sum(w.embedded_texts for w in work),
            "hours": None if None in s else round(sum(s) / 3600, 3),
            "hours_per_em_iteration": None if None in em or not em else round(sum(em) / 3600, 3)}


INFERENCE_ROWS = 64  # rows of a sampling or judging batch on CPUs (generate_df's max_rows, the judge's)
GPU_GIB = (24, 40, 80)  # A10G, A100 40 GB, A100/H100 80 GB
GIB = 2**30


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def gpu_memory(settings: Settings) -> list[dict]:
    """GPU memory of each role at the profile's sizes (bytes): inference roles hold their weights and, for a
    batch of `INFERENCE_ROWS` rows at their prompt budget + output cap, the KV cache and one position's
    logits (`sizing`); `rows_fit` are the rows `sizing.batch_rows` gives them on GPUs of `GPU_GIB` (0: not
    one). Training holds float32 weights, gradients, optimizer state, the completion window's logits and
    activations. A role whose model's dims are not at hand (not downloaded or converted) gets None."""
    from restpg import rewards, sizing
    from restpg.rewards import JUDGE_LABEL_TOKENS

    m, p, dtype = settings.models, settings.prompt, _dtype_bytes(settings.models.dtype)
    output = max(cap(settings, v) for v in V.check(settings.loop.variants))
    roles = [("sampling", m.policy, p.max_input_tokens + output)]
    if not extractive.is_extractive(m.teacher):
        roles.append(("teacher", m.teacher, settings.reason.max_input_tokens + p.max_reasoning_tokens))
    if settings.judge.reward == "llm":
        roles.append(("judge", rewards.judge_model(settings), settings.judge.max_input_tokens + JUDGE_LABEL_TOKENS))
    out = []
    for role, ref, tokens in roles:
        config = sizing.config_of(ref, settings)
        row = {"role": role, "model": ref, "tokens_per_row": tokens, "rows": INFERENCE_ROWS}
        if config is not None:
            weights, per_row = sizing.weight_count(config) * dtype, sizing.row_bytes(config, tokens, dtype)
            fit = {}
            for g in GPU_GIB:
                try:
                    fit[g] = sizing.batch_rows(config, g * GIB, tokens, dtype)
                except ValueError:
                    fit[g] = 0
            row.update(weights=weights, kv_per_token=sizing.kv_bytes_per_token(config, dtype),
                       batch=INFERENCE_ROWS * per_row, total=weights + INFERENCE_ROWS * per_row, rows_fit=fit)
        out.append(row)
    t, config = settings.train, sizing.config_of(m.policy, settings)
    row = {"role": "training", "model": m.policy, "tokens_per_row": p.max_input_tokens + output, "rows": t.micro_batch_size}
    if config is not None:
        parts = sizing.training_bytes(config, t.optimizer, t.micro_batch_size, p.max_input_tokens + output, output + 1,
                                      t.gradient_checkpointing)
        row.update(parts=parts, total=sum(parts.values()))
    out.append(row)
    return out


def _gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.1f}"


def memory_table(rows: list[dict]) -> str:
    """One line per role: GiB of weights, KV cache per token, batch (KV cache and logits) and total, and the
    rows GPUs of each size hold; training's parts on a line of their own."""
    head = (f"{'role':<10}{'model':<34}{'tokens/row':>11}{'rows':>6}{'weights':>9}{'KV/token':>10}{'batch':>8}{'total':>8}"
            + "".join(f"{f'rows@{g}G':>10}" for g in GPU_GIB))
    lines = ["GPU memory per role (GiB) at the profile's sizes", head, "-" * len(head)]
    for r in rows:
        line = f"{r['role']:<10}{r['model'][:33]:<34}{r['tokens_per_row']:>11}{r['rows']:>6}"
        if "parts" in r:
            line += f"{_gb(r['parts']['weights']):>9}{'':>10}{'':>8}{_gb(r['total']):>8}"
            line += "\n" + " " * 10 + "  ".join(f"{k} {_gb(v)}" for k, v in r["parts"].items())
        elif "weights" in r:
            line += (f"{_gb(r['weights']):>9}{r['kv_per_token'] / 1024:>8.0f}KB{_gb(r['batch']):>8}{_gb(r['total']):>8}"
                     + "".join(f"{r['rows_fit'][g]:>10}" for g in GPU_GIB))
        else:
            line += "   (no config at hand: convert or download the model first)"
        lines.append(line)
    return "\n".join(lines)


def budgeted(spark, settings: Settings) -> Settings:
    """`settings` with an `auto` response budget resolved from the examples table, or at its cap before ingest."""
    from restpg import budgets

    if budgets.is_auto(settings) and not has_examples(spark, settings):
        p = settings.prompt
        say(f"estimate: no examples table yet: the auto response budget is counted at its cap, {p.max_response_cap} tokens")
        return dataclasses.replace(settings, prompt=dataclasses.replace(p, max_response_tokens=p.max_response_cap))
    return budgets.resolve(spark, settings)


def run(spark, settings: Settings, *, run_id: str | None, bench: str | None = None) -> dict:
    """Prints the table of a whole run of the profile and returns its totals."""
    settings = budgeted(spark, settings)
    counts = data_counts(spark, settings)
    rates, source = load_rates(Path(bench) if bench else latest_bench())
    work = plan(settings, counts)
    say(f"estimate: {counts.train_inputs} training inputs, splits {counts.split_inputs}, rates from {source}")
    print(table(work, rates), flush=True)
    missing = sorted(set(RATE_KEYS) - set(rates))
    if missing:
        say(f"estimate: no measured rate for {', '.join(missing)}: those jobs show n/a")
    out = totals(work, rates)
    memory = gpu_memory(settings)
    if settings.models.device.startswith("cuda") or settings.train.device == "cuda":
        print(memory_table(memory), flush=True)
    return {**out, "gpu_memory": memory, "rates": rates, "rates_from": source, "train_inputs": counts.train_inputs,
            "splits": counts.split_inputs, "upper_bound": "outputs at their caps, training rows at prompt budget + cap",
            "jobs": len(work), "iterations": settings.loop.iterations, "max_response_tokens": settings.prompt.max_response_tokens}
