"""The training job behind the `train` stage, in small parts read in this order:

- `data`: training rows → features (one tokenization, shared with inference; over-long completions
  dropped, never truncated) → padded batches, and the epoch-reshuffled row order.
- `objective`: the reward-weighted NLL, the learning-rate schedule, the optimizer.
- `devices`: XLA (torch-xla) / CUDA / CPU, graph cuts, compilation count.
- `selection`: the paper's checkpoint selection — mean reward of the model's own outputs on a fixed
  validation sample.
- `checkpoints`: the job's directory, atomic resume states, the saved HF checkpoint.
- `trainer`: `fit`, the loop that ties them together.
- `distributed`: `fit` in `train.num_workers` processes under Spark's TorchDistributor (gradients
  summed across ranks; rank 0 selects and writes).

`restpg.train.run` is the stage: it reads the slice, picks the start checkpoint, calls `fit`, and
registers the result.
"""
