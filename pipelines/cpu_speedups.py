"""CPU speed-ups of the training stage: the same losses and gradients as TRL's own path, computed faster.

    from pipelines.cpu_speedups import plain_head_on_cpu, score_only_label_positions, epoch_seeded

Each reaches into a TRL or transformers internal, and only through pipelines.fence (which lists them, checks them
against the installed versions and is tested). Measured on this 2-core machine, see bench/bench_train.py and the
README's performance table. `epoch_seeded` is not a speed-up but an exactness fix of the same kind (an internal
wrapped): a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
from typing import Any

from pipelines import fence


def score_only_label_positions() -> bool:
    """Make TRL's fused LM head project only the positions that have a label, on every device; True if it does.

    TRL's SFTTrainer computes the loss with a fused, chunked LM head. On CUDA/XPU it scores only the positions
    with a label ("compact"); elsewhere it scores every position, so that compilers such as Neuron see fixed
    tile shapes. On CPU that spends the 49k-vocabulary head on every prompt token: in a profile of the ticket
    demo (13 of 124 tokens trained) it was a third of the step. The compact path is the same computation on
    fewer rows, scattered back to their positions, so losses and gradients are unchanged
    (tests/test_train.py checks both). The switch is TRL's internal `_use_triton` (pipelines.fence); if a TRL
    release moves it, training still works at the old speed, a warning says so, and tests/test_fence.py fails.
    """

    def compact_everywhere(decide: Any) -> Any:
        def compact(device: Any) -> bool:
            return device.type == "cpu" or decide(device)

        return compact

    return fence.patch_module_function("use_triton", compact_everywhere)


PLAIN_HEAD_MAX_LABELS = 4096  # label positions per batch up to which the CPU head keeps (labels, vocab) logits
HEAD_ROWS = 32  # label positions per elementwise pass of the CPU head: a (32, vocab) tile stays in cache
_SCALED_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


@functools.cache
def _label_log_prob_function() -> Any:
    """The LM head at the label positions as one autograd Function: (hidden, weight, targets) -> log p(target),
    entropy, is-top-1. Built on first use so importing this module does not import torch."""
    import torch

    class LabelLogProb(torch.autograd.Function):
        """logits = hidden @ weight.T, held once: the forward reads it in cache-sized row tiles for the
        log-sum-exp and the entropy, and the backward turns that same buffer, in place, into the gradient
        of log p(target) with respect to the logits (one-hot minus softmax, times the incoming gradient).
        F.cross_entropy + a separate entropy allocate five (labels, vocab) tensors per step instead of one;
        on this CPU each fresh one costs page faults and a pass over memory."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any) -> tuple[Any, Any, Any]:
            logits = hidden @ weight.t()  # (n, vocab)
            lse, entropy = logits.new_empty(len(logits)), logits.new_empty(len(logits))
            for start in range(0, len(logits), HEAD_ROWS):
                tile = logits[start:start + HEAD_ROWS]
                peak = tile.amax(-1, keepdim=True)
                exp = (tile - peak).exp_()
                total = exp.sum(-1)
                lse[start:start + HEAD_ROWS] = tile_lse = peak.squeeze(-1) + total.log()
                entropy[start:start + HEAD_ROWS] = tile_lse - torch.linalg.vecdot(exp, tile) / total  # lse - E[logit]
            is_top1 = logits.argmax(-1) == targets  # the first maximum, as TRL counts a tie
            log_probs = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - lse
            ctx.save_for_backward(hidden, weight, targets, lse)
            ctx.logits = logits  # consumed by backward
            ctx.mark_non_differentiable(entropy, is_top1)
            return log_probs, entropy, is_top1

        @staticmethod
        def backward(ctx: Any, grad: Any, _entropy: Any, _top1: Any) -> tuple[Any, Any, None]:
            hidden, weight, targets, lse = ctx.saved_tensors
            logits, ctx.logits = ctx.logits, None
            if logits is None:
                raise RuntimeError("the CPU LM head's backward reuses its logits buffer and can run only once")
            for start in range(0, len(logits), HEAD_ROWS):  # d log p_t / d logit_j = 1[j = t] - p_j
                rows = slice(start, start + HEAD_ROWS)
                logits[rows].sub_(lse[rows, None]).exp_().mul_(-grad[rows, None])
            logits[torch.arange(len(logits)), targets] += grad
            grad_hidden = logits @ weight if ctx.needs_input_grad[0] else None
            grad_weight = logits.t() @ hidden if ctx.needs_input_grad[1] else None
            return grad_hidden, grad_weight, None

    return LabelLogProb


