"""Promotion: the stage that decides whether a candidate policy version becomes `champion`, and acts.

It owns every part of the decision (mlops-stacks style: validation decides, this step acts):
- the candidate: a version number, ``final:<variant>``, or by default the final policy of the run's
  candidate variant (`evaluate.candidate_variant`: rest_pg, else the last EM variant);
- the opponents: the current `champion` alias and the run's baselines, the final policies of the
  other variants of settings.loop.variants that exist in the registry (sft, sft_reasoning, rest_em);
- the evidence: every one of them is scored on settings.promote.split by evaluate's predict + score
  under the ablation tag ``promotion`` (variant column ``<variant>:v<version>``); scores already in
  eval_scores for the same model version, split and ablation are reused, never recomputed.
`decide` is a pure function of those per-example scores (see its docstring for the rules). With
dry_run nothing moves and no tag is set; every decision is recorded in the `promotions` table.
"""
from __future__ import annotations

import datetime as dt

from restpg import catalog, evaluate, metrics, registry, runtime
from restpg.config import Settings
from restpg.tracking import say

CHAMPION, CHALLENGER, REJECTED = "champion", "challenger", "rejected"
ABLATION = "promotion"
TAGGED = ("decision", "reason", "p_value", "candidate_score", "champion_score", "champion_version",
          "baseline_variant", "baseline_score", "baseline_p_value")


def macro_judge_score(scores) -> float | None:
    """Mean of per-task mean judge scores (None without rows)."""
    if scores is None or len(scores) == 0:
        return None
    return float(scores.groupby("task")["judge_score"].mean().mean())


def compare(a, b) -> dict:
    """a against b on the examples both were scored on: macro judge scores of each on those examples,
    the paired two-tailed t-test p of the per-example scores, and the number of pairs."""
    paired = a[["example_id", "task", "judge_score"]].merge(b[["example_id", "judge_score"]], on="example_id",
                                                            suffixes=("", "_b"))
    b_side = paired[["task", "judge_score_b"]].rename(columns={"judge_score_b": "judge_score"})
    _, p = metrics.paired_ttest(paired["judge_score"], paired["judge_score_b"]) if len(paired) else (None, None)
    return {"score_a": macro_judge_score(paired), "score_b": macro_judge_score(b_side), "p_value": p, "n": int(len(paired))}


def _p(p) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def baseline_gate(candidate, baselines: dict) -> dict:
    """Is the candidate at least as good as every baseline? See `decide`."""
    if not baselines:
        return {"passed": True, "baseline_variant": None, "baseline_score": None, "baseline_p_value": None,
                "baseline_n_paired": 0, "reason": "no baseline in the registry to compare with"}
    comps = {v: compare(candidate, b) for v, b in baselines.items()}
    thin = [v for v, c in comps.items() if c["n"] < 2]
    if thin:
        v = thin[0]
        return {"passed": False, "baseline_variant": v, "baseline_score": comps[v]["score_b"], "baseline_p_value": None,
                "baseline_n_paired": comps[v]["n"],
                "reason": f"{comps[v]['n']} examples paired with baseline {v}: no evidence it is at least as good"}
    below = [v for v, c in comps.items() if c["score_a"] < c["score_b"] - 1e-12]
    v = max(below or comps, key=lambda k: comps[k]["score_b"])  # the best baseline (it lost to, if any)
    c = comps[v]
    evidence = f"{c['score_a']:.4f} vs {c['score_b']:.4f}, paired t-test p={_p(c['p_value'])}, n={c['n']}"
    reason = (f"below baseline {v} ({evidence})" if below else f"at least as good as the best baseline {v} ({evidence})")
    return {"passed": not below, "baseline_variant": v, "baseline_score": c["score_b"], "baseline_p_value": c["p_value"],
            "baseline_n_paired": c["n"], "reason": reason}


