"""Is the reward fit to train on? A gate before the EM loop, for the LLM judge and the embedding reward alike.

- shuffle (paper Appendix A, Fig. 5): the SFT policy answers `validate.examples` inputs of
  `validate.split` with S% of them (S in 0..100) given another user's retrieved profile. Per-example
  rewards are regressed on the shuffled fraction; a reward that tracks personalization has a
  significantly negative slope (one-sided p < `evaluate.alpha`).
- direct: the expected output scored against itself, against the same user's other writing and against
  another user's writing must come out in that order.

An unfit reward raises `RewardUnfit` (with the numbers) unless `validate.allow_unfit_reward`; the rows
go to `reward_validation` either way.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from restpg import catalog, prompts, tasks
from restpg import variants as V
from restpg.config import Settings
from restpg.embedding import watch
from restpg.tracking import say

SHUFFLE_LEVELS = (0, 25, 50, 75, 100)
DIRECT = ("self", "same_user", "other_user")


# --------------------------------------------------------------------------- the decision (pure)

def shuffle_trend(fractions, rewards) -> tuple[float, float]:
    """(slope, one-sided p of slope < 0) of rewards regressed on the shuffled fraction (0..1).

    Points are (level, example) pairs, so an example counts once per level: p is a screening number
    that treats them as independent, as Fig. 5 reads the trend off the same outputs."""
    from scipy.stats import linregress

    x, y = np.asarray(fractions, float), np.asarray(rewards, float)
    if len(x) < 3 or np.ptp(x) == 0 or not np.isfinite(y).all():
        return math.nan, math.nan
    if np.ptp(y) == 0:  # a reward blind to the profile: no slope, no evidence of one
        return 0.0, 1.0
    fit = linregress(x, y, alternative="less")
    return float(fit.slope), float(fit.pvalue)


def shuffle_fit(slope: float, p_value: float, alpha: float) -> bool:
    """The reward falls significantly as more of the profile belongs to someone else."""
    return bool(slope < 0 and p_value < alpha)  # NaN compares False: no evidence is not a pass


def direct_fit(means: dict) -> bool:
    """self > same_user > other_user, strictly."""
    got = [means.get(k, math.nan) for k in DIRECT]
    return bool(got[0] > got[1] > got[2])


@dataclass(frozen=True)
class Verdict:
    slope: float
    p_value: float
    alpha: float
    means: dict = field(default_factory=dict)  # self / same_user / other_user

    @property
    def shuffle_fit(self) -> bool:
        return shuffle_fit(self.slope, self.p_value, self.alpha)

    @property
    def direct_fit(self) -> bool:
        return direct_fit(self.means)

    @property
    def fit(self) -> bool:
        return self.shuffle_fit and self.direct_fit

    def describe(self) -> str:
        m = {k: round(self.means.get(k, math.nan), 4) for k in DIRECT}
        return (f"shuffle slope {self.slope:.4f} per unit shuffled (one-sided p {self.p_value:.4g}, needs < 0 with "
                f"p < {self.alpha}): {'pass' if self.shuffle_fit else 'FAIL'}; direct self {m['self']} > same_user "
                f"{m['same_user']} > other_user {m['other_user']}: {'pass' if self.direct_fit else 'FAIL'}")


class RewardUnfit(RuntimeError):
    """The reward failed validation; `verdict` holds slope, p and the direct means."""

    def __init__(self, kind: str, judge: str, verdict: Verdict):
        self.verdict = verdict
        super().__init__(f"the {kind} reward ({judge}) is NOT fit to train on: {verdict.describe()}. "
                         "To go on anyway: --set validate.allow_unfit_reward=true (validate_reward alone: --allow-unfit-reward).")


# --------------------------------------------------------------------------- which example gets whose profile

def _unit(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def shuffle_order(example_ids) -> list[str]:
    """A fixed pseudo-random order: level S shuffles the first round(n·S/100), so levels are nested."""
    return sorted(example_ids, key=lambda e: (_unit(e), e))


def shuffled_at(position: int, n: int, percent: int) -> bool:
    return position < round(n * percent / 100)


def donors(rows: list[dict]) -> dict[str, str]:
    """example_id → the example of another user whose retrieved items it gets when shuffled
    (empty when there is only one user)."""
    by_user: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: r["example_id"]):
        by_user.setdefault(r["user_id"], r["example_id"])
    users = sorted(by_user)
    out = {}
    for r in rows:
        others = [u for u in users if u != r["user_id"]]
        if others:
            out[r["example_id"]] = by_user[others[int(_unit(r["example_id"] + "/donor") * len(others)) % len(others)]]
    return out


def own_writing(task: str, item: dict) -> str:
    """A profile item's document (review text, abstract, post, email body), else its rendered text."""
    spec, fields = tasks.resolve(task), item.get("fields") or {}
    for name in reversed(spec.item_fields if spec else ()):
        if (fields.get(name) or "").strip():
            return fields[name]
    return item["text"]


