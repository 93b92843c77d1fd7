"""Training: features (one tokenization with inference), the reward-weighted loss, the schedule, the
loop (equal step budgets, checkpoint selection by reward, resume, eager and XLA), and the stage
`train.run` on hand-built Delta rows with a tiny random Llama and a real local MLflow registry."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

# The XLA device must exist before autograd's first backward in this process sizes the engine's
# per-device queues (else an INTERNAL ASSERT in engine.cpp); starting it at collection guarantees that.
os.environ.setdefault("PJRT_DEVICE", "CPU")
import torch_xla  # noqa: E402

torch_xla.device()

from helpers import example_row, make_settings, write_rows  # noqa: E402

from restpg import generation, prompts, train  # noqa: E402
from restpg.config import TrainConfig  # noqa: E402
from restpg.training import checkpoints, data, objective, selection, trainer  # noqa: E402

WORDS = ("user writes about food films books travel music and likes hates loves the plot taste price "
         "story cast sound view good bad great slow fast warm cold long short review of a this very").split()
TOPICS = ["food", "films", "books", "travel", "music"]
STYLES = ["loves the taste very good", "hates the slow plot", "likes a long story great cast",
          "loves the warm view", "hates bad sound very short"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + [str(d) for d in range(10)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def example(i: int) -> tuple[str, str]:
    """A learnable mapping: the user's digit picks the topic, the style follows the user."""
    user = i % 5
    return f"user {user} writes about {TOPICS[user]} {i % 10}", f"{STYLES[user]} {TOPICS[user]}"


def small_cfg(**overrides) -> TrainConfig:
    base = dict(device="cpu", optimizer="adamw", lr=3e-3, lr_final_ratio=0.1, warmup_steps=2, weight_decay=0.0,
                grad_clip=1.0, batch_size=4, micro_batch_size=2, steps=30, length_buckets=[16, 32], eval_every=10,
                checkpoint_every=0, log_every=10, seed=0)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def featurize(tokenizer, n, weight=1.0):
    return [dict(data.build_features(tokenizer, *example(i)), weight=weight) for i in range(n)]


def heldout_reward(tokenizer, features):
    """A deterministic selector: minus the weighted NLL of `features` (higher is better)."""
    def select(model):
        b = data.collate(features, [f["weight"] for f in features], [32], tokenizer.pad_token_id)
        with torch.no_grad():
            return -objective.weighted_nll(model(input_ids=b["input_ids"]).logits, b["labels"], b["weights"]).item()
    return select


# --------------------------------------------------------------------------- features and batches

def test_build_features_encodes_the_prompt_as_inference_does(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    completion = "a review, an email."
    comp = tok(completion, add_special_tokens=False)["input_ids"]
    for prompt in ("The quick brown fox", "<s>The quick brown fox"):  # plain, and rendered with BOS already
        f = data.build_features(tok, prompt, completion)
        n = len(generation.encode(tok, prompt))
        assert f["input_ids"][:n] == generation.encode(tok, prompt)
        assert f["input_ids"][0] == bos and f["input_ids"].count(bos) == 1
        assert f["input_ids"][n:] == comp + [eos]            # completion whole, then EOS
        assert f["labels"] == [-100] * n + comp + [eos]      # every prompt position masked


def test_featurize_drops_too_long_completions_and_counts_long_prompts(tokenizer):
    rows = [("user 1 writes about food", "good taste", 1.0),                 # 2 completion tokens
            ("user 2 writes about films", "hates the slow plot very", 0.5),   # 5: over the budget of 4
            ("user 3 writes about books", "likes a long story", 2.0)]         # 4: exactly the budget
    out = data.featurize(tokenizer, rows, max_prompt_tokens=6, max_completion_tokens=4)
    assert out.dropped_too_long == 1 and out.longest_dropped == 5
    assert [f["weight"] for f in out.features] == [1.0, 2.0]
    assert len(out.features[1]["input_ids"]) == 6 + 4 + 1  # nothing truncated: BOS + 5 prompt + 4 + EOS
    assert out.prompts_over_budget == 0
    # a prompt whose instruction and input alone exceed the budget is kept whole (inference sees it whole)
    over = data.featurize(tokenizer, rows, max_prompt_tokens=5, max_completion_tokens=4)
    assert over.prompts_over_budget == 3 and [f["input_ids"] for f in over.features] == [f["input_ids"] for f in out.features]


@pytest.mark.parametrize("n, expected", [(1, 16), (16, 16), (17, 32), (32, 32), (33, 128), (200, 256)])
def test_bucket_length(n, expected):
    assert data.bucket_length(n, [32, 16]) == expected


def test_collate_pads_to_the_smallest_bucket():
    features = [{"input_ids": [5] * 3, "labels": [-100, 6, 7]}, {"input_ids": [5] * 20, "labels": [8] * 20}]
    b = data.collate(features, [1.0, 0.5], [16, 32, 64], pad_id=0)
    assert b["input_ids"].shape == b["labels"].shape == (2, 32)
    assert b["input_ids"][0, 3:].eq(0).all() and b["labels"][0, 3:].eq(-100).all()
    assert b["weights"].tolist() == [1.0, 0.5]


def test_data_order_reshuffles_every_epoch_and_resumes_exactly():
    order = data.DataOrder(5, seed=3)
    first, second = order.take(5), order.take(5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second  # each row once per epoch
    order.take(2)
    state = copy.deepcopy(order.state_dict())
    ahead = order.take(7)
    resumed = data.DataOrder(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(7) == ahead and resumed.epochs == order.epochs == 19 / 5


# --------------------------------------------------------------------------- the loss and the schedule

def test_masked_prompt_positions_contribute_nothing():
    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6]])
    logits = torch.randn(1, 6, 10, requires_grad=True)
    loss = objective.weighted_nll(logits, labels, torch.ones(1))
    loss.backward()
    # position t predicts label t+1: positions 0 and 1 predict masked prompt labels, position 5 nothing
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[0, 5].abs().sum() == 0
    assert logits.grad[0, 2:5].abs().sum() > 0
    perturbed = logits.detach().clone()
    perturbed[0, :2] += 5 * torch.randn(2, 10)
    assert torch.equal(objective.weighted_nll(perturbed, labels, torch.ones(1)), loss.detach())
    changed = labels.clone()
    changed[0, 4] = 7
    assert not torch.isclose(objective.weighted_nll(logits.detach(), changed, torch.ones(1)), loss.detach())
    # weights of 1.0: the plain mean-token NLL over completion tokens
    plain = torch.nn.functional.cross_entropy(logits.detach()[0, 2:5], labels[0, 3:])
    assert torch.isclose(loss.detach(), plain, rtol=1e-6)