def decide(candidate, champion, baselines: dict, alpha: float) -> dict:
    """The promotion decision, a pure function of per-example score frames [example_id, task, judge_score].

    `champion` is None when there is no champion yet; `baselines` maps a baseline variant to its frame.
    Every comparison pairs the two systems on the examples both were scored on (same inputs) and uses
    the macro judge score (mean of task means) of each on those examples.
    1. Baseline gate — never crown a loser. The candidate must not score lower than ANY baseline, hence
       not lower than the best one; otherwise it is `rejected` (no alias). A shortfall blocks whether
       or not the paired two-tailed t-test calls it significant: a paired test can show that a system
       is worse, never that it is at least as good, so an insignificant shortfall is not evidence of
       parity. Its p is recorded so a reader sees whether the gap is noise. Fewer than 2 paired
       examples with a baseline is no evidence: rejected. No baseline at all passes the gate.
    2. Champion. Past the gate, the candidate becomes `champion` when there is none yet, or when its
       macro judge score is higher than the champion's with a paired t-test p < alpha; otherwise it
       becomes `challenger`.
    """
    gate = baseline_gate(candidate, baselines)
    result = {"candidate_score": macro_judge_score(candidate), "champion_score": None, "p_value": None, "n_paired": 0,
              **{k: gate[k] for k in ("baseline_variant", "baseline_score", "baseline_p_value", "baseline_n_paired")}}
    if champion is not None:  # compared even when the gate fails, for the record
        c = compare(candidate, champion)
        result.update(candidate_score=c["score_a"], champion_score=c["score_b"], p_value=c["p_value"], n_paired=c["n"])
    if not gate["passed"]:
        return {**result, "decision": REJECTED, "reason": gate["reason"]}
    if champion is None:
        return {**result, "decision": CHAMPION, "reason": f"no champion yet; {gate['reason']}"}
    cand, champ, p, n = result["candidate_score"], result["champion_score"], result["p_value"], result["n_paired"]
    if n < 2:
        decision, reason = CHALLENGER, f"{n} examples paired with the champion: no evidence"
    elif cand > champ and p < alpha:
        decision, reason = CHAMPION, f"better than the champion, p={_p(p)} < {alpha}"
    elif cand > champ:
        decision, reason = CHALLENGER, f"better than the champion but not significantly (p={_p(p)}, alpha {alpha})"
    else:
        decision, reason = CHALLENGER, "not better than the champion"
    return {**result, "decision": decision, "reason": f"{reason}; {gate['reason']}"}


def resolve_candidate(settings: Settings, candidate: str | None) -> str:
    """Version number of the candidate: a number as given, ``final:<variant>`` or (None / '') the final
    policy of the run's candidate variant."""
    candidate = (candidate or "").strip()
    if candidate.isdigit():
        return candidate
    if candidate.startswith("final:") or not candidate:
        variant = candidate.split(":", 1)[1] if candidate else evaluate.candidate_variant(settings.loop.variants)
        return evaluate.registry_version(registry.final_policy(settings, variant, settings.loop.iterations))
    version = evaluate.registry_version(candidate)
    if version is None:
        raise ValueError(f"candidate {candidate!r}: give a model version number, final:<variant> or nothing")
    return version


def variant_of(client, name: str, version: str) -> str:
    """The variant a version was trained for (its `variant` tag): it fixes the prompt and output format."""
    variant = client.get_model_version(name, version).tags.get("variant")
    if not variant:
        raise LookupError(f"{name} version {version} has no 'variant' tag: cannot tell how to prompt it")
    return variant


def baseline_versions(settings: Settings, candidate_variant: str) -> dict[str, str]:
    """Final policy version of every other variant of the run that exists in the registry."""
    found = {}
    for v in settings.loop.variants:
        if v == candidate_variant:
            continue
        try:
            found[v] = evaluate.registry_version(registry.final_policy(settings, v, settings.loop.iterations))
        except LookupError:
            pass
    return found


def stored_scores(spark, settings: Settings):
    """Every stored validation score of the promotion (ablation 'promotion' on settings.promote.split):
    [model_version, example_id, task, judge_score]."""
    import pandas as pd

    if not catalog.exists(spark, settings, "eval_scores"):
        return pd.DataFrame(columns=["model_version", "example_id", "task", "judge_score"])
    return (catalog.read_slice(spark, settings, "eval_scores", {"ablation": ABLATION, "split": settings.promote.split})
            .select("model_version", "example_id", "task", "judge_score").toPandas())


