"""Tokens/s of plain `generate(num_return_sequences=m)` vs the shared-prefill sampler, side by side.

Packaged SmolLM2-135M-Instruct, float32, 2 threads, one ~170-token prompt, 48 new tokens, temperature
0.7 / top-p 0.95. Prefills are counted with a forward hook: a forward over more than one position is a
prefill, and its batch size is the number of prompt copies it encodes. Run: `make bench`.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from restpg import generation, models  # noqa: E402
from restpg.config import load_settings  # noqa: E402

NEW_TOKENS = 48
BUDGET_S = 150  # seconds of measuring; m=32 and second rounds only fit when the machine is quiet
PROFILE = ("I bought this kettle for my office. It boils fast, the handle stays cool, and the lid opens "
           "with one hand. The blue light is a bit bright at night. ")


class PrefillCounter:
    """Counts forwards over several positions (prefills) and the prompt rows they encode."""

    def __init__(self, model):
        self.calls = self.rows = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            self.calls += 1
            self.rows += ids.shape[0]

    def take(self) -> tuple[int, int]:
        counts, self.calls, self.rows = (self.calls, self.rows), 0, 0
        return counts


def make_prompt(tokenizer, target_tokens: int = 170) -> str:
    """A chat prompt of about `target_tokens` tokens: past reviews, then the request."""
    frame = "My past reviews: {}\nWrite a long, detailed review of a toaster in my style."
    room = target_tokens - generation.count_tokens(tokenizer, generation.render_chat(tokenizer, frame.format("")))
    reviews = tokenizer.decode(tokenizer(PROFILE * 20, add_special_tokens=False).input_ids[:room])
    return generation.render_chat(tokenizer, frame.format(reviews))


def plain(model, tokenizer, prompt: str, m: int) -> int:
    ids = torch.tensor([generation.encode(tokenizer, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_p=0.95,
                         max_new_tokens=NEW_TOKENS, num_return_sequences=m, pad_token_id=tokenizer.pad_token_id)
    stops = torch.tensor(sorted(generation.eos_ids(model, tokenizer)))
    new = out[:, ids.shape[1]:]
    ended = torch.isin(new, stops).int().cumsum(1) > 0  # everything from the first end-of-sequence on
    return int((~ended).sum())


def shared(model, tokenizer, prompt: str, m: int) -> int:
    seeds = [[generation.sample_seed("bench", j, 0, 0) for j in range(m)]]
    [samples], _ = generation.sample(model, tokenizer, [prompt], seeds, temperature=0.7, top_p=0.95,
                                     max_new_tokens=NEW_TOKENS)
    return sum(s.n_tokens for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is steadier on a shared machine)")
    torch.set_num_threads(parser.parse_args().threads)
    torch.manual_seed(0)
    settings = load_settings("local")
    model, tokenizer = models.load_causal_lm("packaged:smollm2-135m-instruct", settings)
    prompt = make_prompt(tokenizer)
    counter = PrefillCounter(model)
    n_prompt = generation.count_tokens(tokenizer, prompt)
    print(f"SmolLM2-135M float32, {torch.get_num_threads()} thread(s), prompt {n_prompt} tokens, {NEW_TOKENS} new tokens")
    shared(model, tokenizer, prompt, 2)  # warm-up
    counter.take()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work slows both methods alike)")
    print(f"{'m':>3} {'method':<14} {'tokens':>6} {'seconds':>7} {'cpu s':>6} {'tok/s':>6} {'prefills':>8} "
          f"{'prompt rows':>11}")
    started = time.perf_counter()
    for m in (1, 8, 32):
        elapsed = time.perf_counter() - started
        if m == 32 and elapsed > BUDGET_S * 0.4:
            print(f"m=32 skipped: m=1 and m=8 took {elapsed:.0f} s, too long for the time budget (a busy machine?)")
            break
        rounds = 2 if elapsed < BUDGET_S * 0.25 else 1  # alternated rounds, best kept: the load drifts
        best = {"generate": 0.0, "shared-prefill": 0.0}
        for name, run in [("generate", plain), ("shared-prefill", shared)] * rounds:
            t0, cpu0 = time.perf_counter(), time.process_time()
            tokens = run(model, tokenizer, prompt, m)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            calls, rows = counter.take()
            best[name] = max(best[name], tokens / seconds)
            print(f"{m:>3} {name:<14} {tokens:>6} {seconds:>7.2f} {cpu:>6.1f} {tokens / seconds:>6.1f} {calls:>8} "
                  f"{rows:>11}")
        print(f"{m:>3} ratio shared-prefill / generate (best of {rounds} each): "
              f"{best['shared-prefill'] / best['generate']:.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
