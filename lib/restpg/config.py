"""Typed settings. A profile YAML fills these dataclasses; ``--set section.key=value`` overrides win.

Every field has a default and a one-line help (``field(metadata={"help": ...})``). Unknown keys and
values of the wrong type are errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


def _f(default, help: str, **meta):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


# An integer field whose metadata says `auto` also takes this word: a value sized from the data at run time
# (restpg.budgets resolves it after ingest, before a stage that reads it runs).
AUTO = "auto"


@dataclass
class SparkConfig:
    master: str = _f("local[*]", "Spark master for the embedded default; ignored on Databricks")
    shuffle_partitions: int = _f(4, "spark.sql.shuffle.partitions (few locally)")
    driver_memory: str = _f("6g", "driver memory for local Spark")
    arrow_batch_rows: int = _f(64, "rows per Arrow batch fed to a pandas UDF (model inference batch)")
    torch_threads: int = _f(0, "torch threads of each Spark task; 0: the cores shared among a local master's task slots")
    log_level: str = _f("ERROR", "Spark log level")
    adaptive: bool = _f(True, "spark.sql.adaptive.enabled for local Spark: adaptive execution re-plans every query, "
                              "which on tables of a few hundred rows costs more than it saves")
    codegen: bool = _f(True, "generated code for local Spark's queries (whole-stage and expression codegen); off, "
                             "expressions are interpreted, no compile per query (the local profiles: their queries are small)")


@dataclass
class CatalogConfig:
    kind: str = _f("path", "'path' (local Delta directories) or 'uc' (Unity Catalog names)")
    catalog: str = _f("main", "Unity Catalog catalog (kind=uc)")
    schema: str = _f("restpg", "database / schema the tables live in")


@dataclass
class MlflowConfig:
    tracking_uri: str = _f("", "tracking URI; empty = sqlite file under the home directory")
    registry_uri: str = _f("", "registry URI; empty = same as tracking")
    experiment: str = _f("restpg", "experiment name (a workspace path on Databricks)")
    policy_model_name: str = _f("restpg-policy", "registered model name of the policy")


@dataclass
class ModelsConfig:
    policy: str = _f("packaged:smollm2-135m-instruct", "base policy checkpoint (packaged:NAME, hub id, path or models:/ URI)")
    teacher: str = _f("packaged:smollm2-135m-instruct", "teacher that writes reasoning paths: a model, or "
                                                   "'extractive' (no model: the slots from measured facts of the items)")
    judge: str = _f("packaged:smollm2-135m-instruct", "LLM judge for the 'llm' reward")
    retriever: str = _f("packaged:all-minilm-l6-v2", "sentence embedding model for retrieval and the embedding reward")
    dtype: str = _f("float32", "inference dtype: float32 | bfloat16 | float16")
    device: str = _f("auto", "inference device: auto | cpu | cuda")
    cache_dir: str = _f("", "converted packaged checkpoints, shared by every home; empty = $RESTPG_MODEL_CACHE or ~/.cache/restpg/models")
    shared_dir: str = _f("", "where the driver puts the models it downloads (registered versions, hub snapshots) for every "
                             "Spark worker to read: a UC Volume on Databricks; empty = <home>/models")


@dataclass
class DataConfig:
    source: str = _f("demo", "'demo' (synthetic users) or a path to LongLaMP files")
    task: str = _f("", "LongLaMP task of the source file (empty for demo data)")
    demo_users: int = _f(8, "number of synthetic users per task")
    demo_seed: int = _f(7, "seed of the synthetic generator")
    demo_profile_items: int = _f(6, "profile items per synthetic user")
    demo_examples_per_user: int = _f(3, "examples per synthetic user (split train/val/test)")
    max_examples: int = _f(0, "cap on training examples per run (0 = all)")
    max_field_chars: int = _f(200_000, "longest input, output or profile text accepted; longer → quarantine")


@dataclass
class RetrieveConfig:
    k: int = _f(5, "profile items retrieved per example")
    batch_size: int = _f(64, "texts embedded per forward pass")


@dataclass
class PromptConfig:
    max_input_tokens: int = _f(5120, "prompt budget; the profile side is truncated first")
    max_item_chars: int = _f(600, "characters kept of one retrieved item in a prompt")
    max_reasoning_tokens: int = _f(512, "reasoning budget of reasoning variants (teacher paths, samples, evaluation, training)")
    max_response_tokens: int | str = _f(1536, "response budget of every variant (samples, evaluation, training targets); "
                                              "'auto': sized from the ingested training targets (response_percentile, max_response_cap)",
                                        auto=True)
    response_percentile: float = _f(95.0, "max_response_tokens: auto holds this percent of the training targets (with "
                                          "end-of-sequence) in the policy's tokens")
    max_response_cap: int = _f(1536, "max_response_tokens: auto never exceeds this (decoding and training cost grow with it)")


@dataclass
class ReasonConfig:
    max_input_tokens: int = _f(6144, "teacher prompt budget, its own: the teacher's instruction, the input and the "
                                     "expected output take room the policy's prompt does not have (profile side cut first)")
    max_target_chars: int = _f(6000, "characters of the expected output a teacher prompt shows (0: all); keep it above "
                                     "the longest target that fits prompt.max_response_tokens")
    temperature: float = _f(0.7, "teacher sampling temperature (its length cap is prompt.max_reasoning_tokens)")
    top_p: float = _f(0.95, "teacher nucleus sampling")
    copy_ngram: int = _f(8, "n of the n-gram overlap used to flag copying of the expected output")
    copy_threshold: float = _f(0.2, "share of the reasoning's n-grams found in y above which it is flagged")
    chunk_examples: int = _f(32, "training inputs per committed chunk (a killed run keeps every finished chunk)")


@dataclass
class SampleConfig:
    m: int = _f(32, "outputs sampled per training input (exploration budget)")
    temperature: float = _f(0.7, "sampling temperature gamma during the E-step")
    top_p: float = _f(0.95, "nucleus sampling top-p")
    chunk_examples: int = _f(64, "examples per committed chunk (resumability granularity)")
    seed: int = _f(0, "base seed; per-sample seeds derive from (example_id, sample_index, iteration)")
    continuous_batching: bool = _f(True, "a finished row's slot goes to the next (prompt, sample) at once, in every sampling "
                                         "(E-step, evaluation, selection); same outputs either way (per-sample seeds)")


@dataclass
class JudgeConfig:
    reward: str = _f("llm", "'llm' (the paper's judge, criterion argmax / 10) or 'embedding' (cosine)")
    scores: list = _f([1, 3, 5, 7, 10], "criterion scores of the judge prompt")
    style_weight: float = _f(0.0, "composite reward: weight of style fidelity (response vs expected output, stylometric); 0 = off")
    topic_weight: float = _f(0.0, "composite reward: weight of topic relevance (response vs request, retriever cosine); 0 = off")
    max_input_tokens: int = _f(4096, "judge prompt budget")
    chunk_examples: int = _f(64, "examples (all their samples) per committed chunk (a killed run keeps every finished chunk)")


@dataclass
class FilterConfig:
    tau: float = _f(1.0, "keep outputs with reward >= tau (paper: 1.0 on the judge scale)")
    max_kept_per_input: int = _f(10, "cap of kept outputs per input")


@dataclass
class TrainConfig:
    device: str = _f("xla", "xla (torch-xla: PJRT CPU locally, TPU/GPU on a cluster) | cuda | cpu")
    optimizer: str = _f("adafactor", "adafactor | adamw")
    lr: float = _f(5e-6, "peak learning rate")
    lr_final_ratio: float = _f(0.1, "linear decay to this fraction of the peak")
    warmup_steps: int = _f(250, "linear warm-up steps")
    weight_decay: float = _f(0.01, "weight decay")
    grad_clip: float = _f(1.0, "gradient norm clip")
    batch_size: int = _f(64, "examples per optimizer step")
    micro_batch_size: int = _f(4, "examples per forward pass (gradient accumulation)")
    micro_batch_tokens: int = _f(0, "padded tokens per forward pass at most (0 = no limit): a step's rows, longest first, "
                                    "are cut into micro-batches of at most micro_batch_size rows and this many tokens "
                                    "(a longer row alone), so long rows cannot raise the activations' peak. Not on XLA")
    steps: int = _f(10000, "optimizer steps of every training job (SFT and each M-step alike; a small set repeats)")
    length_buckets: list = _f([128, 256, 512, 1024, 2048, 4096, 6656, 7296], "padded lengths (few XLA graphs)")
    eval_every: int = _f(1000, "score the checkpoint on the selection sample every N steps (and at the end)")
    selection_examples: int = _f(1024, "validation-split inputs whose output reward selects the checkpoint (paper: 1,024)")
    checkpoint_every: int = _f(500, "save model + optimizer + step every N steps, so a killed job resumes (0 = never)")
    restart_from: str = _f("base", "M-step init: 'base' (paper) or 'previous' checkpoint")
    lora_rank: int = _f(0, "LoRA rank (0 = full fine-tuning)")
    best_state_on_disk: bool = _f(False, "keep the selected step's weights in a temporary file while training goes on, "
                                         "not as a copy in memory (the driver's peak when jobs run in it)")
    gradient_checkpointing: bool = _f(False, "recompute each layer's activations in backward instead of keeping them: "
                                             "less GPU memory for long rows, about a third more compute")
    num_workers: int = _f(1, "training processes; > 1 runs the job under Spark's TorchDistributor (gloo on CPUs, NCCL on GPUs, one per GPU)")
    checkpoint_root: str = _f("", "where training jobs keep resume states and checkpoints; empty = <home>/checkpoints. "
                                  "On Databricks a Volume every training process and the driver can read")
    seed: int = _f(0, "training seed")
    log_every: int = _f(10, "log metrics to MLflow every N steps")


@dataclass
class LoopConfig:
    iterations: int = _f(3, "EM iterations T")
    variants: list = _f(["sft", "sft_reasoning", "rest_em", "rest_pg"], "systems produced by 'restpg run'")
    pat_refine: bool = _f(True, "PAT's iterative refinement: from EM iteration 2 its prompts carry the previous iteration's "
                                "merged reasoning for the same input; evaluation then answers in two passes")


@dataclass
class ValidateConfig:
    split: str = _f("val", "split the reward is validated on")
    examples: int = _f(64, "examples of that split used by the checks")
    allow_unfit_reward: bool = _f(False, "go on (with a warning) when the reward fails validation")


@dataclass
class EvaluateConfig:
    temperature: float = _f(0.1, "decoding temperature at evaluation")
    top_p: float = _f(0.95, "nucleus top-p at evaluation")
    split: str = _f("test", "split evaluated")
    max_examples: int = _f(0, "cap on the examples evaluated per split, lowest example ids first, as data.max_examples (0 = all)")
    alpha: float = _f(0.05, "significance level of the paired t-test")
    chunk_examples: int = _f(64, "answers (system x example) per committed chunk of predictions and of scores, all systems of a chunk in one Spark job and one MERGE (a killed run keeps every finished chunk)")


@dataclass
class PromoteConfig:
    split: str = _f("val", "split the candidate and champion are compared on")
    alpha: float = _f(0.05, "candidate becomes champion only when better with p < alpha")
    dry_run: bool = _f(False, "report the decision without moving aliases")


@dataclass
class Settings:
    profile: str = _f("local", "profile name")
    home: str = _f("", "local state directory (tables, MLflow, caches); empty = $RESTPG_HOME or ./.restpg")
    spark: SparkConfig = field(default_factory=SparkConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    reason: ReasonConfig = field(default_factory=ReasonConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    @property
    def home_dir(self) -> Path:
        return Path(self.home or os.environ.get("RESTPG_HOME") or ".restpg").absolute()


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        hint = " (only prompt.max_response_tokens takes 'auto')" if value == AUTO else ""
        raise ConfigError(f"{where}: expected an integer, got {value!r}{hint}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or 'profile'}: {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: _value(fields[k], v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _value(f: dataclasses.Field, value: Any, tp: Any, where: str) -> Any:
    """A field's value; an `auto` field (an integer or the word auto) takes exactly that word besides integers."""
    if not f.metadata.get("auto"):
        return _coerce(value, tp, where)
    if value == AUTO:
        return AUTO
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: expected an integer or {AUTO!r} (sized from the training targets), got {value!r}")


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def _apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key} is not a section")
    node[keys[-1]] = _parse_scalar(raw)