def validation_scores(spark, settings: Settings, policies: dict[str, str], run_id: str) -> dict:
    """Per-example [example_id, task, judge_score] of each version (version → variant) on the promotion
    split: the stored rows when eval_scores has any for that model version, else predicted and scored now
    (eval_predictions / eval_scores slice ``<variant>:v<version>`` of ablation 'promotion')."""
    stored = stored_scores(spark, settings)
    missing = {v: variant for v, variant in policies.items()
               if registry.model_uri(settings, v) not in set(stored["model_version"])}
    systems = {f"{variant}:v{version}": registry.model_uri(settings, version) for version, variant in missing.items()}
    for label, uri in systems.items():
        say(f"promote: scoring {uri} ({label.split(':')[0]}) on {settings.promote.split}")
    if systems:
        evaluate.predict(spark, settings, systems, settings.promote.split, ABLATION, run_id)
        evaluate.score(spark, settings, list(systems), settings.promote.split, ABLATION, run_id)
        stored = stored_scores(spark, settings)
    return {v: (stored[stored["model_version"] == registry.model_uri(settings, v)]
                .groupby(["example_id", "task"], as_index=False)["judge_score"].mean())
            for v in policies}


def _tag(value) -> str:
    return "" if value is None else str(value)


def run(spark, settings: Settings, *, run_id: str, candidate: str | None = None, dry_run: bool | None = None) -> dict:
    """Choose the candidate, score it, the champion and the baselines on settings.promote.split,
    `decide`, move aliases (unless dry run), tag the version, record the row in `promotions`."""
    from mlflow import MlflowClient

    runtime.setup_mlflow(settings)
    dry_run = settings.promote.dry_run if dry_run is None else dry_run
    name, client = settings.mlflow.policy_model_name, MlflowClient()
    version = resolve_candidate(settings, candidate)
    candidate_variant = variant_of(client, name, version)
    aliases = client.get_registered_model(name).aliases
    champion_version = str(aliases[CHAMPION]) if CHAMPION in aliases else None
    baselines = {v: b for v, b in baseline_versions(settings, candidate_variant).items() if b != version}

    if champion_version == version:
        result = {"decision": CHAMPION, "reason": "already champion", "candidate_score": None, "champion_score": None,
                  "p_value": None, "n_paired": 0, "baseline_variant": None, "baseline_score": None,
                  "baseline_p_value": None, "baseline_n_paired": 0}
    else:
        policies = {version: candidate_variant, **{v: b for b, v in baselines.items()}}
        if champion_version:
            policies[champion_version] = variant_of(client, name, champion_version)
        scores = validation_scores(spark, settings, policies, run_id)
        result = decide(scores[version], scores[champion_version] if champion_version else None,
                        {b: scores[v] for b, v in baselines.items()}, settings.promote.alpha)
    result.update(model_name=name, candidate_version=version, candidate_variant=candidate_variant,
                  champion_version=champion_version, baseline_version=baselines.get(result["baseline_variant"]),
                  split=settings.promote.split, dry_run=dry_run, moved=[])

    if not dry_run:
        if result["decision"] == CHAMPION and champion_version != version:
            client.set_registered_model_alias(name, CHAMPION, version)
            result["moved"].append(CHAMPION)
            if str(client.get_registered_model(name).aliases.get(CHALLENGER)) == version:
                client.delete_registered_model_alias(name, CHALLENGER)
        elif result["decision"] == CHALLENGER:
            client.set_registered_model_alias(name, CHALLENGER, version)
            result["moved"].append(CHALLENGER)
        for key in TAGGED:
            client.set_model_version_tag(name, version, f"promotion_{key}", _tag(result[key]))

    row = {**{k: result[k] for k in ("model_name", "candidate_version", "candidate_variant", "champion_version",
                                     "decision", "reason", "split", "candidate_score", "champion_score", "p_value",
                                     "n_paired", "baseline_variant", "baseline_version", "baseline_score",
                                     "baseline_p_value", "dry_run")},
           "run_id": run_id, "created_at": dt.datetime.now()}
    struct = catalog.spec("promotions").struct()
    df = spark.createDataFrame([tuple(row[f.name] for f in struct.fields)], schema=struct)
    catalog.merge(spark, settings, df, "promotions", run_id, update=True)
    say(f"promote {name} v{version} ({candidate_variant}): {result['decision']} — {result['reason']}")
    return result
