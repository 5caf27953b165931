"""Grow a small Qwen2 into a larger one that computes the same function (up to float rounding).

Warm-starting a 20-50M-parameter model by supervised training costs hours on a 2-core CPU; a
small model learns the task in minutes. Growing it keeps what it learned and gives RL, the learner
and the weight paths a model of the size where scale effects show. The larger model (pre-norm
residual stream of width H' >= H, heads of the same head_dim, MLP width I' >= I, L' >= L layers):

- the residual stream's new dimensions stay zero: the embedding's new columns are zero and no
  projection writes into them (o_proj / down_proj rows for them are zero);
- RMSNorm over H' dimensions of which H - H' are zero divides by sqrt(H/H') times the old RMS, so
  old norm weights are scaled by sqrt(H/H') and eps by H/H': the normalised values are unchanged;
- new attention heads and MLP units read anything (random init, so they receive gradients and
  can learn) but their output columns in o_proj / down_proj are zero;
- new layers (appended after the old ones) have zero o_proj and down_proj: residual identities.

Only the read side of new units is random; everything that writes into the old function is copied
or zero. ``tests/test_embedded_small.py`` checks the logits against the small model's.
"""

from __future__ import annotations

import math
from typing import Any


def grow_qwen2(small: Any, *, hidden_size: int, num_heads: int, intermediate_size: int, num_layers: int,
               seed: int = 0) -> Any:
    """A Qwen2ForCausalLM of the given size that computes what ``small`` computes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sc = small.config
    h, hd = sc.hidden_size, sc.hidden_size // sc.num_attention_heads
    if hidden_size < h or intermediate_size < sc.intermediate_size or num_layers < sc.num_hidden_layers:
        raise ValueError("grow_qwen2: the new model must be at least as large in every dimension")
    if sc.num_key_value_heads != sc.num_attention_heads or hidden_size % num_heads or hidden_size // num_heads != hd:
        raise ValueError(f"grow_qwen2: needs multi-head attention (no GQA) and the same head_dim {hd}")
    cfg = Qwen2Config(**{**sc.to_dict(), "hidden_size": hidden_size, "num_attention_heads": num_heads,
                         "num_key_value_heads": num_heads, "intermediate_size": intermediate_size,
                         "num_hidden_layers": num_layers, "rms_norm_eps": sc.rms_norm_eps * h / hidden_size,
                         "layer_types": None})
    torch.manual_seed(seed)
    big = Qwen2ForCausalLM(cfg).to(small.dtype)
    scale = math.sqrt(h / hidden_size)
    sp, bp = dict(small.named_parameters()), dict(big.named_parameters())
    with torch.no_grad():
        for name, b in bp.items():
            s = sp.get(name)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                b.zero_()  # writes into the residual stream: only the old block, below
            if s is None:
                continue  # a new layer: random reads, zero writes
            if name.endswith("norm.weight"):
                b.fill_(scale)
                b[:h] = s * scale
            elif name.endswith("embed_tokens.weight"):
                b.zero_()
                b[:, :h] = s
            elif s.dim() == 2:
                b[:s.shape[0], :s.shape[1]] = s  # new columns read the new dims, which stay zero
            else:
                b[:s.shape[0]] = s
    return big
