"""The Databricks bundle, checked without a workspace: databricks.yml + resources/*.yml are read with
PyYAML, `${var.X}` is replaced by the target's variable values, every job must load as a
`databricks.bundles.jobs.Job`, and every task must be runnable: its entry point exists, its
sub-command parses its parameters, its profile overrides are known settings, and it runs on the
compute it needs, and every task value a task reads is one its upstream stage publishes. No Spark,
no network."""
from __future__ import annotations

import copy
import graphlib
import importlib
import json
import re
from pathlib import Path

import pytest
from restpg.cli import STAGES  # the one table of stages
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / "resources"
JOBS_DIR = ROOT / "jobs"
EM_VARIANTS = ["rest_em", "rest_pg"]
SFT_VARIANTS = ["sft", "sft_reasoning"]
ITERATIONS = (1, 2, 3)
# Entry points that load a model (retriever, teacher, policy, judge) or train one.
# promote generates and judges too: it scores candidate, champion and baselines on the validation split.
GPU_STAGES = {"retrieve", "reason", "validate_reward", "train", "sample", "judge", "evaluate", "promote", "pipeline",
              "user_profiles", "peer_retrieve", "pat_sft", "sparse_eval"}
RETIRED = {"synthesize_reasoning", "build_sft", "filter"}  # old stage names that must not come back
# Bundle substitutions other than variables, with a stand-in value.
OTHER_REFS = {"bundle.name": "restpg", "bundle.target": "dev", "workspace.current_user.userName": "someone@example.com"}
VAR_REF = re.compile(r"\$\{([\w.-]+)\}")
DYNAMIC_REF = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


BUNDLE = _yaml(ROOT / "databricks.yml")


def _variables(target: str) -> dict:
    values = {name: spec.get("default") for name, spec in BUNDLE["variables"].items()}
    values.update(BUNDLE["targets"][target].get("variables") or {})
    return values


def _substitute(value, variables: dict):
    """Replace `${var.X}` (and the few other substitutions used) the way `bundle validate` would; a
    value that is exactly one reference keeps the variable's type (num_workers stays an int)."""
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(ref: str):
        if ref.startswith("var."):
            name = ref[len("var."):]
            assert name in variables, f"${{{ref}}} is not a declared bundle variable"
            return variables[name]
        assert ref in OTHER_REFS, f"unexpected substitution ${{{ref}}}"
        return OTHER_REFS[ref]

    whole = VAR_REF.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    return VAR_REF.sub(lambda m: str(lookup(m.group(1))), value)


def _jobs(target: str = "dev") -> dict[str, dict]:
    variables = _variables(target)
    jobs = {}
    for path in sorted(RESOURCES.glob("*.yml")):
        for name, job in (_yaml(path).get("resources", {}).get("jobs") or {}).items():
            assert name not in jobs, f"job {name} declared twice"
            jobs[name] = _substitute(job, variables)
    return jobs


JOBS = _jobs()


def _all_tasks(job: dict):
    """(task, enclosing for_each task or None) for every task, nested ones included."""
    for task in job.get("tasks", []):
        yield task, None
        if "for_each_task" in task:
            yield task["for_each_task"]["task"], task


def _runnable_tasks():
    return [(name, job, task, parent) for name, job in JOBS.items() for task, parent in _all_tasks(job)
            if "for_each_task" not in task]


def _task_id(entry) -> str:
    return f"{entry[0]}.{entry[2]['task_key']}"


def _entry_point(task: dict) -> Path:
    return (RESOURCES / task["spark_python_task"]["python_file"]).resolve()


def _ancestors(job: dict) -> dict[str, set[str]]:
    parents = {t["task_key"]: {d["task_key"] for d in t.get("depends_on", [])} for t in job["tasks"]}
    ancestors: dict[str, set[str]] = {}
    for key in graphlib.TopologicalSorter(parents).static_order():
        ancestors[key] = set().union(*([parents[key]] + [ancestors[p] for p in parents[key]]))
    return ancestors


