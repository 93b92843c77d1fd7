"""The systems a run produces, named once: what each starts from, whether it reasons, whether it is EM.

Paper, Table 1: SFT (no reasoning), SFT with reasoning (teacher reasoning → response), ReST-EM
(the EM loop on the plain SFT model) and REST-PG (the EM loop on the reasoning SFT model); PAT (issue 11)
reasons over peers' style and topic cues, from its own teacher-reasoning SFT start (iteration 0 of
itself, written by `restpg pat_sft`). A new variant is one line here plus whatever its stages need;
every module asks this one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    base: str             # the iteration-0 variant it starts from (itself for SFT variants)
    uses_reasoning: bool  # output = reasoning + separator + response
    is_em: bool           # trained by sample → judge → filter → train for T iterations
    uses_peers: bool = False  # its prompt carries peer_retrievals' style and topic cues (PAT)


VARIANTS = {v.name: v for v in (
    Variant("sft", "sft", uses_reasoning=False, is_em=False),
    Variant("sft_reasoning", "sft_reasoning", uses_reasoning=True, is_em=False),
    Variant("rest_em", "sft", uses_reasoning=False, is_em=True),
    Variant("rest_pg", "sft_reasoning", uses_reasoning=True, is_em=True),
    Variant("pat", "pat", uses_reasoning=True, is_em=True, uses_peers=True),
)}
NAMES = tuple(VARIANTS)
SFT_NAMES = tuple(n for n, v in VARIANTS.items() if not v.is_em)
EM_NAMES = tuple(n for n, v in VARIANTS.items() if v.is_em)


def get(name: str) -> Variant:
    """The variant of `name`; ablation tags after a colon (``rest_pg:m=8``) keep their variant's nature."""
    key = name.split(":")[0]
    if key not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: {' | '.join(NAMES)}")
    return VARIANTS[key]


def check(names) -> list[str]:
    """Validated list of variant names (ablation-tagged names allowed)."""
    names = list(names)
    for n in names:
        get(n)
    return names


def uses_reasoning(name: str) -> bool:
    return get(name).uses_reasoning


def uses_peers(name: str) -> bool:
    return get(name).uses_peers


def is_em(name: str) -> bool:
    return get(name).is_em


def base_of(name: str) -> str:
    """The SFT variant an EM variant starts from (θ¹); an SFT variant is its own base."""
    return get(name).base


def final_slice(name: str, iterations: int) -> tuple[str, int]:
    """(variant, iteration) of the training slice whose model is the variant's final policy: (name, T) for an
    EM variant after T ≥ 1 iterations; else its start, (base, 0) (an EM loop of 0 iterations is its SFT start)."""
    return (name, iterations) if is_em(name) and iterations > 0 else (base_of(name), 0)