def direct_pairs(rows: list[dict]) -> list[tuple]:
    """(example_id, setting, input, target, response) of the direct check."""
    from restpg.retrieve import normalize

    first_target: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: r["example_id"]):
        first_target.setdefault(r["user_id"], r["target"])
    users = sorted(first_target)
    pairs = []
    for r in rows:
        pairs.append((r["example_id"], "self", r["input"], r["target"], r["target"]))
        own = [own_writing(r["task"], it) for it in r["profile"]]
        own = [t for t in own if normalize(t) != normalize(r["target"])]
        if own:
            pairs.append((r["example_id"], "same_user", r["input"], r["target"], own[0]))
        if len(users) > 1:
            other = users[(users.index(r["user_id"]) + 1) % len(users)]
            pairs.append((r["example_id"], "other_user", r["input"], r["target"], first_target[other]))
    return pairs


# --------------------------------------------------------------------------- the stage

def sft_policy(settings: Settings) -> tuple[str, str]:
    """(model URI, variant) of the SFT model the check runs on: plain SFT when trained (its outputs are
    plainest format, so the check measures the reward and not the output format), else SFT with reasoning,
else PAT's iteration 0."""
    from restpg import registry

    for variant in ("sft", "sft_reasoning", "pat"):  # pat's iteration 0 is its SFT start
        uri = registry.trained_version(settings, variant, 0)
        if uri is not None:
            return uri, variant
    raise LookupError("reward validation runs on the SFT model, and none is trained yet: run `restpg train --variant "
                      "sft_reasoning --iteration 0` (or --variant sft) first, or pass a policy")


def _shuffle_outputs(spark, settings: Settings, policy: str, variant: str, rows: list[dict], donor: dict, counter=None):
    """DataFrame(key, input, target, response), key own|<example_id> or shuffled|<example_id>: each example
    answered with its own retrieved items and with its donor's."""
    from pyspark.sql import functions as F

    from restpg import generation
    from restpg.policy_inputs import policy_prompts

    items = {r["example_id"]: list(r["item_texts"]) for r in rows}
    mine = [r for r in rows if r["example_id"] in donor]
    gen = [(f"own|{r['example_id']}", r["task"], r["input"], items[r["example_id"]]) for r in mine]
    gen += [(f"shuffled|{r['example_id']}", r["task"], r["input"], items[donor[r["example_id"]]]) for r in mine]
    gen_df = spark.createDataFrame(gen, "example_id string, task string, input string, item_texts array<string>")
    prompts_df = policy_prompts(spark, settings, gen_df, variant)
    cfg = settings.evaluate
    out = generation.generate_df(prompts_df.select("example_id", "prompt"), policy, settings, m=1, temperature=cfg.temperature,
                                 top_p=cfg.top_p, iteration=-2, seed=settings.sample.seed,
                                 counter=counter, n_prompts=len(gen), **generation.limits(settings, variant))
    # the gate checks what the reward sees in the policy's text, not whether the policy kept to its budgets:
    # a response cut at its budget, or after a separator the decoder wrote at the reasoning budget, is scored
    # as it stands (those format rules are the filter's and evaluation's); a text whose response cannot be
    # told apart (no separator, or a second one) still leaves nothing to score
    respond = F.udf(lambda text, finished: prompts.parse_output(variant, text or "", True, forced=False).response,
                    "string")
    truth = spark.createDataFrame([(r["example_id"], r["input"], r["target"]) for r in rows], "eid string, input string, target string")
    return (out.withColumn("eid", F.split("example_id", r"\|").getItem(1))
            .join(truth, "eid").select(F.col("example_id").alias("key"), "input", "target",
                                       respond("text", "finished").alias("response")))


def _assemble(rows: list[dict], donor: dict, reward: dict) -> tuple[list[dict], list[float], list[float]]:
    """Per-level means and the (fraction, reward) points of the regression."""
    order = shuffle_order([r["example_id"] for r in rows if r["example_id"] in donor])
    n, levels, xs, ys = len(order), [], [], []
    for percent in SHUFFLE_LEVELS:
        got = [reward[("shuffled|" if shuffled_at(i, n, percent) else "own|") + e] for i, e in enumerate(order)]
        xs += [percent / 100.0] * len(got)
        ys += got
        if got:
            levels.append({"setting": f"S={percent}", "mean_reward": float(np.mean(got)), "n": len(got)})
    return levels, xs, ys