def _cluster(job: dict, task: dict) -> dict:
    if "new_cluster" in task:
        return task["new_cluster"]
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job.get("job_clusters", [])}
    assert task.get("job_cluster_key") in clusters, f"{task['task_key']}: no cluster (job_cluster_key or new_cluster)"
    return clusters[task["job_cluster_key"]]


def _published_by(stage: str) -> tuple:
    """Task values the stage module declares it publishes (`PUBLISHES`, the constants its run() passes
    to tracking.publish_task_value; tests/test_evaluate.py checks the declaration against a real run)."""
    return tuple(getattr(importlib.import_module(f"restpg.{stage}"), "PUBLISHES", ()))


def _stage_of(job: dict, task_key: str) -> str:
    """The stage a top-level task runs (its own entry point, or its for_each task's)."""
    [task] = [t for t in job["tasks"] if t["task_key"] == task_key]
    return _entry_point(task["for_each_task"]["task"] if "for_each_task" in task else task).stem


def _task_value_stand_in(stage: str, key: str) -> str:
    """What the stage really publishes under `key`, from its own publishing code where we can run it
    without Spark (evaluate: the version number of the candidate's registered model)."""
    if (stage, key) == ("evaluate", "candidate_version"):
        from restpg import evaluate, tracking

        evaluate.publish_candidate({"sft": "models:/main.restpg.policy/3", "rest_pg": "models:/main.restpg.policy/7"})
        return str(tracking.published[key])
    return "1"


def _resolve_dynamic(job: dict, task: dict, parent: dict | None, arg: str) -> str:
    """Stand-ins for the job's dynamic value references; each must point at something that exists:
    a declared job parameter, or a task value an upstream task's stage publishes."""
    def one(m: re.Match) -> str:
        ref = m.group(1)
        if ref == "input":
            assert parent is not None, f"{task['task_key']}: {{{{input}}}} outside a for_each task"
            return "rest_pg"
        if ref.startswith("job.parameters."):
            params = {p["name"]: p["default"] for p in job.get("parameters", [])}
            name = ref[len("job.parameters."):]
            assert name in params, f"{task['task_key']}: job parameter {name!r} is not declared"
            return str(params[name])
        if ref.startswith("tasks."):
            _, upstream, kind, key = ref.split(".", 3)
            own_key = (parent or task)["task_key"]
            assert kind == "values" and upstream in _ancestors(job)[own_key], \
                f"{own_key}: {ref} must name a task value of an upstream task"
            stage = _stage_of(job, upstream)
            assert key in _published_by(stage), \
                f"{own_key}: reads task value {key!r} of {upstream}, but restpg.{stage} publishes only {_published_by(stage)}"
            return _task_value_stand_in(stage, key)
        raise AssertionError(f"{task['task_key']}: unexpected dynamic value reference {{{{{ref}}}}}")
    return DYNAMIC_REF.sub(one, arg)


def _subcommand(entry_point: Path) -> str:
    m = re.search(r'\bentry\(\s*"([\w-]+)"\s*\)', entry_point.read_text())
    assert m, f"{entry_point.name} must call restpg.cli.entry(\"<stage>\")"
    return m.group(1)


def test_bundle_settings():
    assert BUNDLE["bundle"]["name"] == "restpg"
    assert BUNDLE["include"] == ["resources/*.yml"]
    [artifact] = BUNDLE["artifacts"].values()
    assert artifact["type"] == "whl" and (ROOT / artifact.get("path", ".") / "setup.py").is_file()
    assert "bdist_wheel" in artifact["build"] or "uv build --wheel" in artifact["build"]
    declared = set(BUNDLE["variables"])
    assert {"catalog", "schema", "profile", "policy_model_name", "gpu_node_type", "cpu_node_type", "spark_version",
            "cron", "timezone"} <= declared
    assert all("default" in spec and spec.get("description") for spec in BUNDLE["variables"].values())
    targets = BUNDLE["targets"]
    assert targets["dev"]["mode"] == "development" and targets["dev"]["default"] is True
    assert targets["prod"]["mode"] == "production" and _variables("prod")["catalog"] == "prod"
    for name, target in targets.items():
        assert set(target.get("variables") or {}) <= declared, f"target {name} sets an undeclared variable"