def _gradients(model, features, weights):
    model.zero_grad(set_to_none=True)
    b = data.collate(features, weights, [16, 32], pad_id=0)
    objective.weighted_nll(model(input_ids=b["input_ids"]).logits, b["labels"], b["weights"]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_weight_zero_adds_nothing_and_weight_two_counts_twice(tokenizer):
    model = make_model(tokenizer)
    a, b = featurize(tokenizer, 2)
    only_a = _gradients(model, [a], [1.0])
    assert torch.allclose(_gradients(model, [a, b], [1.0, 0.0]), only_a, atol=1e-7)
    twice = _gradients(model, [a, a, b], [1.0, 1.0, 1.0])
    assert torch.allclose(_gradients(model, [a, b], [2.0, 1.0]), twice, atol=1e-7)
    assert not torch.allclose(_gradients(model, [a, b], [1.0, 1.0]), twice, atol=1e-5)


def test_lr_warms_up_then_decays_to_the_final_ratio():
    cfg = small_cfg(lr=1.0, warmup_steps=4, lr_final_ratio=0.1)
    lrs = [objective.lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[0] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.8)
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(x < y for x, y in zip(lrs[:4], lrs[1:5])) and all(x > y for x, y in zip(lrs[4:], lrs[5:]))


# --------------------------------------------------------------------------- the loop

@pytest.mark.parametrize("n_rows", [3, 24])
def test_every_job_trains_the_same_number_of_steps(tokenizer, n_rows):
    cfg = small_cfg(steps=6, log_every=1, lr=1e-2)
    logged = []
    result = trainer.fit(make_model(tokenizer), featurize(tokenizer, n_rows), cfg, pad_id=0,
                         log_metrics=lambda m, step: logged.append(step) if "loss" in m else None)
    assert result.steps == 6 and logged == [1, 2, 3, 4, 5, 6]  # six optimizer steps, whatever the slice size
    assert result.epochs == pytest.approx(6 * 4 / n_rows)       # 3 rows: 8 passes; 24 rows: one
    assert result.best_step == 6 and result.curve == []          # no selector: the last step is kept


def test_loss_decreases(tokenizer):
    result = trainer.fit(make_model(tokenizer), featurize(tokenizer, 8), small_cfg(lr=1e-2, steps=20), pad_id=0)
    assert result.steps == 20 and result.device == "cpu" and result.compilations == 0
    assert result.final_loss < 0.5 * result.first_loss


class ScriptedSelector:
    """Returns the scripted rewards in turn and remembers the model state it was shown each time."""

    def __init__(self, rewards):
        self.rewards, self.states, self.modes = list(rewards), [], []

    def __call__(self, model):
        self.states.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self.modes.append(model.training)
        return self.rewards[len(self.states) - 1]


@pytest.mark.parametrize("rewards, best", [
    ([0.1, 0.3, 0.9, 0.9, 0.2], 2),  # ties: the earlier step
    ([0.8, 0.3, 0.1, 0.3, 0.2], 1),  # every trained step scores below the start: the best trained one is kept
    ([0.8, 0.8, 0.1, 0.2, 0.8], 1),  # the start's reward is the baseline, never a rival
])
@pytest.mark.parametrize("on_disk", [False, True], ids=["kept-in-memory", "kept-on-disk"])
def test_selection_keeps_the_trained_step_with_the_best_reward(tokenizer, rewards, best, on_disk):
    cfg = small_cfg(steps=8, eval_every=2, log_every=2, best_state_on_disk=on_disk)
    select, logged = ScriptedSelector(rewards), []
    model = make_model(tokenizer)
    result = trainer.fit(model, featurize(tokenizer, 8), cfg, pad_id=0, select=select,
                         log_metrics=lambda m, step: logged.append((step, m["selection_reward"])) if "selection_reward" in m else None)
    steps = [0, 2, 4, 6, 8]
    assert result.curve == logged == list(zip(steps, rewards))  # the step 0 baseline, every eval_every, the last
    assert result.best_step == steps[best] > 0 and result.best_reward == rewards[best]
    assert result.initial_reward == rewards[0] and select.modes == [False] * 5
    kept = select.states[best]
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters())  # the model holds that state
    assert not all(torch.equal(p, select.states[-1][n]) for n, p in model.named_parameters())