def run(spark, settings: Settings, *, run_id: str, policy: str | None = None, variant: str | None = None,
        allow_unfit: bool | None = None) -> dict:
    """Both checks on the SFT model (or `policy`, read in `variant`'s output format, default plain `sft`)."""
    from pyspark.sql import functions as F

    from restpg import models
    from restpg.policy_inputs import with_retrievals
    from restpg.rewards import add_rewards, judge_model, kind_label

    if policy is None:
        policy, variant = sft_policy(settings)
    variant = variant or "sft"
    V.get(variant)
    allow_unfit = settings.validate.allow_unfit_reward if allow_unfit is None else allow_unfit
    cfg = settings.validate
    examples = (catalog.read(spark, settings, "examples").where(F.col("split") == cfg.split)
                .orderBy("example_id").limit(cfg.examples))
    rows = [r.asDict(recursive=True) for r in with_retrievals(spark, settings, examples)
            .select("example_id", "task", "user_id", "input", "target", "profile", "item_texts").collect()]
    donor = donors(rows)
    say(f"validate_reward: {len(rows)} {cfg.split} examples of {len({r['user_id'] for r in rows})} users, policy {policy} ({variant})")

    direct = spark.createDataFrame(direct_pairs(rows), "example_id string, setting string, input string, target string, response string")
    scored = direct.select(F.concat_ws("|", "setting", "example_id").alias("key"), "input", "target", "response")
    answers = 2 * sum(r["example_id"] in donor for r in rows)
    with watch(spark, f"validate_reward: {variant} answers (own and shuffled profile)", answers) as counter:
        if donor:
            scored = scored.unionByName(_shuffle_outputs(spark, settings, policy, variant, rows, donor, counter))
        reward = {r.key: float(r.reward) for r in add_rewards(spark, settings, scored).select("key", "reward").collect()}

    levels, xs, ys = _assemble(rows, donor, reward)
    slope, p_value = shuffle_trend(xs, ys)
    means, counts = {}, {}
    for setting in DIRECT:
        got = [v for k, v in reward.items() if k.startswith(setting + "|")]
        if got:
            means[setting], counts[setting] = float(np.mean(got)), len(got)
    verdict = Verdict(slope, p_value, settings.evaluate.alpha, means)

    kind, judge = kind_label(settings), models.resolve_ref(judge_model(settings), settings)
    _nan = lambda x: None if x is None or math.isnan(x) else x  # noqa: E731
    table = ([(kind, judge, policy, "shuffle", lv["setting"], lv["mean_reward"], lv["n"], _nan(slope), _nan(p_value),
               verdict.shuffle_fit, run_id) for lv in levels]
             + [(kind, judge, None, "direct", k, means[k], counts[k], None, None, verdict.direct_fit, run_id) for k in DIRECT if k in means])
    out = spark.createDataFrame(table, "reward_kind string, judge_model string, policy string, check string, setting string, "
                                       "mean_reward double, n int, slope double, p_value double, fit boolean, run_id string")
    version = catalog.replace_slice(spark, settings, out.withColumn("created_at", F.current_timestamp()), "reward_validation",
                                    {"reward_kind": kind}, run_id)
    _log(verdict, levels)
    result = {"reward_kind": kind, "judge_model": judge, "policy": policy, "variant": variant, "fit": verdict.fit,
              "verdict": ("fit to train on: " if verdict.fit else "NOT fit to train on: ") + verdict.describe(),
              "slope": _nan(slope), "p_value": _nan(p_value), "direct_means": means,
              "shuffle_means": {lv["setting"]: lv["mean_reward"] for lv in levels}, "rows": len(table), "version": version}
    say(f"validate_reward ({kind}, {judge}): {result['verdict']}")
    if not verdict.fit:
        if not allow_unfit:
            raise RewardUnfit(kind, judge, verdict)
        # one line, not a Python warning (which printed the verdict again with a line of pipeline source under it)
        say(f"validate_reward: going on with the unfit {kind} reward (validate.allow_unfit_reward); the EM variants' "
            f"training signal need not follow the profile")
    return result


def _log(verdict: Verdict, levels: list[dict]) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.set_tag("reward_fit", str(verdict.fit).lower())
    metrics = {f"reward_shuffle_{lv['setting'].replace('=', '')}": lv["mean_reward"] for lv in levels}
    metrics.update({f"reward_direct_{k}": v for k, v in verdict.means.items()})
    metrics.update({k: v for k, v in (("reward_shuffle_slope", verdict.slope), ("reward_shuffle_p", verdict.p_value)) if not math.isnan(v)})
    mlflow.log_metrics(metrics)