# Databricks ML runtimes the code supports (release notes): Spark and MLflow they ship.
SUPPORTED_RUNTIMES = {"17.3": ("4.0.0", "3.0.1"), "18.0": ("4.1.0", "3.8.1"), "19.0": ("4.2.0", "3.12.0")}


def _runtime(spark_version: str) -> str:
    m = re.fullmatch(r"(\d+\.\d+|\d+)\.x-(gpu|cpu)-ml-scala2\.13", spark_version)
    assert m, f"{spark_version}: not a Scala 2.13 ML runtime (Spark 4 runtimes are Scala 2.13)"
    return m.group(1) if "." in m.group(1) else f"{m.group(1)}.0"


@pytest.mark.parametrize("target", ["dev", "prod"])
def test_bundle_runtime_is_the_one_test_compat_checks(target):
    """Every cluster runs a supported Spark 4 / MLflow 3 ML runtime, and the GPU and CPU clusters the
    same release: the lowest supported one, whose pyspark / delta-spark / mlflow versions
    requirements-compat.txt pins for `make test-compat`."""
    compat = (ROOT / "requirements-compat.txt").read_text()
    lowest = re.search(r"^# runtime: ([\d.]+)$", compat, re.M).group(1)
    assert lowest == min(SUPPORTED_RUNTIMES, key=lambda r: tuple(map(int, r.split("."))))
    pins = dict(re.findall(r"^([\w-]+)==([\w.]+)", compat, re.M))
    spark, mlflow = SUPPORTED_RUNTIMES[lowest]
    assert pins["pyspark"] == spark and pins["mlflow"] == mlflow and pins["delta-spark"].startswith(spark[:4])
    variables = _variables(target)
    assert {_runtime(variables["spark_version"]), _runtime(variables["cpu_spark_version"])} == {lowest}
    assert "gpu-ml" in variables["spark_version"] and "cpu-ml" in variables["cpu_spark_version"]
    versions = set(re.findall(r"'spark_version': '([^']+)'", str(_jobs(target))))
    assert versions and {_runtime(v) for v in versions} == {lowest}


@pytest.mark.parametrize("target", ["dev", "prod"])
def test_jobs_load_as_databricks_bundles_jobs(target):
    from databricks.bundles.jobs import Job

    jobs = _jobs(target)
    assert {"restpg_pipeline", "restpg_promote"} <= set(jobs)
    for name, job_dict in jobs.items():
        job = Job.from_dict(copy.deepcopy(job_dict))  # rejects unknown fields and wrong types
        assert len(job.tasks) == len(job_dict["tasks"]), name


@pytest.mark.parametrize("entry", _runnable_tasks(), ids=_task_id)
def test_task_runs_a_jobs_entry_point_with_the_wheel(entry):
    _, _, task, _ = entry
    path = _entry_point(task)
    assert path.is_file() and path.parent == JOBS_DIR, f"{task['task_key']}: {path} is not a file in jobs/"
    wheels = [lib["whl"] for lib in task.get("libraries", []) if "whl" in lib]
    assert wheels == ["../dist/*.whl"], f"{task['task_key']}: the task must install the project's wheel"


def test_every_entry_point_is_used_by_a_task():
    used = {_entry_point(task) for _, _, task, _ in _runnable_tasks()}
    unused = {p.resolve() for p in JOBS_DIR.glob("*.py")} - used
    assert not unused, f"entry points no task runs: {sorted(p.name for p in unused)}"