class FormatSelector(ScriptedSelector):
    """A ScriptedSelector that also reports which outputs were format-ok, as `selection.Selector.last` does."""

    def __init__(self, rewards, ok_rates, n=4):
        super().__init__(rewards)
        self.ok_rates, self.n, self.last = ok_rates, n, {}

    def __call__(self, model):
        reward = super().__call__(model)
        k = round(self.ok_rates[len(self.states) - 1] * self.n)
        self.last = {"format_ok": [True] * k + [False] * (self.n - k)}
        return reward


@pytest.mark.parametrize("rewards, ok_rates, best", [
    ([0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.25, 0.5, 0.5, 0.0], 2),  # equal rewards: more usable outputs win, then earlier
    ([0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], 4),   # nothing usable anywhere: the last step, not the start
    ([0.5, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], 4),   # ... nor when only the start was usable
    ([0.0, 0.2, 0.1, 0.0, 0.0], [1.0, 0.25, 1.0, 0.0, 0.0], 1),  # the reward comes first
])
def test_selection_breaks_ties_by_format_and_never_keeps_an_unusable_start(tokenizer, rewards, ok_rates, best):
    select, logged = FormatSelector(rewards, ok_rates), []
    model = make_model(tokenizer)
    result = trainer.fit(model, featurize(tokenizer, 8), small_cfg(steps=8, eval_every=2, log_every=2), pad_id=0,
                         select=select, log_metrics=lambda m, step: logged.append((step, m.get("selection_format_ok"))))
    steps = [0, 2, 4, 6, 8]
    assert result.best_step == steps[best] and result.best_reward == rewards[best]
    assert [x for x in logged if x[1] is not None] == list(zip(steps, ok_rates))
    kept = select.states[best]
    assert all(torch.equal(p, kept[n]) for n, p in model.named_parameters())


class StartFavouring:
    """Scores the untrained start above every trained state: 1.0 for the weights training started from,
    else `inner` (minus a held-out NLL: below 0). Deterministic, so a resumed job sees the same rewards."""

    def __init__(self, start_model, inner):
        self.start = {n: p.detach().clone() for n, p in start_model.named_parameters()}
        self.inner = inner

    def __call__(self, model):
        if all(torch.equal(p, self.start[n]) for n, p in model.named_parameters()):
            return 1.0
        return self.inner(model)


def test_a_resumed_job_never_keeps_the_start_either(tokenizer, tmp_path):
    cfg = small_cfg(steps=8, eval_every=2, checkpoint_every=3, log_every=1, lr=1e-2)
    rows = featurize(tokenizer, 6)
    select = StartFavouring(make_model(tokenizer), heldout_reward(tokenizer, featurize(tokenizer, 10)[6:]))
    whole = make_model(tokenizer)
    expected = trainer.fit(whole, rows, cfg, pad_id=0, select=select)
    assert expected.curve[0] == (0, 1.0) == (0, expected.initial_reward)  # the start is scored, as the baseline
    assert expected.best_step > 0 and expected.best_reward < 1.0 and expected.best_reward == max(r for _, r in expected.curve[1:])
    assert select(whole) < 1.0  # the model holds a trained state

    store = checkpoints.ResumeStore(tmp_path / "resume")
    on_disk = dataclasses.replace(cfg, best_state_on_disk=True)  # the kept step waits in a file: saved and resumed alike
    with pytest.raises(trainer.TrainingInterrupted):
        trainer.fit(make_model(tokenizer), rows, on_disk, pad_id=0, select=select, store=store, stop_after_steps=5)
    saved = store.latest()
    assert saved["step"] == 3 and saved["best"]["step"] == 2  # step 2 is the only trained step selected so far
    assert isinstance(saved["best"]["params"], dict) and saved["best"]["params"]  # the weights, not a file's name
    resumed_model = make_model(tokenizer)
    resumed = trainer.fit(resumed_model, rows, on_disk, pad_id=0, select=select, store=store)
    assert resumed.best_step == expected.best_step > 0 and resumed.initial_reward == 1.0
    for p, q in zip(whole.parameters(), resumed_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)

    # a resume state saved when the start could still win (best = step 0) is not followed back to the start
    start = {n: p.detach().clone() for n, p in make_model(tokenizer).named_parameters()}
    stale = checkpoints.ResumeStore(tmp_path / "stale")
    stale.save({**saved, "best": {"step": 0, "reward": 1.0, "ok": 0.0, "params": start}})
    from_stale_model = make_model(tokenizer)
    from_stale = trainer.fit(from_stale_model, rows, cfg, pad_id=0, select=select, store=stale)
    assert from_stale.resumed_from == 3 and from_stale.best_step in (4, 6, 8)  # step 2's weights were not saved
    assert select(from_stale_model) < 1.0