def profile_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    bundled = resources.files("restpg") / "profiles" / f"{name}.yaml"
    if not bundled.is_file():
        raise ConfigError(f"no profile named {name!r} (bundled: local, local-gemma, paper-smoke, databricks) and no such file")
    return Path(str(bundled))


def load_settings(profile: str = "local", overrides: list[str] | tuple = (), home: str | None = None) -> Settings:
    """Profile YAML → Settings, then ``section.key=value`` overrides, then the home directory."""
    data = yaml.safe_load(profile_path(profile).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profile {profile!r} must be a mapping")
    data.setdefault("profile", Path(profile).stem)
    for assignment in overrides:
        _apply_override(data, assignment)
    if home:
        data["home"] = home
    settings = _build(Settings, data)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    """Values whose type is right but whose meaning is not."""
    from restpg import variants

    try:
        variants.check(s.loop.variants)
    except ValueError as e:
        raise ConfigError(f"loop.variants: {e}") from None
    choices = {"train.restart_from": (s.train.restart_from, ("base", "previous")),
               "judge.reward": (s.judge.reward, ("llm", "embedding")),
               "catalog.kind": (s.catalog.kind, ("path", "uc"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    for key in ("prompt.max_reasoning_tokens", "prompt.max_response_tokens", "train.steps", "train.num_workers", "sample.m"):
        section, name = key.split(".")
        value = getattr(getattr(s, section), name)
        if value != AUTO and value < 1:
            raise ConfigError(f"{key} must be at least 1")
    if not 0 < s.prompt.response_percentile <= 100:
        raise ConfigError(f"prompt.response_percentile must be in (0, 100], got {s.prompt.response_percentile}")
    if s.prompt.max_response_cap < 2:  # one target token and the end-of-sequence token
        raise ConfigError("prompt.max_response_cap must be at least 2")
    for key in ("judge.style_weight", "judge.topic_weight"):
        if getattr(s.judge, key.split(".")[1]) < 0:
            raise ConfigError(f"{key} must be at least 0")


def describe(cls=Settings, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field: the reference for profile authors."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            rows += describe(typing.get_type_hints(cls)[f.name], key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
