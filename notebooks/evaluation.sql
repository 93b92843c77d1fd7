-- Databricks notebook source
-- MAGIC %md
-- MAGIC # Evaluation: Table 1 and significance
-- MAGIC Per-task means and the macro average (mean of the task means) from `eval_summary`, paired
-- MAGIC two-tailed t-tests between systems from `eval_tests`, per-example scores from
-- MAGIC `eval_scores`, and the promotion decisions in `promotions`. `ablation = ''` is the
-- MAGIC main table; other values are ablation settings.

-- COMMAND ----------

-- Parameters: the catalog and schema the tables live in (Databricks widgets; locally
-- `restpg notebook run FILE --catalog spark_catalog --schema restpg`, the defaults of the local profile)
CREATE WIDGET TEXT catalog DEFAULT 'main';
CREATE WIDGET TEXT schema DEFAULT 'restpg';
USE CATALOG IDENTIFIER(:catalog);
USE SCHEMA IDENTIFIER(:schema)

-- COMMAND ----------

-- Table 1: mean per task and macro average, one row per variant and metric
SELECT *
FROM (
  SELECT ablation, split, metric, variant, task, round(mean, 4) AS mean
  FROM eval_summary
)
PIVOT (
  first(mean) FOR task IN (
    'abstract_generation' AS abstract_generation,
    'email_completion' AS email_completion,
    'product_review' AS product_review,
    'topic_writing' AS topic_writing,
    'macro' AS macro
  )
)
ORDER BY ablation, split, metric,
         CASE variant WHEN 'sft' THEN 1 WHEN 'sft_reasoning' THEN 2 WHEN 'rest_em' THEN 3 WHEN 'rest_pg' THEN 4 ELSE 5 END,
         variant

-- COMMAND ----------

-- Judge score per task and variant (main table)
-- chart: bar x=task y=mean series=variant title="Judge score per task (macro = mean of task means)"
SELECT task, variant, mean, n
FROM eval_summary
WHERE metric = 'judge_score' AND ablation = ''
ORDER BY CASE WHEN task = 'macro' THEN 1 ELSE 0 END, task, variant

-- COMMAND ----------

-- Paired two-tailed t-tests between systems, REST-PG against the baselines first
SELECT ablation, split, metric, task, variant_a, variant_b,
       round(mean_a, 4) AS mean_a,
       round(mean_b, 4) AS mean_b,
       round(relative_gain * 100, 2) AS relative_gain_pct,
       t_stat, p_value, significant, n
FROM eval_tests
ORDER BY ablation, split, metric,
         CASE WHEN variant_a = 'rest_pg' THEN 0 ELSE 1 END, variant_a, variant_b,
         CASE WHEN task = 'all' THEN 1 ELSE 0 END, task

-- COMMAND ----------

-- Relative gain of REST-PG in judge score over each baseline, per task
-- chart: bar x=task y=relative_gain_pct series=variant_b title="REST-PG relative gain in judge score (%)"
SELECT task, variant_b, round(relative_gain * 100, 2) AS relative_gain_pct, p_value, significant, n
FROM eval_tests
WHERE variant_a = 'rest_pg' AND metric = 'judge_score' AND ablation = ''
ORDER BY CASE WHEN task = 'all' THEN 1 ELSE 0 END, task, variant_b

-- COMMAND ----------

-- Distribution of per-example judge scores per variant (main table)
-- chart: bar x=score_bucket y=examples series=variant title="Per-example judge scores"
SELECT variant, round(floor(judge_score * 10) / 10, 1) AS score_bucket, count(*) AS examples
FROM eval_scores
WHERE ablation = ''
GROUP BY ALL
ORDER BY score_bucket, variant

-- COMMAND ----------

-- Output format per variant and task: how often the output follows its variant's format (reasoning,
-- separator, response, stopped before the cap); a failed output is scored as an empty response
SELECT variant, task, count(*) AS outputs,
       round(avg(CASE WHEN format_ok THEN 1 ELSE 0 END), 4) AS format_ok_rate,
       sum(CASE WHEN format_issue = 'no_separator' THEN 1 ELSE 0 END) AS no_separator,
       sum(CASE WHEN format_issue = 'empty_reasoning' THEN 1 ELSE 0 END) AS empty_reasoning,
       sum(CASE WHEN format_issue = 'empty_response' THEN 1 ELSE 0 END) AS empty_response,
       sum(CASE WHEN format_issue = 'length_cap' THEN 1 ELSE 0 END) AS length_cap,
       sum(CASE WHEN format_issue = 'forced_separator' THEN 1 ELSE 0 END) AS forced_separator,
       sum(CASE WHEN format_issue = 'double_separator' THEN 1 ELSE 0 END) AS double_separator,
       round(avg(n_tokens), 1) AS mean_generated_tokens,
       round(avg(CASE WHEN format_ok AND reasoning IS NOT NULL THEN size(filter(split(reasoning, '\\s+'), w -> w != '')) END), 1) AS mean_reasoning_words,
       round(avg(CASE WHEN format_ok THEN size(filter(split(response, '\\s+'), w -> w != '')) END), 1) AS mean_response_words
FROM eval_predictions
WHERE ablation = ''
GROUP BY ALL
ORDER BY variant, task

-- COMMAND ----------

-- Ablations: macro judge score per ablation setting
-- chart: bar x=ablation y=macro_judge_score series=variant title="Macro judge score per ablation"
SELECT CASE WHEN ablation = '' THEN '(main)' ELSE ablation END AS ablation, variant, split,
       mean AS macro_judge_score, n
FROM eval_summary
WHERE task = 'macro' AND metric = 'judge_score'
ORDER BY ablation, variant

-- COMMAND ----------

-- PAT on sparse profiles (`restpg sparse_eval`): macro judge score against the size of the target user's own
-- profile, per variant. PAT's claim holds only where `pat` beats both `pat:random_peers` (the same policy with
-- random peers) and `rest_pg` at sizes 0-1; the paired t-tests are in eval_tests under the same ablation.
-- chart: line x=profile_size y=macro_judge_score series=variant title="Judge score vs the user's own profile size"
SELECT regexp_extract(ablation, '^profile_size=(.+)$', 1) AS profile_size, variant, mean AS macro_judge_score, n
FROM eval_summary
WHERE ablation LIKE 'profile_size=%' AND task = 'macro' AND metric = 'judge_score'
ORDER BY CASE WHEN ablation = 'profile_size=all' THEN 1 ELSE 0 END,
         try_cast(regexp_extract(ablation, '^profile_size=(.+)$', 1) AS INT), variant

-- COMMAND ----------

-- Promotion decisions, newest first: the candidate against the champion and the run's best baseline
-- on the validation split (rejected = below a baseline, no alias moved)
SELECT created_at, model_name, candidate_version, candidate_variant, champion_version, decision, split,
       round(candidate_score, 4) AS candidate_score, round(champion_score, 4) AS champion_score, p_value, n_paired,
       baseline_variant, baseline_version, round(baseline_score, 4) AS baseline_score, baseline_p_value,
       reason, dry_run, run_id
FROM promotions
ORDER BY created_at DESC