def test_resume_after_interruption_matches_an_uninterrupted_run(tokenizer, tmp_path):
    cfg = small_cfg(steps=8, eval_every=2, checkpoint_every=3, log_every=1, lr=1e-2)
    rows = featurize(tokenizer, 6)
    select = heldout_reward(tokenizer, featurize(tokenizer, 10)[6:])
    whole, whole_losses = make_model(tokenizer), {}

    def losses_into(curve):
        return lambda m, step: curve.__setitem__(step, m["loss"]) if "loss" in m else None

    expected = trainer.fit(whole, rows, cfg, pad_id=0, select=select, log_metrics=losses_into(whole_losses))

    store, interrupted_losses = checkpoints.ResumeStore(tmp_path / "resume"), {}
    with pytest.raises(trainer.TrainingInterrupted):
        trainer.fit(make_model(tokenizer), rows, cfg, pad_id=0, select=select, store=store, stop_after_steps=5,
                    log_metrics=losses_into(interrupted_losses))
    assert [p.name for p in (tmp_path / "resume").iterdir()] == ["state-00000003"]  # the latest state only
    (tmp_path / "resume" / ".tmp-killed-while-saving").mkdir()  # a save that never finished is ignored
    resumed_model, resumed_losses = make_model(tokenizer), {}
    resumed = trainer.fit(resumed_model, rows, cfg, pad_id=0, select=select, store=store,
                          log_metrics=losses_into(resumed_losses))
    assert resumed.resumed_from == 3 and sorted(resumed_losses) == [4, 5, 6, 7, 8]  # steps 4 and 5 redone, 1-3 not
    # the loss curve of the interrupted job (steps 1-3 before the kill, 4-8 after) is the uninterrupted one
    stitched = {**{k: v for k, v in interrupted_losses.items() if k <= 3}, **resumed_losses}
    assert sorted(stitched) == sorted(whole_losses) == list(range(1, 9))
    assert [stitched[k] for k in range(1, 9)] == pytest.approx([whole_losses[k] for k in range(1, 9)], rel=1e-4)
    assert [resumed_losses[k] for k in (4, 5)] == pytest.approx([interrupted_losses[k] for k in (4, 5)], rel=1e-4)
    assert resumed.final_loss == pytest.approx(expected.final_loss, rel=1e-4)
    assert resumed.first_loss == pytest.approx(expected.first_loss, rel=1e-6)
    assert [s for s, _ in resumed.curve] == [s for s, _ in expected.curve] == [0, 2, 4, 6, 8]
    assert [r for _, r in resumed.curve] == pytest.approx([r for _, r in expected.curve], rel=1e-4)
    assert resumed.best_step == expected.best_step and resumed.epochs == expected.epochs
    for p, q in zip(whole.parameters(), resumed_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_two_workers_under_torch_distributor_match_one_process(spark, tokenizer, tmp_path):
    """train.num_workers = 2: two torchrun processes (gloo) split each step's four micro-batches, and
    the loss curve, the selection curve and the selected weights are the single process's."""
    import sys

    from pyspark import cloudpickle

    from restpg.training import distributed

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the selector below travels to rank 0 by value
    cfg = small_cfg(steps=6, batch_size=4, micro_batch_size=1, eval_every=3, checkpoint_every=3, log_every=1, lr=1e-2)
    rows = featurize(tokenizer, 8)
    select = heldout_reward(tokenizer, featurize(tokenizer, 12)[8:])
    start = tmp_path / "start"
    make_model(tokenizer).save_pretrained(start)

    one_losses = {}
    one = checkpoints.load_for_training(start, cfg)
    expected = trainer.fit(one, rows, cfg, pad_id=0, select=select,
                           log_metrics=lambda m, step: one_losses.__setitem__(step, m["loss"]) if "loss" in m else None)
    model, result, metrics = distributed.fit(start, rows, cfg, num_workers=2, pad_id=0, select=select,
                                             store_root=tmp_path / "resume", out_dir=tmp_path / "dist")
    assert result.workers == 2 and expected.workers == 1 and result.device == "cpu"
    losses = {step: m["loss"] for m, step in metrics if "loss" in m}
    assert sorted(losses) == sorted(one_losses) == list(range(1, 7))
    assert [losses[k] for k in range(1, 7)] == pytest.approx([one_losses[k] for k in range(1, 7)], rel=1e-4)
    assert [s for s, _ in result.curve] == [0, 3, 6]
    assert [r for _, r in result.curve] == pytest.approx([r for _, r in expected.curve], rel=1e-4)
    assert result.best_step == expected.best_step
    assert [p.name for p in (tmp_path / "resume").iterdir()] == ["state-00000006"]  # rank 0 wrote the resume states
    for (name, p), q in zip(one.named_parameters(), model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_xla_matches_eager(tokenizer):
    # AdamW here; Adafactor on XLA runs in the stage test below
    cfg = small_cfg(optimizer="adamw", steps=3, eval_every=3, log_every=1, lr=1e-3, length_buckets=[32])
    rows = featurize(tokenizer, 8)
    select = heldout_reward(tokenizer, rows[6:])
    model = make_model(tokenizer)
    eager, xla = copy.deepcopy(model), copy.deepcopy(model)
    r_cpu = trainer.fit(eager, rows[:6], cfg, pad_id=0, select=select)
    r_xla = trainer.fit(xla, rows[:6], dataclasses.replace(cfg, device="xla"), pad_id=0, select=select)
    assert r_xla.device == "xla"
    assert r_xla.first_loss == pytest.approx(r_cpu.first_loss, rel=1e-4)
    assert r_xla.final_loss == pytest.approx(r_cpu.final_loss, rel=1e-3)
    assert [r for _, r in r_xla.curve] == pytest.approx([r for _, r in r_cpu.curve], rel=1e-3)  # on a CPU twin
    # a handful of graphs (per bucket: first/accumulating micro-batch, optimizer step), not one per step
    assert 0 < r_xla.compilations <= 8
    for p, q in zip(eager.parameters(), xla.parameters()):
        assert q.device.type == "cpu" and torch.allclose(p, q, atol=1e-4)


def test_inert_weight_decay_step_is_where_xla_compiles_once_more(tokenizer):
    # 1 - lr·wd is exactly 1.0 in float32 once lr·wd < 2**-25; torch_xla traces that step's optimizer graph
    # without the scalar, so one more graph is compiled there and none at any other step after warm-up
    decaying = small_cfg(device="xla", lr=1e-5, weight_decay=0.01, warmup_steps=0, steps=6, batch_size=2,
                         micro_batch_size=2, length_buckets=[32], eval_every=10 ** 9, log_every=1, grad_clip=0.0)
    assert objective.inert_decay_step(decaying, 6) == 5  # lr 2.8e-6 at step 5: 2.8e-8 < 2.98e-8
    assert objective.inert_decay_step(dataclasses.replace(decaying, lr=1e-4), 6) is None
    assert objective.inert_decay_step(dataclasses.replace(decaying, weight_decay=0.0), 6) is None
    from restpg.training.devices import xla_compilations

    for cfg in (decaying, dataclasses.replace(decaying, lr=1e-4)):
        compiled = [xla_compilations()]
        trainer.fit(make_model(tokenizer), featurize(tokenizer, 12), cfg, pad_id=0,
                    log_metrics=lambda m, step: compiled.append(xla_compilations()))
        by_step = [b - a for a, b in zip(compiled, compiled[1:])]
        extra = objective.inert_decay_step(cfg, cfg.steps)
        assert [step for step, n in enumerate(by_step[2:], start=3) if n] == ([extra] if extra else []), by_step


def test_lora_trains_adapters_only_and_merges(tokenizer, tmp_path):
    make_model(tokenizer).save_pretrained(tmp_path)
    cfg = small_cfg(lora_rank=4, lr=1e-2, steps=4)
    model = checkpoints.load_for_training(tmp_path, cfg)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    result = trainer.fit(model, featurize(tokenizer, 4), cfg, pad_id=0)
    assert result.final_loss < result.first_loss
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    q_proj = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_proj, base["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])


def test_job_dir_is_keyed_by_the_job_not_the_run(tmp_path):
    settings = make_settings(tmp_path)
    key = dict(variant="rest_pg", iteration=2, training_set_version=7, init_ref="packaged:smollm2-135m-instruct")
    same = checkpoints.job_dir(settings, **key)
    assert same == checkpoints.job_dir(make_settings(tmp_path), **key)
    assert same.parent == settings.home_dir / "checkpoints" and same.name.startswith("rest_pg-it2-ts7-")
    others = [checkpoints.job_dir(settings, **{**key, "iteration": 3}),
              checkpoints.job_dir(settings, **{**key, "training_set_version": 8}),
              checkpoints.job_dir(settings, **{**key, "init_ref": "models:/restpg-policy/4"}),
              checkpoints.job_dir(make_settings(tmp_path, "train.lr=0.001"), **key)]
    assert len({same, *others}) == 5
    # where the job runs is not the job: another process count resumes it, another root holds it
    assert checkpoints.job_dir(make_settings(tmp_path, "train.num_workers=4"), **key) == same
    moved = checkpoints.job_dir(make_settings(tmp_path, f"train.checkpoint_root={tmp_path / 'volume'}"), **key)
    assert moved == tmp_path / "volume" / same.name


# --------------------------------------------------------------------------- the stage, end to end

TRAIN_PROMPTS = ["Write a review of a kettle.", "Write a review of a teapot.", "Write an email about tea.",
                 "Write a review of a mug.", "Write an email about apples.", "Write a review of a fox."]
TARGETS = ["Great kettle, boils fast.", "The teapot pours well.", "Dear team, tea at ten.",
           "A mug for 10 apples.", "Apples, 1 pear, a review.", "The quick brown fox jumps."]
LONG = " ".join(["the lazy dog jumps"] * 20)  # 81 tokens: over every budget below


def scripted_score(calls, rewards):
    """A stand-in for rewards.score: every output of the n-th call earns rewards[n]; records the calls."""
    def score(settings, inputs, targets, responses):
        calls.append({"inputs": list(inputs), "targets": list(targets), "responses": list(responses)})
        return [rewards[len(calls) - 1]] * len(responses)
    return score


def scripted_curve(calls, rewards, steps):
    """What the selector reports for a scripted score: the call's reward on each format-ok output and 0 on
    the others (an unusable output's response reaches the scorer empty)."""
    return [(step, r * sum(bool(x) for x in c["responses"]) / len(c["responses"])) for step, r, c in zip(steps, rewards, calls)]


def best_of(curve):
    """(step, reward) of the highest reward among the trained steps (step 0 is the baseline, never kept);
    ties keep the earlier step; all 0 (for a scripted score: no format-ok output at any trained step) keeps
    the last."""
    trained = curve[1:]
    if all(r == 0 for _, r in trained):
        return trained[-1]
    return max(trained, key=lambda point: (point[1], -point[0]))


def training_row(variant, iteration, i, completion=None, weight=1.0):
    return {"variant": variant, "iteration": iteration, "example_id": f"t{i}", "sample_index": -1, "task": "product_review",
            "prompt": TRAIN_PROMPTS[i % 6], "completion": completion or TARGETS[i % 6], "weight": weight}


@pytest.fixture(scope="module")
def stage(spark, tiny, tmp_path_factory):
    """A home with examples (train + val), retrievals and training_sets, and the SFT job run once with
    a scripted selection reward that makes step 3 of 6 the best: neither the start nor the end."""
    import mlflow

    from restpg.runtime import setup_mlflow

    settings = make_settings(
        tmp_path_factory.mktemp("train-home"), f"models.policy={tiny}", "catalog.schema=restpg_train_test",
        "mlflow.policy_model_name=tiny-policy", "train.device=cpu", "train.optimizer=adafactor", "train.lr=0.01",
        "train.warmup_steps=1", "train.batch_size=4", "train.micro_batch_size=2", "train.steps=6", "train.eval_every=3",
        "train.log_every=2", "train.checkpoint_every=2", "train.selection_examples=3", "train.length_buckets=[64]",
        "prompt.max_input_tokens=128", "prompt.max_reasoning_tokens=8", "prompt.max_response_tokens=32")
    examples = [example_row(f"t{i}", f"u{i}", "train", input=TRAIN_PROMPTS[i], target=TARGETS[i]) for i in range(6)]
    examples += [example_row(f"v{i}", f"u{i}", "val", input=TRAIN_PROMPTS[i], target=f"val target {i}: " + TARGETS[i])
                 for i in range(4)]
    write_rows(spark, settings, "examples", examples)
    write_rows(spark, settings, "retrievals", [
        {"example_id": f"v{i}", "retriever": settings.models.retriever, "k": 1,
         "items": [{"rank": 1, "item_id": f"u{i}-p0", "score": 0.5, "text": "I wrote about tea."}]} for i in range(4)])
    rows = [training_row("sft", 0, i) for i in range(5)]
    rows += [training_row("sft", 0, 5, completion=LONG), training_row("sft", 0, 6, weight=0.0)]
    rows += [training_row("sft", 1, i) for i in range(2)]  # another iteration: never read
    rows += [training_row("rest_em", 1, i, weight=0.5) for i in range(3)]
    rows += [training_row("sft_reasoning", 0, i, completion=LONG) for i in range(2)]
    write_rows(spark, settings, "training_sets", rows)
    setup_mlflow(settings)
    calls = []
    with mlflow.start_run(run_name="train") as run:
        result = train.run(spark, settings, variant="sft", iteration=0, run_id=run.info.run_id,
                           score=scripted_score(calls, [0.25, 0.75, 0.5]))
    sample = selection.selection_sample(spark, settings, "sft")
    return settings, result, calls, sample


def test_run_trains_selects_registers_and_logs(stage, tiny):
    from mlflow import MlflowClient

    settings, result, calls, sample = stage
    assert result["device"] == "cpu" and result["steps"] == 6 and result["compilations"] == 0
    assert result["train_rows"] == 5 and result["dropped_too_long"] == 1  # weight-0 row left out, iteration 1 unread
    assert result["epochs"] == pytest.approx(6 * 4 / 5) and result["init_ref"] == tiny
    curve = scripted_curve(calls, [0.25, 0.75, 0.5], [0, 3, 6])
    assert [(s, pytest.approx(r)) for s, r in curve] == result["selection_curve"]
    best_step, best_reward = best_of(curve)
    assert (result["best_step"], result["best_reward"], result["initial_reward"]) == (best_step, pytest.approx(best_reward), pytest.approx(curve[0][1]))
    assert any("" in c["responses"] for c in calls)  # a random model's outputs cut at the cap earn 0
    # the selection sample: 3 of the 4 validation examples, the same inputs at every evaluation
    assert len(calls) == 3 and all(c["targets"] == calls[0]["targets"] == sample.targets for c in calls)
    assert len(sample.targets) == 3 and all(t.startswith("val target") for t in sample.targets)
    assert calls[0]["responses"] != calls[1]["responses"]  # training changed what the model writes

    client = MlflowClient()
    assert result["model_uri"] == f"models:/tiny-policy/{result['version']}"
    tags = client.get_model_version("tiny-policy", result["version"]).tags
    assert tags["variant"] == "sft" and tags["iteration"] == "0" and tags["init_ref"] == tiny
    assert tags["run_id"] == result["run_id"] and tags["training_set_version"] == str(result["training_set_version"])
    assert float(tags["selection_reward"]) == pytest.approx(best_reward)
    history = sorted(client.get_metric_history(result["run_id"], "selection_reward"), key=lambda m: m.step)
    assert [(m.step, pytest.approx(m.value)) for m in history] == curve
    assert [m.step for m in client.get_metric_history(result["run_id"], "loss")] == [1, 2, 4, 6]
    out = Path(result["checkpoint_dir"])
    assert out.parent.parent == settings.home_dir / "checkpoints" and result["run_id"] not in str(out)
    assert not (out.parent / "resume").exists()  # the finished job's resume states are gone
    meta = json.loads((out / checkpoints.CHECKPOINT_META).read_text())
    assert meta["best_step"] == best_step and meta["train_config"]["steps"] == 6


def test_registered_checkpoint_is_the_selected_state(stage):
    import mlflow

    from restpg import models

    settings, result, calls, sample = stage
    model, tokenizer = models.load_causal_lm(result["model_uri"], settings)
    replay = []
    selection.Selector(sample, tokenizer, settings, "sft", scripted_score(replay, [0.0]))(model)
    at = {3: 1, 6: 2}[result["best_step"]]
    assert replay[0]["responses"] == calls[at]["responses"]  # what the selected step wrote
    out = mlflow.pyfunc.load_model(result["model_uri"]).predict(["Write a review of a kettle."], params={"max_new_tokens": 4})
    assert len(out) == 1 and isinstance(out[0], str)


def test_restart_from_previous_starts_from_the_sampling_policy(stage, spark, tiny):
    import mlflow

    settings, sft, sft_calls, _ = stage
    base = dataclasses.replace(settings, train=dataclasses.replace(settings.train, restart_from="base"))
    assert train.start_ref(base, "rest_em", 1) == tiny  # restart_from=base (the paper): a fresh base
    previous = dataclasses.replace(settings, train=dataclasses.replace(settings.train, restart_from="previous"))
    assert train.start_ref(previous, "rest_em", 0) == tiny  # SFT always starts from the base policy
    calls = []
    with mlflow.start_run(run_name="train-rest_em") as run:
        result = train.run(spark, previous, variant="rest_em", iteration=1, run_id=run.info.run_id, register=False,
                           score=scripted_score(calls, [0.5, 0.5, 0.5]))
    assert result["init_ref"] == sft["model_uri"] and result["model_uri"] is None
    assert result["train_rows"] == 3 and result["steps"] == 6 and result["epochs"] == pytest.approx(8.0)
    curve = scripted_curve(calls, [0.5, 0.5, 0.5], [0, 3, 6])
    assert result["best_step"] == best_of(curve)[0]  # ties keep the earliest step
    # step 0 is the registered SFT model (its selected step), not the base policy (SFT's step 0)
    at = {3: 1, 6: 2}[sft["best_step"]]  # a trained step: SFT never hands on the base policy
    assert calls[0]["responses"] == sft_calls[at]["responses"]
    assert calls[0]["responses"] != sft_calls[0]["responses"]


def test_run_with_two_workers_logs_the_single_process_curves(stage, spark):
    """The stage with train.num_workers=2: TorchDistributor, the real selection reward on rank 0, the
    metrics logged by the driver; the same loss and selection curves as one process."""
    import mlflow
    from mlflow import MlflowClient

    settings = stage[0]
    results, losses = {}, {}
    for workers in (1, 2):
        s = dataclasses.replace(settings, train=dataclasses.replace(settings.train, num_workers=workers))
        with mlflow.start_run(run_name=f"train-{workers}-workers") as run:
            results[workers] = train.run(spark, s, variant="rest_em", iteration=1, run_id=run.info.run_id, register=False)
        losses[workers] = [(m.step, m.value) for m in sorted(MlflowClient().get_metric_history(run.info.run_id, "loss"),
                                                              key=lambda m: m.step)]
    one, two = results[1], results[2]
    assert (one["workers"], two["workers"]) == (1, 2) and two["steps"] == one["steps"] == 6
    assert [s for s, _ in losses[2]] == [s for s, _ in losses[1]] == [1, 2, 4, 6]
    assert [v for _, v in losses[2]] == pytest.approx([v for _, v in losses[1]], rel=1e-4)
    assert [s for s, _ in two["selection_curve"]] == [0, 3, 6]
    assert [r for _, r in two["selection_curve"]] == pytest.approx([r for _, r in one["selection_curve"]], abs=1e-4)
    assert two["best_step"] == one["best_step"] and two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)


def test_every_row_too_long_fails_with_the_numbers(stage, spark):
    import mlflow

    settings = stage[0]
    cap = prompts.output_budget("sft_reasoning", 8, 32)
    with mlflow.start_run(run_name="too-long") as run:
        with pytest.raises(ValueError, match=rf"all 2 rows .* longer than the output budget of {cap} tokens \(longest 81\)"):
            train.run(spark, settings, variant="sft_reasoning", iteration=0, run_id=run.info.run_id)


def test_empty_slice_and_foreign_run_fail_clearly(stage, spark):
    import mlflow

    settings = stage[0]
    with mlflow.start_run(run_name="empty") as run:
        with pytest.raises(ValueError, match="no rows with weight > 0 for variant='rest_pg' iteration=2"):
            train.run(spark, settings, variant="rest_pg", iteration=2, run_id=run.info.run_id)
    with pytest.raises(ValueError, match="not it"):
        train.run(spark, settings, variant="sft", iteration=0, run_id="not-the-active-run")


@pytest.mark.slow
def test_gemma_rendered_chat_prompt_gets_exactly_one_bos(tmp_path):
    from helpers import GEMMA

    from restpg import models

    settings = make_settings(tmp_path)
    tokenizer = models.load_tokenizer(GEMMA, settings)
    prompt = generation.render_chat(tokenizer, "Write a review of a kettle.")
    assert prompt.startswith(tokenizer.bos_token)  # the chat template writes BOS itself
    f = data.build_features(tokenizer, prompt, "Great kettle, boils fast.")
    ids = generation.encode(tokenizer, prompt)
    assert f["input_ids"][:len(ids)] == ids
    assert f["input_ids"][0] == tokenizer.bos_token_id and f["input_ids"].count(tokenizer.bos_token_id) == 1
    assert f["input_ids"][-1] == tokenizer.eos_token_id


def test_a_state_already_selected_in_this_process_is_not_generated_again(tiny, tmp_path):
    """Every M-step restarts from the same base: its step-0 selection is answered from the process's memo
    (same reward, same outputs); a changed weight, another sample or another scorer generates anew."""
    from restpg import models

    settings = make_settings(tmp_path, f"models.policy={tiny}", "prompt.max_response_tokens=6")
    model, tokenizer = models.load_causal_lm(tiny, settings)
    model.eval()
    sample = selection.SelectionSample(["v0", "v1"], ["Write a review.", "Write an email."], ["a", "b"], ["x", "y"])
    calls = []
    score = scripted_score(calls, [0.5, 0.25, 0.75])
    first = selection.Selector(sample, tokenizer, settings, "sft", score)
    reward = first(model)
    again = selection.Selector(sample, tokenizer, settings, "sft", score)
    assert again(model) == reward and len(calls) == 1 and again.last == first.last
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    selection.Selector(sample, tokenizer, settings, "sft", score)(model)
    assert len(calls) == 2  # a changed state is generated and scored anew
    other = selection.SelectionSample(["v0"], ["Write a review."], ["a"], ["x"])
    selection.Selector(other, tokenizer, settings, "sft", score)(model)
    assert len(calls) == 3
    selection.Selector(sample, tokenizer, settings, "sft", scripted_score([], [0.5]))(model)
    assert len(calls) == 3  # the other scorer was called, not this one


def test_completion_window_gives_the_full_loss_and_gradients(tokenizer):
    """Logits of the completion window only (trainer on CPU/CUDA): the same loss and gradients as the whole
    sequence's logits, from fewer positions; rows whose prompts differ in length share one window."""
    model = make_model(tokenizer)
    features = featurize(tokenizer, 3)
    b = data.collate(features, [1.0, 0.5, 2.0], [16, 32, 64, 128], pad_id=0)
    window = objective.completion_window(b["labels"])
    first = min(row.tolist().index(next(x for x in row.tolist() if x != data.IGNORE_INDEX)) for row in b["labels"])
    assert window == b["labels"].shape[1] - first + 1 < b["labels"].shape[1]

    def loss_and_grads(keep):
        model.zero_grad(set_to_none=True)
        labels = b["labels"][:, -keep:] if keep else b["labels"]
        logits = model(input_ids=b["input_ids"], logits_to_keep=keep).logits
        loss = objective.weighted_nll(logits, labels, b["weights"])
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]), logits.shape[1]

    full_loss, full_grads, full_width = loss_and_grads(0)
    loss, grads, width = loss_and_grads(window)
    assert width == window < full_width
    assert torch.allclose(loss, full_loss, atol=1e-6) and torch.allclose(grads, full_grads, atol=1e-6)
    # one position fewer misses the first completion token's prediction: the loss changes
    short_loss, _, _ = loss_and_grads(window - 1)
    assert not torch.isclose(short_loss, full_loss, atol=1e-6)
    assert objective.completion_window(torch.full((2, 5), data.IGNORE_INDEX)) == 0


