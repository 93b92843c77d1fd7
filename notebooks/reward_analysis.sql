-- Databricks notebook source
-- MAGIC %md
-- MAGIC # Rewards of the self-training loop
-- MAGIC What the E-step sampled (`trajectories`), how the judge rewarded it (`judge_scores`),
-- MAGIC and what the filter kept for the M-step (`training_sets`).
-- MAGIC
-- MAGIC Rewards are `score / 10` under the LLM judge (the paper keeps outputs with reward ≥ τ = 1.0, i.e. the
-- MAGIC judge's top criterion) or a cosine under the local embedding reward, which needs its own τ: read the
-- MAGIC pass-rate cell below to pick it. `run` is `variant / it iteration`.
-- MAGIC
-- MAGIC The judge sees the response only. An output without a response to judge (`format_ok = false`: no separator,
-- MAGIC empty reasoning or response, cut at the length cap) gets reward 0 and is never kept.

-- COMMAND ----------

-- Parameters: the catalog and schema the tables live in (Databricks widgets; locally
-- `restpg notebook run FILE --catalog spark_catalog --schema restpg`, the defaults of the local profile)
CREATE WIDGET TEXT catalog DEFAULT 'main';
CREATE WIDGET TEXT schema DEFAULT 'restpg';
USE CATALOG IDENTIFIER(:catalog);
USE SCHEMA IDENTIFIER(:schema)

-- COMMAND ----------

-- Reward histogram per EM iteration and task
-- chart: bar x=reward_bucket y=n series=run facet=task title="Reward histogram per EM iteration"
SELECT task,
       concat(variant, ' / it ', iteration) AS run,
       reward_kind,
       round(floor(reward * 10) / 10, 1) AS reward_bucket,
       count(*) AS n
FROM judge_scores
GROUP BY ALL
ORDER BY task, reward_bucket, run

-- COMMAND ----------

-- Pass rate against tau: share of outputs with reward >= tau, and share of inputs with at least one
-- chart: line x=tau y=output_pass_rate series=run title="Pass rate of sampled outputs against tau"
WITH grid AS (SELECT CAST(id AS DOUBLE) / 10 AS tau FROM range(0, 11))
SELECT concat(j.variant, ' / it ', j.iteration) AS run,
       j.reward_kind,
       g.tau,
       avg(CASE WHEN j.reward >= g.tau THEN 1 ELSE 0 END) AS output_pass_rate,
       count(DISTINCT CASE WHEN j.reward >= g.tau THEN j.example_id END) / count(DISTINCT j.example_id) AS input_coverage,
       count(*) AS outputs
FROM judge_scores j CROSS JOIN grid g
GROUP BY ALL
ORDER BY run, g.tau

-- COMMAND ----------

-- Reward against reasoning length (the reasoning is not judged; does longer reasoning go with higher reward?)
-- chart: line x=reasoning_chars_bucket y=mean_reward series=run title="Mean reward by reasoning length (chars)"
SELECT concat(variant, ' / it ', iteration) AS run,
       reward_kind,
       CAST(floor(reasoning_chars / 200) * 200 AS INT) AS reasoning_chars_bucket,
       avg(reward) AS mean_reward,
       count(*) AS n
FROM judge_scores
GROUP BY ALL
ORDER BY run, reasoning_chars_bucket

-- COMMAND ----------

-- Per-user spread of rewards: the 100 user and iteration pairs whose rewards vary most
SELECT e.user_id,
       j.task,
       concat(j.variant, ' / it ', j.iteration) AS run,
       j.reward_kind,
       count(*) AS outputs,
       count(DISTINCT j.example_id) AS inputs,
       avg(j.reward) AS mean_reward,
       var_samp(j.reward) AS reward_variance,
       stddev_samp(j.reward) AS reward_stddev,
       min(j.reward) AS min_reward,
       max(j.reward) AS max_reward,
       avg(t.n_tokens) AS mean_tokens
FROM judge_scores j
JOIN examples e ON e.example_id = j.example_id
LEFT JOIN trajectories t
  ON t.variant = j.variant AND t.iteration = j.iteration AND t.example_id = j.example_id AND t.sample_index = j.sample_index
GROUP BY ALL
ORDER BY reward_variance DESC NULLS LAST, e.user_id
LIMIT 100

-- COMMAND ----------

-- Distribution of per-user reward standard deviation
-- chart: bar x=stddev_bucket y=users series=run title="Users by standard deviation of their rewards"
WITH per_user AS (
  SELECT e.user_id, concat(j.variant, ' / it ', j.iteration) AS run, coalesce(stddev_samp(j.reward), 0.0) AS sd
  FROM judge_scores j
  JOIN examples e ON e.example_id = j.example_id
  GROUP BY ALL
)
SELECT run, round(floor(sd * 20) / 20, 2) AS stddev_bucket, count(*) AS users
FROM per_user
GROUP BY ALL
ORDER BY stddev_bucket, run

-- COMMAND ----------

-- Share of reward variance between users rather than within them (the personalization signal)
WITH per_user AS (
  SELECT concat(j.variant, ' / it ', j.iteration) AS run, e.user_id, avg(j.reward) AS user_mean
  FROM judge_scores j JOIN examples e ON e.example_id = j.example_id
  GROUP BY ALL
),
total AS (
  SELECT concat(variant, ' / it ', iteration) AS run, var_pop(reward) AS total_variance, count(*) AS outputs
  FROM judge_scores GROUP BY ALL
)
SELECT p.run, count(*) AS users, t.outputs, t.total_variance,
       var_pop(p.user_mean) AS between_user_variance,
       var_pop(p.user_mean) / nullif(t.total_variance, 0) AS between_user_share
FROM per_user p JOIN total t ON t.run = p.run
GROUP BY p.run, t.outputs, t.total_variance
ORDER BY p.run

-- COMMAND ----------

-- Judge score criteria: mean probability the judge puts on each criterion (LLM judge only)
-- chart: bar x=criterion y=mean_probability series=run title="Mean judge probability per score criterion"
WITH c AS (
  SELECT variant, iteration, example_id, sample_index, criterion, exp(logprob) AS p
  FROM judge_scores
  LATERAL VIEW explode(criterion_logprobs) cl AS criterion, logprob
  WHERE criterion_logprobs IS NOT NULL
),
normalized AS (
  SELECT *, p / sum(p) OVER (PARTITION BY variant, iteration, example_id, sample_index) AS share FROM c
)
SELECT concat(variant, ' / it ', iteration) AS run,
       criterion,
       avg(p) AS mean_probability,
       avg(share) AS mean_share_among_criteria,
       count(*) AS judgments
FROM normalized
GROUP BY ALL
ORDER BY try_cast(criterion AS INT), criterion, run

-- COMMAND ----------

-- Sampled outputs per iteration: separator found, finished before the length cap, length
-- chart: bar x=run y=separator_rate title="Share of sampled outputs with the reasoning separator"
SELECT concat(variant, ' / it ', iteration) AS run,
       count(*) AS outputs,
       count(DISTINCT example_id) AS inputs,
       avg(CASE WHEN has_separator THEN 1 ELSE 0 END) AS separator_rate,
       avg(CASE WHEN finished THEN 1 ELSE 0 END) AS finished_rate,
       avg(n_tokens) AS mean_tokens,
       avg(length(reasoning)) AS mean_reasoning_chars,
       avg(length(response)) AS mean_response_chars
FROM trajectories
GROUP BY ALL
ORDER BY run

-- COMMAND ----------

-- Format of the judged outputs per variant and iteration: outputs with a response to judge (format_ok) and
-- counts per format issue (no_separator, empty_reasoning, empty_response, length_cap, forced_separator,
-- double_separator: reward 0, never kept)
-- chart: bar x=run y=outputs series=format title="Judged outputs by format issue"
SELECT variant,
       iteration,
       concat(variant, ' / it ', iteration) AS run,
       reward_kind,
       coalesce(format_issue, 'format_ok') AS format,
       count(*) AS outputs,
       count(*) / sum(count(*)) OVER (PARTITION BY variant, iteration, reward_kind) AS share,
       avg(reward) AS mean_reward
FROM judge_scores
GROUP BY variant, iteration, reward_kind, format_issue
ORDER BY variant, iteration, reward_kind, format

-- COMMAND ----------

-- The sampled outputs of an input side by side with their rewards (the 20 inputs with the widest reward range)
WITH spread AS (
  SELECT variant, iteration, example_id, max(reward) - min(reward) AS reward_range
  FROM judge_scores
  GROUP BY ALL
  ORDER BY reward_range DESC, example_id
  LIMIT 20
)
SELECT s.variant, s.iteration, s.example_id, s.reward_range, j.sample_index, j.reward,
       substr(t.response, 1, 300) AS response, substr(e.target, 1, 300) AS expected
FROM spread s
JOIN judge_scores j ON j.variant = s.variant AND j.iteration = s.iteration AND j.example_id = s.example_id
JOIN trajectories t
  ON t.variant = j.variant AND t.iteration = j.iteration AND t.example_id = j.example_id AND t.sample_index = j.sample_index
JOIN examples e ON e.example_id = s.example_id
ORDER BY s.reward_range DESC, s.example_id, j.reward DESC, j.sample_index

-- COMMAND ----------

-- What the filter kept for the M-step: rows per input and mean loss weight
-- chart: bar x=iteration y=mean_rows_per_input series=variant title="Training rows per input (iteration 0 = SFT data)"
SELECT variant,
       iteration,
       source,
       count(*) AS rows,
       count(DISTINCT example_id) AS inputs,
       count(*) / count(DISTINCT example_id) AS mean_rows_per_input,
       avg(weight) AS mean_weight,
       min(weight) AS min_weight
FROM training_sets
GROUP BY ALL
ORDER BY iteration, variant

-- COMMAND ----------

-- Is the reward fit to train on? Profile shuffle (paper App. A): the reward should fall as more of the profile is shuffled
-- chart: line x=shuffled_percent y=mean_reward series=reward_kind title="Reward against the shuffled share of the profile"
SELECT reward_kind,
       judge_model,
       setting,
       try_cast(regexp_extract(setting, '^([0-9]+)', 1) AS INT) AS shuffled_percent,
       mean_reward,
       n,
       slope,
       fit
FROM reward_validation
WHERE `check` = 'shuffle'
ORDER BY reward_kind, shuffled_percent

-- COMMAND ----------

-- Direct check: reward of the user's own text against the same user's other texts and another user's
-- chart: bar x=setting y=mean_reward series=reward_kind title="Direct reward check"
SELECT reward_kind, judge_model, setting, mean_reward, n, fit
FROM reward_validation
WHERE `check` = 'direct'
ORDER BY reward_kind, setting
