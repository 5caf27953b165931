"""Pure RL maths over tensors and masks; imports nothing from the rest of async_or1."""

from async_or1.algo.advantages import grpo_advantages
from async_or1.algo.corrections import (CORRECTIONS, CorrectionParams, Weights, behaviour_sums, correction_weights,
                                        m2po_cutoff, summarize_behaviour)
from async_or1.algo.entropy import AdaptiveEntropy
from async_or1.algo.logprobs import logprobs_and_entropy, naive_logprobs_and_entropy
from async_or1.algo.loss import kl_k1, kl_k3, masked_mean, masked_sum, policy_loss, truncation_mask

__all__ = ["grpo_advantages", "CORRECTIONS", "CorrectionParams", "Weights", "behaviour_sums", "correction_weights",
           "m2po_cutoff", "summarize_behaviour", "AdaptiveEntropy", "logprobs_and_entropy",
           "naive_logprobs_and_entropy", "kl_k1", "kl_k3", "masked_mean", "masked_sum", "policy_loss",
           "truncation_mask"]
