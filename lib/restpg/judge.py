"""Rewards (Algorithm 1, line 6): the LLM judge (paper Fig. 6, criterion argmax / 10) or the
embedding cosine, on the response only — never the reasoning → `judge_scores`."""
from __future__ import annotations

from typing import Iterator, Tuple

import pandas as pd

from restpg import catalog, prompts
from restpg.config import Settings

REWARD_COLUMNS = "reward double, score int, criterion_logprobs map<string,double>"


def pick_score(logprobs: dict[str, float], scores: list[int]) -> int:
    """The criterion whose score string is most probable; ties go to the lower score."""
    return max(scores, key=lambda s: (logprobs[str(s)], -s))


def judge_model(settings: Settings) -> str:
    return settings.models.judge if settings.judge.reward == "llm" else settings.models.retriever


def add_rewards(spark, settings: Settings, df):
    """df with input, target, response → + reward, score, criterion_logprobs, reward_kind, judge_model, template_version."""
    from pyspark.sql import functions as F

    from restpg import models

    kind, env = settings.judge.reward, models.worker_env(settings)
    ref = models.resolve_ref(judge_model(settings), settings)
    if kind == "embedding":
        from restpg.embedding import cosine_rewards

        @F.pandas_udf("double")
        def cosine(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
            for responses, targets in batches:
                yield pd.Series(cosine_rewards(responses.fillna("").tolist(), targets.fillna("").tolist(), ref, env))

        return (df.withColumn("reward", cosine("response", "target")).withColumn("score", F.lit(None).cast("int"))
                .withColumn("criterion_logprobs", F.lit(None).cast("map<string,double>"))
                .withColumn("reward_kind", F.lit(kind)).withColumn("judge_model", F.lit(ref))
                .withColumn("template_version", F.lit(None).cast("string")))
    if kind != "llm":
        raise ValueError(f"unknown reward {kind!r}: llm | embedding")
    from restpg import scoring

    scores, budget = list(settings.judge.scores), settings.judge.max_input_tokens
    models.checkpoint_dir(ref, settings)

    def render(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from restpg import generation

        tokenizer = models.load_tokenizer(ref, models.worker_settings(env))
        for pdf in batches:
            out = []
            for r in pdf.itertuples():
                target, response = r.target, r.response or ""
                text = generation.render_chat(tokenizer, prompts.judge_prompt(r.input, target, response))
                while generation.count_tokens(tokenizer, text) > budget and (len(target) > 200 or len(response) > 200):
                    target, response = target[: int(len(target) * 0.8)], response[: int(len(response) * 0.8)]
                    text = generation.render_chat(tokenizer, prompts.judge_prompt(r.input, target, response))
                out.append(text)
            yield pdf.assign(judge_prompt=out)

    from pyspark.sql.types import StringType, StructField, StructType

    schema = StructType([*df.schema.fields, StructField("judge_prompt", StringType())])  # `add` would mutate df's schema
    scored = scoring.score_df(df.mapInPandas(render, schema), ref, settings, [str(s) for s in scores], prompt_col="judge_prompt",
                              out_col="criterion_logprobs")
    pick = F.udf(lambda lp: pick_score(lp, scores), "int")
    return (scored.drop("judge_prompt").withColumn("score", pick("criterion_logprobs"))
            .withColumn("reward", F.col("score") / F.lit(max(scores)))
            .withColumn("reward_kind", F.lit(kind)).withColumn("judge_model", F.lit(ref))
            .withColumn("template_version", F.lit(prompts.template("judge").version)))


def run(spark, settings: Settings, variant: str, iteration: int, run_id: str = "manual") -> dict:
    from pyspark.sql import functions as F

    traj = catalog.read(spark, settings, "trajectories").where((F.col("variant") == variant) & (F.col("iteration") == iteration))
    if traj.limit(1).count() == 0:
        raise LookupError(f"no trajectories for variant={variant} iteration={iteration}: run `restpg sample` first")
    examples = catalog.read(spark, settings, "examples").select("example_id", "input", "target")
    rows = add_rewards(spark, settings, traj.join(examples, "example_id").select(
        "variant", "iteration", "example_id", "task", "sample_index", "input", "target", "response", "reasoning"))
    out = rows.select(
        "variant", "iteration", "example_id", "task", "sample_index", "reward_kind", "judge_model", "template_version",
        "reward", "score", "criterion_logprobs", F.length("response").alias("response_chars"),
        F.coalesce(F.length("reasoning"), F.lit(0)).alias("reasoning_chars"),
        F.lit(run_id).alias("run_id"), F.current_timestamp().alias("created_at"))
    slice_ = {"variant": variant, "iteration": iteration, "reward_kind": settings.judge.reward}
    version = catalog.replace_slice(spark, settings, out, "judge_scores", slice_, run_id)
    written = catalog.read(spark, settings, "judge_scores").where(
        (F.col("variant") == variant) & (F.col("iteration") == iteration) & (F.col("reward_kind") == settings.judge.reward))
    stats = written.agg(F.count("*").alias("rows"), F.avg("reward").alias("mean_reward"),
                        F.expr("percentile(reward, array(0.1, 0.5, 0.9))").alias("p10_p50_p90")).first().asDict()
    per_task = {r.task: round(r.m, 4) for r in written.groupBy("task").agg(F.avg("reward").alias("m")).collect()}
    return {"version": version, "reward_kind": settings.judge.reward, "per_task_mean": per_task, **stats}