def _plain_label_head(hidden: Any, head: Any, targets: Any) -> tuple[Any, Any, Any]:
    """log p(target), entropy and "target is the argmax" at each labelled position: (n,) each.

    entropy and is_top1 are for logging only, as in TRL (no gradient flows through them).
    """
    return _label_log_prob_function().apply(hidden.float(), head.weight.float(), targets)


def plain_head_on_cpu(model: Any) -> bool:
    """On CPU, compute TRL's fused-LM-head outputs with one matmul and an in-place softmax; True if installed.

    TRL computes the loss with a chunked LM head that never holds the (positions, vocab) logits: right for
    GPU memory, but on CPU its torch fallback makes ~10 elementwise passes over every logit tile forward and
    backward. Measured here, 2 threads, forward + backward: on 900 label positions (a batch of 8 Alpaca rows)
    2.45 s TRL's head vs 0.94 s matmul + F.cross_entropy; on 1,500 positions 2.05 s for matmul +
    cross-entropy + a separate entropy vs 1.29 s for LabelLogProb (_label_log_prob_function). This path keeps
    TRL's contract (same loss, log_probs, entropy, is_top1 and label_mask; tests/test_train.py compares them,
    gradients included) for batches of up to PLAIN_HEAD_MAX_LABELS labels (~0.8 GB of logits for SmolLM2);
    larger batches, scaled, soft-capped or biased heads and pre-shifted labels go to TRL's own path.
    """
    import types

    if not fence.available("fused_output"):  # a TRL without that contract: its own head runs
        return False
    FusedCausalLMOutput = fence.get("fused_output")  # noqa: N806 (a class)

    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text_config = base.config.get_text_config()
    if any(getattr(text_config, key, None) is not None for key in _SCALED_HEAD_KEYS):
        return False
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:  # a wrapped (e.g. LoRA) or biased head
        return False
    fused = base.forward  # TRL's patched forward: the fallback

    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or labels is None or shift_labels is not None or \
                int((labels[:, 1:] != -100).sum()) > PLAIN_HEAD_MAX_LABELS:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # (batch, seq - 1, hidden)
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs, entropy, is_top1 = _plain_label_head(hidden[mask], self.get_output_embeddings(), targets[mask])

        def full(x: Any) -> Any:  # back to (batch, seq - 1), zero where there is no label
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denominator, log_probs=full(log_probs),
                                   entropy=full(entropy), is_top1=full(is_top1), label_mask=mask)

    base.forward = types.MethodType(forward, base)
    return True


def epoch_seeded(sampler: Any, seed: int) -> Any:
    """The trainer's length-grouped sampler, its shuffle drawn from seed + epoch instead of the global RNG.

    transformers draws the order of an epoch from the global torch RNG when the epoch starts; a resume in the
    middle of an epoch rebuilds that order before it restores rng_state.pth (and that state is not the one of
    the epoch start anyway), so without this a resumed run trains on other batches than an uninterrupted one.
    """
    LengthGroupedSampler = fence.get("length_grouped_sampler")  # noqa: N806 (a class)

    if type(sampler) is not LengthGroupedSampler:
        return sampler

    class EpochSeeded(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:  # called by the Trainer / accelerate before each epoch
            self.epoch = epoch

        def __iter__(self):
            import torch

            self.generator = torch.Generator().manual_seed(seed + self.epoch)
            return super().__iter__()

    return EpochSeeded(sampler.batch_size, lengths=sampler.lengths)