@pytest.mark.parametrize("name", sorted(JOBS))
def test_task_graph_is_a_dag_of_existing_tasks(name):
    job = JOBS[name]
    keys = [task["task_key"] for task, _ in _all_tasks(job)]
    assert len(keys) == len(set(keys)), f"{name}: duplicate task keys"
    top = {t["task_key"] for t in job["tasks"]}
    for task in job["tasks"]:
        for dep in task.get("depends_on", []):
            assert dep["task_key"] in top, f"{name}.{task['task_key']} depends on unknown task {dep['task_key']}"
    _ancestors(job)  # raises graphlib.CycleError on a cycle
    clusters = [c["job_cluster_key"] for c in job.get("job_clusters", [])]
    assert len(clusters) == len(set(clusters)), f"{name}: duplicate job cluster keys"
    used = {task.get("job_cluster_key") for task, _ in _all_tasks(job)}
    assert set(clusters) <= used, f"{name}: job clusters no task uses: {sorted(set(clusters) - used)}"


@pytest.mark.parametrize("name", sorted(JOBS))
def test_for_each_tasks(name):
    for task in JOBS[name]["tasks"]:
        if "for_each_task" not in task:
            continue
        loop = task["for_each_task"]
        inputs = json.loads(loop["inputs"])
        assert isinstance(inputs, list) and inputs, f"{task['task_key']}: inputs must be a non-empty JSON list"
        assert isinstance(loop["task"], dict), f"{task['task_key']}: exactly one nested task"
        assert 1 <= loop.get("concurrency", 1) <= len(inputs)
        nested = loop["task"]
        assert "for_each_task" not in nested, f"{task['task_key']}: for_each tasks cannot be nested"
        assert not nested.get("depends_on"), f"{task['task_key']}: the nested task cannot have dependencies"
        assert any("{{input}}" in arg for arg in nested["spark_python_task"]["parameters"]), task["task_key"]


@pytest.mark.parametrize("entry", _runnable_tasks(), ids=_task_id)
def test_task_compute(entry):
    _, job, task, _ = entry
    cluster = _cluster(job, task)
    stage = _entry_point(task).stem
    if stage in GPU_STAGES:
        assert "gpu-ml" in cluster["spark_version"], f"{task['task_key']}: GPU work needs a GPU ML runtime"
        if stage != "train":  # inference runs in pandas UDFs: one GPU per Spark task, model cached per worker
            conf = cluster.get("spark_conf", {})
            assert conf.get("spark.task.resource.gpu.amount") == "1", task["task_key"]
            assert conf.get("spark.python.worker.reuse") == "true", task["task_key"]
        else:
            assert cluster.get("spark_env_vars", {}).get("PJRT_DEVICE") == "CUDA", "torch-xla would train on PJRT CPU"


@pytest.mark.parametrize("workers", [1, 4])
def test_every_training_task_takes_its_process_count_from_the_bundle(workers, tmp_path):
    """`train_workers` reaches every train task as train.num_workers (multi-GPU training is one variable away),
    and every train task keeps its checkpoints on the schema's Volume, not on node-local disk."""
    from restpg.cli import build_parser
    from restpg.config import load_settings

    jobs = {}
    for path in sorted(RESOURCES.glob("*.yml")):
        for name, job in (_yaml(path).get("resources", {}).get("jobs") or {}).items():
            jobs[name] = _substitute(job, {**_variables("dev"), "train_workers": workers})
    trains = [t for job in jobs.values() for t, _ in _all_tasks(job)
              if "spark_python_task" in t and _entry_point(t).stem == "train"]
    assert len(trains) >= 4  # SFT and the three M-steps of the pipeline, and PAT's
    for task in trains:
        argv = ["train"] + [DYNAMIC_REF.sub("sft", a) for a in task["spark_python_task"]["parameters"]]
        args = build_parser().parse_args(argv)
        train = load_settings(args.profile, args.overrides, home=str(tmp_path)).train
        assert train.num_workers == workers, task["task_key"]
        # resume states and selected weights where every training process and the driver can read them
        assert train.checkpoint_root == "/Volumes/main/restpg/checkpoints", task["task_key"]


