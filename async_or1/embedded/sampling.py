"""Batched sampling with a KV cache for the build's held-out checks (plain torch, no engine).

The generators use async_or1.generation; this small loop exists so that building the
embedded model depends on nothing but transformers.
"""

from __future__ import annotations

import inspect
import re

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_after_think(text: str) -> str | None:
    """The last ``\\boxed{}`` content after ``</think>`` (None if the reasoning never closed)."""
    if "</think>" not in text:
        return None
    found = BOXED.findall(text.split("</think>")[-1])
    return found[-1].strip() if found else None


def left_pad(prompts: list[list[int]], pad_id: int):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)       # [B, P]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)             # [B, P]
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def cache_kwarg(model) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; a wrong name is silently ignored
    (every decode step would then see one token of context), so ask the signature."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(res):
    c = getattr(res, "cache", None)
    return c if c is not None else getattr(res, "past_key_values", None)


def sample(model, prompts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
           temperature: float = 1.0, generator=None, greedy: bool = False):
    """Sample one response per prompt. Returns (tokens [B, L] with pad after eos, lengths [B],
    logprobs [B, L] of the sampled tokens under the temperature-scaled distribution)."""
    import torch

    cache_kw = cache_kwarg(model)
    ids, mask = left_pad(prompts, pad_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                                # [B, P]
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool)
    out_tok, out_lp = [], []
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, logits = _cache_of(res), res.logits[:, -1].float()            # [B, V]
        last_pos = pos[:, -1:]
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(logits / max(temperature, 1e-6), -1)    # [B, V]
            if greedy:
                nxt = logp.argmax(-1)
            else:
                nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            lp = logp.gather(-1, nxt[:, None]).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out_tok.append(nxt)
            out_lp.append(torch.where(done, torch.zeros_like(lp), lp))
            done = done | (nxt == eos_id)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], -1)
            last_pos = last_pos + 1
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos, use_cache=True,
                        **{cache_kw: past})
            past, logits = _cache_of(res), res.logits[:, -1].float()
    tokens = torch.stack(out_tok, 1)                                         # [B, L]
    logprobs = torch.stack(out_lp, 1)                                        # [B, L]
    is_eos = tokens == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full((B,), tokens.shape[1]))
    return tokens, first, logprobs


def correct_flags(model, tok, prompts: list[list[int]], golds: list[str], *, generator, max_new_tokens: int,
                  temperature: float = 1.0, chunk: int = 256) -> list[bool]:
    """One sample per prompt, in chunks of ``chunk``: is its ``\\boxed{}`` after ``</think>`` the gold?"""
    flags: list[bool] = []
    for i in range(0, len(prompts), chunk):
        toks, lens, _ = sample(model, prompts[i:i + chunk], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                               max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
        for j in range(toks.shape[0]):
            text = tok.decode(toks[j, :int(lens[j])].tolist(), skip_special_tokens=False)
            flags.append(boxed_after_think(text) == golds[i + j])
    return flags
