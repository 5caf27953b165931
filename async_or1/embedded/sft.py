"""Warm start of the tiny model: a short supervised run on the teacher's worked solutions.

Loss only on response tokens, prompts through the chat template exactly as RL will send
them. With ``eval_every`` > 0 the run samples held-out accuracy (temperature 1) as it goes and
stops as soon as it reaches ``stop_accuracy``; with 0 (the embedded default) it takes exactly
``max_steps``: a stop on a noisy sampled accuracy makes the step count, and so the model, a
matter of luck. The budget is sized so that the student lands near its teacher (it knows the
format and the procedure and inherits the slips), which is the headroom RL removes.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from async_or1.embedded import task
from async_or1.embedded.sampling import correct_flags


@dataclass(frozen=True)
class SFTParams:
    max_steps: int = 1200             # 800 (v1): loss 0.17, held-out 0.26, RL +19 to +25 in 150 steps
    batch_size: int = 32
    lr: float = 3e-3                  # 6e-3 leads at step 300 (loss 0.63 vs 0.78), ends worse (0.31 vs 0.17, held-out 0.12)
    warmup_steps: int = 50
    min_lr_frac: float = 0.1          # cosine decay to this fraction of lr at max_steps
    noise: float = 0.25               # teacher slip probability per step (task.worked_solution)
    eval_every: int = 0               # sampled held-out accuracy every this many steps (0: none, fixed budget)
    eval_problems: int = 100
    log_every: int = 100              # mean training loss recorded every this many steps (report loss_curve)
    stop_accuracy: float = 0.5        # stop once held-out accuracy at temperature 1 reaches this
    max_new_tokens: int = 64


def encode_example(tok: Any, prompt_ids: list[int], solution: str) -> tuple[list[int], list[int]]:
    return prompt_ids, tok.encode(solution, add_special_tokens=False) + [tok.eos_token_id]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ids [B, T] and labels [B, T] (-100 outside the response)."""
    import torch

    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        seq = p + r
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(r)
    return ids, labels


def accuracy(model: Any, tok: Any, prompts: list[list[int]], golds: list[str], *, seed: int, max_new_tokens: int,
             temperature: float = 1.0, chunk: int = 256) -> float:
    """Fraction of held-out prompts answered right (one sample each; ``\\boxed{}`` after ``</think>``)."""
    import torch

    was_training = model.training
    model.eval()
    ok = sum(correct_flags(model, tok, prompts, golds, generator=torch.Generator().manual_seed(seed),
                           max_new_tokens=max_new_tokens, temperature=temperature, chunk=chunk))
    model.train(was_training)
    return ok / max(1, len(prompts))


def lr_at(step: int, p: SFTParams) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` down to ``min_lr_frac * lr`` at
    ``max_steps``: lr · min(1, s/W) · (f + (1 − f) · ½(1 + cos(π s/S)))."""
    warm = min(1.0, step / max(1, p.warmup_steps))
    return p.lr * warm * (p.min_lr_frac + (1 - p.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * step / p.max_steps)))


def train_sft(model: Any, tok: Any, encode: Callable[[task.ArithProblem], list[int]],
              draw: Callable[[random.Random], task.ArithProblem], heldout: list[task.ArithProblem],
              params: SFTParams, seed: int, log: Callable[[str], None] = print,
              solution: Callable[[Any, random.Random, float], str] = task.worked_solution) -> dict:
    """Train in place; returns a report {steps, curve: [(step, heldout_acc)], loss_curve: [(step, mean
    loss over the last log_every)], final_accuracy, seconds}. ``solution(problem, rng, noise)`` writes
    the teacher's response after ``<think>\\n``."""
    import torch

    from async_or1.progress import bar

    torch.manual_seed(seed)
    data_rng = random.Random(seed * 7919 + 1)
    noise_rng = random.Random(seed * 7919 + 2)
    ev = heldout[:params.eval_problems]
    ev_prompts = [encode(p) for p in ev]
    ev_golds = [str(p.answer()) for p in ev]
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    curve: list[tuple[int, float]] = []
    loss_curve: list[tuple[int, float]] = []
    window: list[float] = []
    t0 = time.time()
    step = 0
    acc = 0.0
    with bar(params.max_steps, "[embedded] SFT", unit="step") as pb:
        while step < params.max_steps:
            step += 1
            batch = []
            for _ in range(params.batch_size):
                p = draw(data_rng)
                batch.append(encode_example(tok, encode(p), solution(p, noise_rng, params.noise)))
            ids, labels = collate(batch, tok.pad_token_id)                 # [B, T], [B, T]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, params)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            window.append(loss.item())
            pb.update(1)
            if step % params.log_every == 0 or step == params.max_steps:
                loss_curve.append((step, round(sum(window) / len(window), 4)))
                window = []
                pb.set_postfix_str(f"loss {loss_curve[-1][1]:.3f}")
            if params.eval_every and (step % params.eval_every == 0 or step == params.max_steps):
                acc = accuracy(model, tok, ev_prompts, ev_golds, seed=seed, max_new_tokens=params.max_new_tokens)
                curve.append((step, acc))
                log(f"  sft step {step}/{params.max_steps}  loss {loss.item():.3f}  held-out accuracy (T=1) "
                    f"{acc:.2f}  {time.time() - t0:.0f}s")
                if acc >= params.stop_accuracy:
                    log(f"  sft stopped: held-out accuracy {acc:.2f} >= {params.stop_accuracy}")
                    break
    model.eval()
    return {"steps": step, "curve": curve, "loss_curve": loss_curve, "final_accuracy": acc,
            "seconds": round(time.time() - t0, 1)}
