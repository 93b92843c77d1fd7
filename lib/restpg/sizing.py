"""GPU memory arithmetic of a decoder LM from its config's dims: weights, KV cache per token, the inference
batch rows a GPU holds next to the weights, and a training job's state. Pure functions of a config (an HF
config object or its `config.json` as a dict), so `restpg estimate` sizes a role without loading a model.

KV cache: each layer keeps a key and a value vector per KV head and token, 2 x layers x kv heads x head dim
x dtype bytes per token. It counts every layer at the full length: Gemma 2/3's sliding-window layers could
keep less, the sampler's cache does not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# share of a GPU kept free of weights and KV cache: the CUDA context, a prefill's activations, the allocator's slack
RESERVE = 0.1
# per row the sampler and the judge also hold one position's logits in float32
LOGIT_BYTES = 4


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # output layer shares the embedding's weights


def dims(config) -> Dims:
    """The dims of a causal LM's config (object or dict); a multimodal config's text model (Gemma 3 4B)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    text = get("text_config")
    if text is not None:
        return dims(text)
    heads = get("num_attention_heads")
    return Dims(layers=get("num_hidden_layers"), hidden=get("hidden_size"), heads=heads,
                kv_heads=get("num_key_value_heads") or heads, head_dim=get("head_dim") or get("hidden_size") // heads,
                intermediate=get("intermediate_size"), vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", True)))


def matrices(d: Dims) -> list[tuple[int, int]]:
    """Shapes of the weight matrices: embedding, per layer q, k, v, o and a gated MLP's gate, up and down,
    and an untied output layer."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    layer = [(q, d.hidden), (kv, d.hidden), (kv, d.hidden), (d.hidden, q),
             (d.intermediate, d.hidden), (d.intermediate, d.hidden), (d.hidden, d.intermediate)]
    return [(d.vocab, d.hidden)] + layer * d.layers + ([] if d.tied else [(d.vocab, d.hidden)])


def weight_count(config) -> int:
    """Parameters: the matrices plus two norm vectors per layer and the final norm (biases, Gemma 3's extra
    norms, a few thousand values, are left out)."""
    d = dims(config)
    return sum(r * c for r, c in matrices(d)) + (2 * d.layers + 1) * d.hidden


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    d = dims(config)
    return 2 * d.layers * d.kv_heads * d.head_dim * dtype_bytes


def row_bytes(config, tokens_per_row: int, dtype_bytes: int = 2) -> int:
    """One inference row: its KV cache at `tokens_per_row` and one position's float32 logits."""
    return kv_bytes_per_token(config, dtype_bytes) * tokens_per_row + dims(config).vocab * LOGIT_BYTES


def batch_rows(config, gpu_bytes: int, tokens_per_row: int, dtype_bytes: int = 2, reserve: float = RESERVE) -> int:
    """Rows an inference batch holds on a GPU of `gpu_bytes`: what the weights leave of it (less `reserve`),
    divided by a row's KV cache and logits. Raises when not one row fits."""
    free = gpu_bytes * (1 - reserve) - weight_count(config) * dtype_bytes
    rows = math.floor(free / row_bytes(config, tokens_per_row, dtype_bytes)) if free > 0 else 0
    if rows < 1:
        raise ValueError(f"not one row of {tokens_per_row} tokens fits on a GPU of {gpu_bytes / 2**30:.1f} GiB next to "
                         f"{weight_count(config) * dtype_bytes / 2**30:.1f} GiB of weights")
    return rows


def adafactor_bytes(config) -> int:
    """Adafactor's float32 state without momentum: a row and a column vector per matrix, the whole of a vector."""
    d = dims(config)
    return 4 * (sum(r + c for r, c in matrices(d)) + (2 * d.layers + 1) * d.hidden)


def training_bytes(config, optimizer: str, micro_batch: int, seq_tokens: int, window: int,
                   checkpointing: bool = False) -> dict:
    """A full fine-tuning job's GPU memory, by part (bytes): float32 weights and gradients, the optimizer's
    state (AdamW: two float32 moments; Adafactor: factored), the logits of the completion `window` (bf16 under
    autocast, their float32 copy for the loss and its log-softmax kept for backward: 10 bytes a logit), and
    activations kept for backward. Activations are an
    order of magnitude, not a measurement: ~34 bytes x hidden per token and layer in 16 bits with attention
    that never holds the seq x seq scores (Korthikanti et al. 2022), or one bf16 hidden state per token and
    layer with gradient checkpointing (plus one layer recomputed at a time)."""
    d, n = dims(config), weight_count(config)
    tokens = micro_batch * seq_tokens
    per_layer = 34 * d.hidden * tokens
    activations = (2 * d.hidden * tokens * d.layers + per_layer) if checkpointing else per_layer * d.layers
    return {"weights": 4 * n, "gradients": 4 * n,
            "optimizer": 8 * n if optimizer == "adamw" else adafactor_bytes(config),
            "logits": micro_batch * window * d.vocab * (2 + 4 + 4), "activations": activations}


def _gemma(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int) -> dict:
    return {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": 256, "intermediate_size": intermediate, "vocab_size": 256000, "tie_word_embeddings": True}


# the dims of hub models the profiles name (from their config.json): an estimate sizes them with no download
# and no credentials (Gemma's repositories are gated)
KNOWN_CONFIGS = {name: cfg for names, cfg in (
    (("google/gemma-2b", "google/gemma-2b-it"), _gemma(18, 2048, 8, 1, 16384)),
    (("google/gemma-7b", "google/gemma-7b-it"), _gemma(28, 3072, 16, 16, 24576)),
) for name in names}


def config_of(ref: str, settings) -> dict | None:
    """The config.json of a model reference without loading, converting or downloading anything: a known
    hub model's dims, or the file of a local directory, a converted packaged model or a hub snapshot under
    the home; None when none is at hand (an MLflow reference, a packaged model not converted yet)."""
    import json
    from pathlib import Path

    from restpg import models

    if ref in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[ref]
    if ref.startswith("packaged:"):
        where = models.cache_dir(settings) / ref.removeprefix("packaged:")
    elif Path(ref).is_dir():
        where = Path(ref)
    else:
        where = models.shared_dir(settings) / "hub" / ref.replace("/", "--")
    path = where / "config.json"
    return json.loads(path.read_text()) if path.exists() else None
