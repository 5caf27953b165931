"""The running batch of the torch engine: slots, per-row sampling state, outputs, admission.

Rows are sequence slots over one ``SlotKV`` (see torch_kv). A newcomer is prefilled alone (with the
other newcomers of the same admission) in its own small cache, its first token sampled from the
prefill logits, and its KV copied into a free row ending at the shared column ``n``; when its prompt
is longer than ``n`` the whole cache is first re-laid with more left padding. Finished rows free
their slot at once, so one long response never idles the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from async_or1.generation.torch_kv import SlotKV, decode_mask, prefill_mask, relayout
from async_or1.generation.torch_sampling import sample, uniforms

# Per-row state tensors, all [R] (``stop`` is [R, S]); reordered together on every relayout.
_ROW_FIELDS = ("start", "last_tok", "gen_len", "max_new", "key", "temp", "top_p", "top_k", "active", "stop",
               "out_tok", "out_lp", "out_ver")


@dataclass
class Admit:
    """One request ready to enter (already validated and normalised by the engine)."""

    index: int                 # position in the generate() request list
    prompt: list[int]
    max_new: int
    key: int                   # sampling stream key (torch_sampling.request_key)
    temp: float
    top_p: float
    top_k: int
    stop: list[int]


@dataclass
class Finished:
    index: int
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    reason: str


class RunningBatch:
    def __init__(self, forward: Callable[..., torch.Tensor], dtype: torch.dtype, device: torch.device,
                 max_rows: int, max_len: int, n_stop: int) -> None:
        self.forward = forward           # forward(ids [B, q], mask [B,1,q,kv], pos [B, q], cache, last_only) -> [B, V]
        self.dtype, self.device = dtype, device
        self.max_rows, self.max_len, self.n_stop = max_rows, max_len, max(1, n_stop)
        self.kv = SlotKV()
        self.n = 0
        self.index: list[int] = []       # request index per row, -1 when free
        self._set_rows(0)
        self.relayouts = 0

    # ---- row state -------------------------------------------------------------------------
    def _set_rows(self, r: int) -> None:
        d, L = self.device, self.max_len
        self.start = torch.zeros(r, dtype=torch.long, device=d)
        self.last_tok = torch.zeros(r, dtype=torch.long, device=d)
        self.gen_len = torch.zeros(r, dtype=torch.long, device=d)
        self.max_new = torch.ones(r, dtype=torch.long, device=d)
        self.key = torch.zeros(r, dtype=torch.long, device=d)
        self.temp = torch.ones(r, dtype=torch.float32, device=d)
        self.top_p = torch.ones(r, dtype=torch.float32, device=d)
        self.top_k = torch.zeros(r, dtype=torch.long, device=d)
        self.active = torch.zeros(r, dtype=torch.bool, device=d)
        self.stop = torch.full((r, self.n_stop), -1, dtype=torch.long, device=d)
        self.out_tok = torch.zeros(r, L, dtype=torch.long, device=d)
        self.out_lp = torch.zeros(r, L, dtype=torch.float32, device=d)
        self.out_ver = torch.zeros(r, L, dtype=torch.int32, device=d)
        self.index = [-1] * r

    @property
    def rows(self) -> int:
        return len(self.index)

    @property
    def n_active(self) -> int:
        return sum(1 for i in self.index if i >= 0)

    def free_rows(self) -> list[int]:
        return [r for r, i in enumerate(self.index) if i < 0]

    # ---- reshaping -------------------------------------------------------------------------
    def _relayout(self, keep: list[int], n_rows: int, min_n: int, extra_cols: int) -> None:
        """Rebuild every buffer: keep rows ``keep`` (in order) plus new free rows up to ``n_rows``,
        drop the common left padding of the active rows, left-pad so that ``n >= min_n``, and leave
        room for ``extra_cols`` more columns (plus growth headroom so this stays rare)."""
        active_starts = [int(self.start[r]) for r in keep if self.index[r] >= 0]
        drop = min(active_starts) if active_starts else self.n
        width = self.n - drop
        pad = max(0, min_n - width)
        new_n = width + pad
        capacity = new_n + max(extra_cols, 64, new_n)
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
        if self.kv.keys:
            self.kv.keys = [relayout(k, keep_t, n_rows, drop, self.n, pad, capacity) for k in self.kv.keys]
            self.kv.values = [relayout(v, keep_t, n_rows, drop, self.n, pad, capacity) for v in self.kv.values]
        old = {f: getattr(self, f) for f in _ROW_FIELDS}
        old_index = self.index
        self._set_rows(n_rows)
        for f in _ROW_FIELDS:
            getattr(self, f)[:len(keep)] = old[f].index_select(0, keep_t)
        self.index = [old_index[r] for r in keep] + [-1] * (n_rows - len(keep))
        self.start[:len(keep)] += pad - drop
        self.n = new_n
        free = torch.tensor([i < 0 for i in self.index], dtype=torch.bool, device=self.device)
        self.start[free] = new_n  # a free row sees only the column it writes next
        self.kv.n = new_n
        self.relayouts += 1

    def shrink_if_sparse(self) -> None:
        """Drop free rows when at most half the rows work (called when no request waits)."""
        live = [r for r, i in enumerate(self.index) if i >= 0]
        if self.rows > 8 and len(live) <= self.rows // 2:
            self._relayout(live, len(live), 0, 1)

    def reserve_step(self) -> None:
        if self.kv.keys and self.n + 1 > self.kv.capacity:
            self._relayout(list(range(self.rows)), self.rows, 0, 1)

    def fit(self, max_new: int, n_stop: int) -> None:
        """Widen the per-row output and stop buffers for a request that joins later (continuous
        leasing) with a longer ``max_new`` or more stop tokens than the batch was built for."""
        if max_new > self.max_len:
            extra = max_new - self.max_len
            self.out_tok = torch.nn.functional.pad(self.out_tok, (0, extra))
            self.out_lp = torch.nn.functional.pad(self.out_lp, (0, extra))
            self.out_ver = torch.nn.functional.pad(self.out_ver, (0, extra))
            self.max_len = max_new
        if n_stop > self.n_stop:
            self.stop = torch.nn.functional.pad(self.stop, (0, n_stop - self.n_stop), value=-1)
            self.n_stop = n_stop

    # ---- admission ---------------------------------------------------------------------------
    def admit(self, items: list[Admit], version: int) -> list[Finished]:
        """Prefill ``items`` together, sample their first tokens, and seat them in free rows.
        Returns the requests that finished on their first token (they take no row)."""
        k = len(items)
        lens = torch.tensor([len(a.prompt) for a in items], dtype=torch.long, device=self.device)
        p = int(lens.max())
        pad = p - lens  # [k]
        ids = torch.zeros(k, p, dtype=torch.long, device=self.device)
        for i, a in enumerate(items):
            ids[i, p - len(a.prompt):] = torch.tensor(a.prompt, dtype=torch.long)
        pos = (torch.arange(p, device=self.device).unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # [k, P]
        cache = SlotKV(capacity=p)
        logits = self.forward(ids, prefill_mask(pad, p, self.dtype), pos, cache, True)  # [k, V]
        keys = torch.tensor([a.key for a in items], dtype=torch.long, device=self.device)
        tok, lp = sample(logits, torch.tensor([a.temp for a in items], device=self.device),
                         torch.tensor([a.top_p for a in items], device=self.device),
                         torch.tensor([a.top_k for a in items], dtype=torch.long, device=self.device),
                         uniforms(keys, torch.zeros(k, dtype=torch.long, device=self.device)))
        done, seat = [], []
        for i, a in enumerate(items):
            t = int(tok[i])
            if a.max_new <= 1 or t in a.stop:
                done.append(Finished(a.index, [t], [float(lp[i])], [version], "stop" if t in a.stop else "length"))
            else:
                seat.append(i)
        if seat:
            self._seat([items[i] for i in seat], seat, cache, p, tok, lp, version)
        return done

    def _seat(self, items: list[Admit], which: list[int], cache: SlotKV, p: int, tok: torch.Tensor,
              lp: torch.Tensor, version: int) -> None:
        free = self.free_rows()
        need_rows = self.rows + max(0, len(items) - len(free))
        if need_rows > self.rows or self.n < p or not self.kv.keys or self.n + 1 > self.kv.capacity:
            self._relayout(list(range(self.rows)), need_rows, p, 1)
            if not self.kv.keys:  # first admission: buffers shaped like the prefill cache
                cap = self.n + max(64, self.n)
                self.kv = SlotKV([k.new_zeros(need_rows, k.shape[1], cap, k.shape[3]) for k in cache.keys],
                                 [v.new_zeros(need_rows, v.shape[1], cap, v.shape[3]) for v in cache.values],
                                 n=self.n)
            free = self.free_rows()
        rows = free[:len(items)]
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        src_t = torch.tensor(which, dtype=torch.long, device=self.device)
        for dst, src in zip(self.kv.keys + self.kv.values, cache.keys + cache.values):
            dst[:, :, self.n - p:self.n].index_copy_(0, rows_t, src.index_select(0, src_t)[:, :, :p])
        for r, i, a in zip(rows, which, items):
            self.index[r] = a.index
            self.start[r] = self.n - len(a.prompt)
            self.max_new[r], self.key[r] = a.max_new, a.key
            self.temp[r], self.top_p[r], self.top_k[r] = a.temp, a.top_p, a.top_k
            self.stop[r] = -1
            if a.stop:
                self.stop[r, :len(a.stop)] = torch.tensor(a.stop, dtype=torch.long)
        self.last_tok[rows_t] = tok[src_t]
        self.out_tok[rows_t, 0] = tok[src_t]
        self.out_lp[rows_t, 0] = lp[src_t]
        self.out_ver[rows_t, 0] = version
        self.gen_len[rows_t] = 1
        self.active[rows_t] = True

    # ---- decoding ----------------------------------------------------------------------------
    def step(self, version: int) -> list[Finished]:
        """One decode step for every row; returns the requests that finished with it."""
        self.reserve_step()
        # Attend only from the oldest active row's start: columns left of it are dead for every
        # row, so the common left padding costs nothing between relayouts.
        lo = int(self.start[self.active].min())
        self.kv.n, self.kv.lo = self.n, lo
        pos = (self.n - self.start).clamp(min=0).unsqueeze(1)  # [R, 1]
        logits = self.forward(self.last_tok.unsqueeze(1), decode_mask(self.start, self.n, lo, self.dtype), pos,
                              self.kv, False)  # [R, V]
        self.n += 1
        tok, lp = sample(logits, self.temp, self.top_p, self.top_k, uniforms(self.key, self.gen_len))
        at = self.gen_len.clamp(max=self.max_len - 1).unsqueeze(1)  # [R, 1]
        self.out_tok.scatter_(1, at, tok.unsqueeze(1))
        self.out_lp.scatter_(1, at, lp.unsqueeze(1))
        self.out_ver.scatter_(1, at, torch.full_like(at, version, dtype=torch.int32))
        self.last_tok = tok
        self.gen_len += self.active.long()
        is_stop = (tok.unsqueeze(1) == self.stop).any(dim=1)
        done = self.active & (is_stop | (self.gen_len >= self.max_new))
        if not bool(done.any()):
            return []
        rows = done.nonzero().squeeze(1).tolist()
        return [self._finish(r, "stop" if bool(is_stop[r]) else "length") for r in rows]

    def _finish(self, r: int, reason: str) -> Finished:
        n = int(self.gen_len[r])
        out = Finished(self.index[r], self.out_tok[r, :n].tolist(), self.out_lp[r, :n].tolist(),
                       self.out_ver[r, :n].tolist(), reason)
        self.index[r] = -1
        self.active[r] = False
        self.start[r] = self.n
        return out

    def abort_all(self) -> list[Finished]:
        return [self._finish(r, "aborted") for r, i in enumerate(self.index) if i >= 0]


def take_group(waiting: list[Admit], free: int, token_budget: int) -> list[Admit]:
    """Pop the next newcomers (from the end of ``waiting``) to prefill together: at most ``free``,
    and padded to the longest prompt at most ``token_budget`` tokens (always at least one), which
    bounds the prefill's activations and its [k, 1, P, P] mask."""
    group: list[Admit] = []
    longest = 0
    while waiting and len(group) < free:
        nxt = max(longest, len(waiting[-1].prompt))
        if group and (len(group) + 1) * nxt > token_budget:
            break
        group.append(waiting.pop())
        longest = nxt
    return group


def model_forward(model: Any, use_cache_kw: str, last_only_ok: bool) -> Callable[..., torch.Tensor]:
    """Adapter from the batch's call to a Hugging Face causal LM: returns last-position logits [B, V]."""

    def forward(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: SlotKV, last_only: bool):
        kw = {use_cache_kw: cache, "attention_mask": mask, "position_ids": pos, "use_cache": True}
        if last_only and last_only_ok:
            kw["logits_to_keep"] = 1
        out = model(input_ids=ids, **kw)
        cache.n += ids.shape[1]
        return out.logits[:, -1]

    return forward
