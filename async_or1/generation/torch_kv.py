"""KV storage for continuous batching with Hugging Face models: a slotted, left-padded cache.

Layout: per layer one key and one value buffer ``[R, H_kv, C, D]`` (R rows = sequence slots,
C columns of capacity). Every row's newest token sits in the same column ``n - 1``; a row's real
tokens are columns ``[start[r], n)`` and everything left of ``start[r]`` is padding or junk from the
slot's previous occupant, hidden by the attention mask. One shared write column keeps a decode
step a single batched forward; per-row ``start`` gives per-row positions and masks.

``SlotKV`` is handed to the model as its cache. Transformers 5.24 models call only
``cache.update(key, value, layer_idx, ...)`` when given a ready 4-D mask and ``position_ids``
(checked in ``modeling_qwen2.py`` / ``masking_utils._preprocess_mask_arguments``, which returns a
4-D mask untouched before looking at the cache), so a small object with that method suffices and
writing in place avoids ``DynamicLayer``'s ``torch.cat`` copy of the whole cache every step.

The buffers are allocated with zeros, never ``empty``: a masked position gets exactly zero
attention weight, but ``0 * NaN`` is NaN, so junk must be finite.
"""

from __future__ import annotations

import torch


class SlotKV:
    """The model-facing cache: writes ``q`` new columns at ``n`` in every layer's buffers."""

    def __init__(self, keys: list[torch.Tensor] | None = None, values: list[torch.Tensor] | None = None,
                 n: int = 0, capacity: int = 0) -> None:
        self.keys: list[torch.Tensor] = keys or []
        self.values: list[torch.Tensor] = values or []
        self.n = n
        self.lo = 0  # attention reads columns [lo, n + q): nothing left of every active row's start
        self._capacity = capacity  # used only when buffers are allocated lazily (prefill)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        q = key_states.shape[-2]
        if layer_idx == len(self.keys):  # lazy allocation on the first forward (prefill caches)
            b, h, _, d = key_states.shape
            cap = max(self._capacity, self.n + q)
            self.keys.append(key_states.new_zeros(b, h, cap, d))
            self.values.append(value_states.new_zeros(b, value_states.shape[1], cap, value_states.shape[-1]))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.n + q > k.shape[2]:
            raise RuntimeError(f"torch_kv: writing columns [{self.n}, {self.n + q}) past capacity {k.shape[2]} "
                               f"(layer {layer_idx}); the engine must reserve room before the forward")
        k[:, :, self.n:self.n + q].copy_(key_states)
        v[:, :, self.n:self.n + q].copy_(value_states)
        return k[:, :, self.lo:self.n + q], v[:, :, self.lo:self.n + q]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.n

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0


def relayout(buf: torch.Tensor, keep_rows: torch.Tensor, n_rows: int, col_lo: int, col_hi: int,
             dst_lo: int, capacity: int) -> torch.Tensor:
    """A new ``[n_rows, H, capacity, D]`` buffer holding ``buf[keep_rows, :, col_lo:col_hi]`` at
    rows ``0..len(keep_rows)-1``, columns starting at ``dst_lo``; other rows/columns are zero.

    One copy serves every reshaping: growing capacity, left-padding for a longer newcomer
    (``dst_lo > col_lo``), dropping common left padding (``col_lo > 0``), and dropping free rows."""
    width = col_hi - col_lo
    if dst_lo + width > capacity or len(keep_rows) > n_rows:
        raise ValueError(f"torch_kv.relayout: {len(keep_rows)} rows x {width} columns at {dst_lo} do not fit "
                         f"{n_rows} rows x {capacity} columns")
    out = buf.new_zeros(n_rows, buf.shape[1], capacity, buf.shape[3])
    if len(keep_rows) and width > 0:
        out[:len(keep_rows), :, dst_lo:dst_lo + width] = buf.index_select(0, keep_rows)[:, :, col_lo:col_hi]
    return out


def decode_mask(start: torch.Tensor, n: int, lo: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [R, 1, 1, n + 1 - lo] for one decode step writing column n over the window
    [lo, n]: row r sees [start[r], n]."""
    cols = torch.arange(lo, n + 1, device=start.device)
    allowed = cols.unsqueeze(0) >= start.unsqueeze(1)  # [R, n + 1 - lo]
    return _additive(allowed, dtype).view(len(start), 1, 1, n + 1 - lo)


def prefill_mask(pad: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask [k, 1, P, P] for left-padded prompts (row i has ``pad[i]`` pad columns).

    A pad query row sees nothing real; it is given its own diagonal so its softmax stays finite."""
    idx = torch.arange(length, device=pad.device)
    causal = idx.unsqueeze(1) >= idx.unsqueeze(0)  # [P, P] (query, key)
    real_key = idx.unsqueeze(0) >= pad.unsqueeze(1)  # [k, P]
    allowed = causal.unsqueeze(0) & real_key.unsqueeze(1)  # [k, P, P]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=pad.device).unsqueeze(0)
    return _additive(allowed, dtype).unsqueeze(1)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # finfo.min rather than -inf: exp(min - max) is exactly 0 in float32/bf16, and a fully masked
    # row (never produced here) would still not turn into NaN.
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)