@pytest.mark.parametrize("entry", _runnable_tasks(), ids=_task_id)
def test_task_parameters_parse_with_the_restpg_cli(entry, tmp_path):
    from restpg.cli import STAGES, build_parser
    from restpg.config import load_settings

    _, job, task, parent = entry
    command = _subcommand(_entry_point(task))
    assert command == _entry_point(task).stem and command in STAGES, \
        f"{task['task_key']}: jobs/{_entry_point(task).name} must run the stage of its own name"
    argv = [command] + [_resolve_dynamic(job, task, parent, str(a)) for a in task["spark_python_task"]["parameters"]]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{task['task_key']}: `restpg {' '.join(argv)}` does not parse (exit {e.code})")
    assert args.profile == "databricks"
    settings = load_settings(args.profile, args.overrides, home=str(tmp_path))  # ConfigError on an unknown key
    assert settings.catalog.catalog == "main" and settings.mlflow.policy_model_name == "main.restpg.policy"


@pytest.mark.parametrize("name", sorted(JOBS))
def test_task_keys_are_stage_names(name):
    """A task key is its stage's name (suffixed _<iteration> for per-iteration stages); a for_each's
    nested task is `<key>_variant`; the retired stage names appear nowhere."""
    for task in JOBS[name]["tasks"]:
        key = task["task_key"]
        runs = task["for_each_task"]["task"] if "for_each_task" in task else task
        stage = _entry_point(runs).stem
        assert stage in STAGES, f"{name}.{key}: runs jobs/{stage}.py, not a stage"
        assert re.fullmatch(rf"{stage}(_\d+)?", key), f"{name}: task {key!r} runs stage {stage!r}: name it after the stage"
        if runs is not task:
            assert runs["task_key"] == f"{key}_variant", f"{name}.{key}: nested task {runs['task_key']!r}"
    keys = {t["task_key"] for t, _ in _all_tasks(JOBS[name])}
    assert not {k for k in keys if re.sub(r"_(\d+|variant)", "", k) in RETIRED}, f"{name}: retired stage names in {sorted(keys)}"
    assert not {p.stem for p in JOBS_DIR.glob("*.py")} & RETIRED, "retired entry points in jobs/"


@pytest.mark.parametrize("name", sorted(JOBS))
def test_declared_job_parameters_are_used(name):
    job = JOBS[name]
    used = {m.group(1)[len("job.parameters."):] for t, _ in _all_tasks(job) if "spark_python_task" in t
            for a in t["spark_python_task"]["parameters"] for m in DYNAMIC_REF.finditer(str(a))
            if m.group(1).startswith("job.parameters.")}
    declared = {p["name"] for p in job.get("parameters", [])}
    assert declared == used, f"{name}: declared {sorted(declared)}, used {sorted(used)}"


def _job_reading(ref: str) -> dict:
    """A two-task job: evaluate, then promote reading `ref`."""
    evaluate = {"task_key": "evaluate", "spark_python_task": {"python_file": "../jobs/evaluate.py", "parameters": []}}
    promote = {"task_key": "promote", "depends_on": [{"task_key": "evaluate"}],
               "spark_python_task": {"python_file": "../jobs/promote.py", "parameters": ["--candidate", ref]}}
    return {"tasks": [evaluate, promote]}


@pytest.mark.parametrize("ref, error", [
    ("{{tasks.evaluate.values.candidate_version}}", None),
    ("{{tasks.evaluate.values.champion_version}}", "publishes only"),   # nothing publishes it
    ("{{tasks.promote.values.candidate_version}}", "upstream"),         # not an upstream task
    ("{{job.parameters.candidate}}", "not declared"),
])
def test_task_value_references_must_be_published(ref, error):
    job = _job_reading(ref)
    if error is None:
        assert _resolve_dynamic(job, job["tasks"][1], None, ref) == "7"  # what evaluate publishes: rest_pg's version
    else:
        with pytest.raises(AssertionError, match=error):
            _resolve_dynamic(job, job["tasks"][1], None, ref)


