"""The policy in the MLflow registry: registering a trained checkpoint (a pyfunc tagged with its lineage)
and finding which version belongs to a (variant, iteration) from those tags, read version by version
(`get_model_version`) as Unity Catalog requires."""
from __future__ import annotations

import contextlib
import io
import sys

from restpg.config import Settings

from restpg import variants


def model_uri(settings: Settings, version) -> str:
    """``models:/<policy model name>/<version>``: the one place such a URI is built."""
    return f"models:/{settings.mlflow.policy_model_name}/{version}"


def base_variant(variant: str) -> str:
    """The SFT variant an EM variant starts from (θ¹): ReST-EM from plain SFT, REST-PG from SFT with reasoning."""
    return variants.base_of(variant)


def trained_version(settings: Settings, variant: str, iteration: int) -> str | None:
    """`models:/name/version` of the newest version trained on the (variant, iteration) slice, if any."""
    from mlflow import MlflowClient

    from restpg.runtime import setup_mlflow

    setup_mlflow(settings)
    name, client = settings.mlflow.policy_model_name, MlflowClient()
    for version in sorted(version_numbers(client, name), reverse=True):
        tags = client.get_model_version(name, str(version)).tags
        if tags.get("variant") == variant and str(tags.get("iteration")) == str(iteration):
            return model_uri(settings, version)
    return None


def version_numbers(client, name: str) -> list[int]:
    """Every version number of model `name`, all pages. Only numbers: on Unity Catalog the search results
    carry no tags or aliases (read them with `get_model_version`), and its filter takes the name alone."""
    # an unknown name yields no versions; a registry that cannot be reached is an error, not "none yet"
    query, numbers, token = f"name = '{name.replace(chr(39), chr(39) * 2)}'", [], None
    while True:
        page = client.search_model_versions(query, page_token=token)
        numbers += [int(v.version) for v in page]
        token = page.token
        if not token:
            return numbers


def sampling_policy(settings: Settings, variant: str, iteration: int) -> str:
    """θᵗ: iteration 1 samples from the SFT model, iteration t > 1 from the model trained on slice t-1."""
    slice_ = (base_variant(variant), 0) if iteration == 1 else (variant, iteration - 1)
    uri = trained_version(settings, *slice_)
    if uri is None:
        raise LookupError(f"no policy trained on training_sets {slice_} yet: run `restpg train --variant {slice_[0]} --iteration {slice_[1]}` first")
    return uri


def final_policy(settings: Settings, variant: str, iterations: int) -> str:
    name, last = variants.final_slice(variant, iterations)
    uri = trained_version(settings, name, last)
    if uri is None:
        raise LookupError(f"no policy trained for {name} iteration {last}" + (f" (the final policy of {variant})" if name != variant else ""))
    return uri


def _policy_pyfunc():
    """A pyfunc that writes text from the checkpoint artifact (greedy, `max_new_tokens` param).
    Defined inside a function so cloudpickle stores the class by value: loading the model needs mlflow,
    torch and transformers, not restpg."""
    import mlflow.pyfunc

    class PolicyModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = context.artifacts["checkpoint"]
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path).eval()

        def predict(self, context, model_input, params=None):
            import torch

            prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
            max_new_tokens = int((params or {}).get("max_new_tokens", 64))
            bos = self.tokenizer.bos_token
            texts = []
            for prompt in prompts:
                # as restpg.generation.encode: a rendered chat template may already start with BOS
                ids = self.tokenizer(prompt, return_tensors="pt",
                                     add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
                with torch.no_grad():
                    out = self.model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
                texts.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
            return texts

    return PolicyModel()


def register_checkpoint(settings: Settings, checkpoint, tags: dict) -> tuple[str, str]:
    """Log the HF `checkpoint` directory as a pyfunc model of the active MLflow run and register it as
    a new version of the policy model, tagged with its lineage; returns (models:/ URI, version)."""
    import mlflow
    import torch
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]))
    name = settings.mlflow.policy_model_name
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):  # MLflow prints "Successfully registered…" / "Created version…"
        info = mlflow.pyfunc.log_model(
            name="policy", python_model=_policy_pyfunc(), artifacts={"checkpoint": str(checkpoint)}, signature=signature,
            # explicit requirements: inferring them would load the model once more in a subprocess
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"transformers=={transformers.__version__}", "accelerate", "safetensors"],
            registered_model_name=name)
    sys.stderr.write("".join(line for line in printed.getvalue().splitlines(keepends=True)
                             if not line.startswith(("Successfully registered model", "Registered model",
                                                     "Created version"))))
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return model_uri(settings, version), version
