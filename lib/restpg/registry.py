"""Which registered policy version belongs to a (variant, iteration): tags set by the training job."""
from __future__ import annotations

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
    name = settings.mlflow.policy_model_name
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # no such registered model yet
        return None
    mine = [v for v in versions if v.tags.get("variant") == variant and str(v.tags.get("iteration")) == str(iteration)]
    if not mine:
        return None
    return model_uri(settings, max(int(v.version) for v in mine))


def sampling_policy(settings: Settings, variant: str, iteration: int) -> str:
    """θᵗ: iteration 1 samples from the SFT model, iteration t > 1 from the model trained on slice t-1."""
    slice_ = (base_variant(variant), 0) if iteration == 1 else (variant, iteration - 1)
    uri = trained_version(settings, *slice_)
    if uri is None:
        raise LookupError(f"no policy trained on training_sets {slice_} yet: run `restpg train --variant {slice_[0]} --iteration {slice_[1]}` first")
    return uri


def final_policy(settings: Settings, variant: str, iterations: int) -> str:
    last = variants.final_iteration(variant, iterations)
    uri = trained_version(settings, variant, last)
    if uri is None:
        raise LookupError(f"no policy trained for {variant} iteration {last}")
    return uri