def test_promote_reads_the_candidate_evaluate_publishes():
    tasks = {t["task_key"]: t for t in JOBS["restpg_pipeline"]["tasks"]}
    params = tasks["promote"]["spark_python_task"]["parameters"]
    assert params[params.index("--candidate") + 1] == "{{tasks.evaluate.values.candidate_version}}"
    assert "candidate_version" in _published_by("evaluate")


def test_pipeline_runs_the_stages_in_order():
    job = JOBS["restpg_pipeline"]
    ancestors = _ancestors(job)
    tasks = {t["task_key"]: t for t in job["tasks"]}
    order = ["ingest", "retrieve", "reason", "sft_data", "train_0", "validate_reward"]
    order += [f"{stage}_{t}" for t in ITERATIONS for stage in ("sample", "judge", "filtering", "train")]
    order += ["evaluate", "promote"]
    assert set(order) == set(tasks), f"tasks: {sorted(tasks)}"
    for before, after in zip(order, order[1:]):
        assert before in ancestors[after], f"{after} must run after {before}"
    assert "train_0" in ancestors["validate_reward"], "the reward is checked on the SFT model's outputs"
    assert "validate_reward" in ancestors["sample_1"], "the reward is validated before it is trained on"
    assert json.loads(tasks["train_0"]["for_each_task"]["inputs"]) == SFT_VARIANTS
    params = tasks["train_0"]["for_each_task"]["task"]["spark_python_task"]["parameters"]
    assert params[params.index("--iteration") + 1] == "0"
    for t in ITERATIONS:
        for stage in ("sample", "judge", "filtering", "train"):
            loop = tasks[f"{stage}_{t}"]["for_each_task"]
            assert json.loads(loop["inputs"]) == EM_VARIANTS
            params = loop["task"]["spark_python_task"]["parameters"]
            assert _entry_point(loop["task"]).stem == stage
            assert params[params.index("--iteration") + 1] == str(t) and params[params.index("--variant") + 1] == "{{input}}"


def test_pat_job_trains_pat_through_the_profiles_iterations_before_the_sweep():
    """sparse_eval compares each variant's final policy (iteration loop.iterations of the bundle's profile):
    the PAT job must train pat that far, and from iteration 2 on, where its prompts refine earlier reasoning."""
    from restpg.config import load_settings

    job = JOBS["restpg_pat"]
    ancestors = _ancestors(job)
    tasks = {t["task_key"]: t for t in job["tasks"]}
    T = load_settings(BUNDLE["variables"]["profile"]["default"]).loop.iterations
    order = ["user_profiles", "peer_retrieve", "pat_sft", "train_0"]
    order += [f"{stage}_{t}" for t in range(1, T + 1) for stage in ("sample", "judge", "filtering", "train")]
    order += ["sparse_eval"]
    assert set(order) == set(tasks), f"tasks: {sorted(tasks)}"
    for before, after in zip(order, order[1:]):
        assert before in ancestors[after], f"{after} must run after {before}"
    for key in order[3:-1]:
        params = tasks[key]["spark_python_task"]["parameters"]
        assert params[params.index("--variant") + 1] == "pat" and params[params.index("--iteration") + 1] == key.split("_")[1]


@pytest.mark.parametrize("target,pause", [("dev", "PAUSED"), ("prod", "UNPAUSED")])
def test_pipeline_schedule(target, pause):
    schedule = _jobs(target)["restpg_pipeline"]["schedule"]
    fields = schedule["quartz_cron_expression"].split()
    assert len(fields) in (6, 7) and "?" in (fields[3], fields[5]), "Quartz: sec min hour day month weekday [year]"
    assert schedule["timezone_id"]
    assert schedule["pause_status"] == pause
