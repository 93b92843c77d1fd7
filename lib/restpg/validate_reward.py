"""Is a reward fit to train on? Two checks, for the LLM judge and the embedding reward alike.

- shuffle (paper Appendix A, Fig. 5): one policy answers with S% of the examples given another
  user's retrieved profile, S in 0..100; a reward that tracks personalization falls as S grows.
- direct: the expected output scored against itself, against the same user's other writing and
  against another user's writing must come out in that order.
"""
from __future__ import annotations

import hashlib

import numpy as np

from restpg import catalog
from restpg.config import Settings
from restpg.tracking import say

SHUFFLE_LEVELS = (0, 25, 50, 75, 100)


def _unit(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def slope(levels, rewards) -> float:
    """Least-squares change of the reward per unit of shuffled fraction."""
    return float(np.polyfit(np.asarray(levels, float) / 100.0, np.asarray(rewards, float), 1)[0])


def shuffled_items(rows: list[dict], percent: int) -> list[dict]:
    """Give `percent`% of the examples (chosen by hash) the retrieved items of another user."""
    users = sorted({r["user_id"] for r in rows})
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user_id"], r["item_texts"])
    out = []
    for r in rows:
        texts = r["item_texts"]
        if len(users) > 1 and _unit(r["example_id"]) < percent / 100.0:
            other = users[(users.index(r["user_id"]) + 1 + int(_unit(r["example_id"] + "u") * (len(users) - 1))) % len(users)]
            other = other if other != r["user_id"] else users[(users.index(r["user_id"]) + 1) % len(users)]
            texts = by_user[other]
        out.append({**r, "item_texts": list(texts)})
    return out


def shuffle_check(spark, settings: Settings, policy: str, examples) -> list[dict]:
    from pyspark.sql import functions as F

    from restpg import generation
    from restpg.judge import add_rewards
    from restpg.policy_inputs import policy_prompts, with_retrievals
    from restpg.prompts import split_reasoning

    base = [r.asDict(recursive=True) for r in with_retrievals(spark, settings, examples)
            .select("example_id", "task", "user_id", "input", "target", "item_texts").collect()]
    cfg, rows = settings.evaluate, []
    for percent in SHUFFLE_LEVELS:
        df = spark.createDataFrame(shuffled_items(base, percent),
                                   "example_id string, task string, user_id string, input string, target string, item_texts array<string>")
        prompts_df = policy_prompts(spark, settings, df, "rest_pg")
        out = generation.generate_df(prompts_df.select("example_id", "prompt"), policy, settings, m=1, temperature=cfg.temperature,
                                     top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, iteration=-2, seed=settings.sample.seed)
        split = F.udf(lambda t: split_reasoning(t or "")[1], "string")
        judged = add_rewards(spark, settings, out.withColumn("response", split("text")).join(df.select("example_id", "input", "target"), "example_id"))
        mean = judged.agg(F.avg("reward").alias("m"), F.count("*").alias("n")).first()
        say(f"validate-reward shuffle {percent}%: mean reward {mean.m:.4f} over {mean.n}")
        rows.append({"setting": f"S={percent}", "percent": percent, "mean_reward": float(mean.m), "n": int(mean.n)})
    k = slope([r["percent"] for r in rows], [r["mean_reward"] for r in rows])
    for r in rows:
        r.update(check="shuffle", slope=k, fit=k < 0)
    return rows


def direct_check(spark, settings: Settings, examples) -> list[dict]:
    """self / same_user (a profile item of the user) / other_user (the next user's target)."""
    from pyspark.sql import functions as F

    from restpg.judge import add_rewards

    base = [r.asDict(recursive=True) for r in examples.select("example_id", "user_id", "input", "target", "profile").collect()]
    users = sorted({r["user_id"] for r in base})
    first_target = {}
    for r in base:
        first_target.setdefault(r["user_id"], r["target"])
    pairs = []
    for r in base:
        pairs.append((r["example_id"], "self", r["input"], r["target"], r["target"]))
        own = [p["fields"].get(f) for p in r["profile"] for f in ("reviewText", "abstract", "content", "body", "text") if p["fields"].get(f)]
        if own:
            pairs.append((r["example_id"], "same_user", r["input"], r["target"], own[0]))
        if len(users) > 1:
            other = users[(users.index(r["user_id"]) + 1) % len(users)]
            pairs.append((r["example_id"], "other_user", r["input"], r["target"], first_target[other]))
    df = spark.createDataFrame(pairs, "example_id string, setting string, input string, target string, response string")
    means = {r.setting: (float(r.m), int(r.n)) for r in add_rewards(spark, settings, df).groupBy("setting")
             .agg(F.avg("reward").alias("m"), F.count("*").alias("n")).collect()}
    order = [means.get(k, (float("nan"), 0))[0] for k in ("self", "same_user", "other_user")]
    fit = bool(order[0] > order[1] > order[2])
    return [{"check": "direct", "setting": k, "mean_reward": means[k][0], "n": means[k][1], "slope": None, "fit": fit}
            for k in ("self", "same_user", "other_user") if k in means]


def run(spark, settings: Settings, *, policy: str | None = None, split: str = "val", limit: int = 64,
        run_id: str = "manual") -> dict:
    from pyspark.sql import functions as F

    from restpg import models
    from restpg.judge import judge_model

    policy = policy or settings.models.policy
    examples = catalog.read(spark, settings, "examples").where(F.col("split") == split).orderBy("example_id").limit(limit).cache()
    rows = shuffle_check(spark, settings, policy, examples) + direct_check(spark, settings, examples)
    kind, judge = settings.judge.reward, models.resolve_ref(judge_model(settings), settings)
    out = spark.createDataFrame(
        [(kind, judge, r["check"], r["setting"], r["mean_reward"], r["n"], r["slope"], r["fit"], run_id) for r in rows],
        "reward_kind string, judge_model string, check string, setting string, mean_reward double, n int, slope double, fit boolean, run_id string",
    ).withColumn("created_at", F.current_timestamp())
    catalog.replace_slice(spark, settings, out, "reward_validation", {"reward_kind": kind}, run_id)
    fit = all(r["fit"] for r in rows)
    verdict = "fit to train on" if fit else "NOT fit to train on"
    say(f"validate-reward ({kind}, {judge}): {verdict}")
    try:
        import mlflow

        if mlflow.active_run():
            mlflow.set_tag("reward_fit", str(fit).lower())
            mlflow.log_metrics({f"reward_{r['check']}_{r['setting'].replace('=', '')}": r["mean_reward"] for r in rows})
    except Exception as e:  # the table row is the record; MLflow is a convenience here
        say(f"could not log reward validation to MLflow: {e}")
    return {"reward_kind": kind, "judge_model": judge, "policy": policy, "fit": fit, "verdict": verdict, "rows": rows}
