"""Prompts through the model's own chat template, with the generation prompt.

R1-distill templates end the generation prompt with ``<think>\\n`` so the response starts
inside the reasoning; the reward then reads the text after ``</think>``. Using the
model's template (never a hand-written one) keeps training prompts identical to what the
model saw in its own fine-tuning.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable


class TemplateError(ValueError):
    pass


def _ids(out: Any) -> list[int]:
    """apply_chat_template returns a list, or (transformers 5 with return_dict) a BatchEncoding."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):          # a batch of one
        if len(out) != 1:
            raise TemplateError(f"expected one prompt, got a batch of {len(out)}")
        out = out[0]
    return [int(t) for t in out]


def _check(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise TemplateError(f"tokenizer {name!r} has no chat_template; RL prompts must go through the model's own "
                            "template (set one in its tokenizer_config.json / chat_template.jinja)")


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The prompt text, generation prompt included."""
    _check(tokenizer)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of the prompt through the chat template, generation prompt included."""
    _check(tokenizer)
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except TypeError:                             # older transformers: no return_dict argument
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return _ids(out)


def opens_reasoning(tokenizer: Any) -> bool:
    """Whether the generation prompt opens a ``<think>`` block (R1-distill style)."""
    text = render_prompt(tokenizer, [{"role": "user", "content": "x"}])
    return text.rstrip().endswith("<think>")


def encode_problems(tokenizer: Any, problems: Iterable[Any], max_prompt_tokens: int) -> tuple[dict[str, list[int]],
                                                                                             list[Any], Counter]:
    """Encode every problem's prompt once. Returns (uid -> ids, kept problems, counts); a prompt
    longer than ``max_prompt_tokens`` is dropped and counted as ``prompt_too_long``."""
    ids: dict[str, list[int]] = {}
    kept, counts = [], Counter()
    for p in problems:
        t = encode_prompt(tokenizer, p.prompt)
        if len(t) > max_prompt_tokens:
            counts["prompt_too_long"] += 1
            continue
        ids[p.uid] = t
        kept.append(p)
        counts["encoded"] += 1
    return ids, kept, counts