# --------------------------------------------------------------------------- CUDA: bf16 autocast, gradient checkpointing

@pytest.mark.parametrize("kind, bf16_supported, expected", [
    ("cuda", True, "bfloat16"), ("cuda", False, "float32"), ("cpu", True, "float32"), ("xla", True, "float32")])
def test_autocast_is_bf16_on_a_cuda_gpu_that_supports_it(kind, bf16_supported, expected):
    assert objective.autocast_dtype(kind, bf16_supported) == expected


def _training_forwards(model, seen: list, probe):
    model.register_forward_pre_hook(lambda module, args: seen.append(probe(module)) if module.training else None)


def test_training_forwards_run_under_the_devices_autocast(tokenizer, monkeypatch):
    rows = featurize(tokenizer, 4)
    seen: list = []
    model = make_model(tokenizer)
    _training_forwards(model, seen, lambda m: torch.is_autocast_enabled("cpu"))
    trainer.fit(model, rows, small_cfg(steps=1), pad_id=0)
    assert seen and not any(seen)  # float32 on the CPU, as before
    monkeypatch.setattr(trainer, "autocast_dtype", lambda kind: "bfloat16")  # what a bf16-capable GPU gets
    seen.clear()
    trainer.fit(model, rows, small_cfg(steps=1), pad_id=0)
    assert seen and all(seen) and model.lm_head.weight.dtype == torch.float32


def test_gradient_checkpointing_reaches_the_model_and_leaves_loss_and_gradients_alone(tokenizer):
    rows = featurize(tokenizer, 8)
    results, states = [], []
    for on in (False, True):
        model, seen = make_model(tokenizer), []
        _training_forwards(model, seen, lambda m: m.is_activation_checkpointing)
        cfg = small_cfg(steps=3, lr=1e-2, log_every=1, gradient_checkpointing=on)
        results.append(trainer.fit(model, rows, cfg, pad_id=0))
        states.append(model.state_dict())
        assert seen and all(x == on for x in seen)  # on in every training forward when asked, never otherwise
        assert not model.is_activation_checkpointing and model.config.use_cache  # the saved model generates as before
    off, on = results
    assert on.first_loss == pytest.approx(off.first_loss, abs=1e-6) and on.final_loss == pytest.approx(off.final_loss, abs=1e-6)
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])  # three steps of the same gradients
