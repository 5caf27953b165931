"""What generation needs of the tokenizer: the stop ids sampling ends at, and the response text
the verifier reads.

Both the generators and the data/eval side use these; they live here, below ``data/``, so that
``generation/`` never imports upward from a data command (``data`` imports this module).
"""

from __future__ import annotations

from typing import Any


def response_text(tokenizer: Any, tokens: list[int], stop_ids: set[int]) -> str:
    """Decode a response for the verifier: special tokens kept (``</think>`` may be one), the
    trailing stop token dropped."""
    if len(tokens) and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(list(tokens), skip_special_tokens=False)


def stop_token_ids(tokenizer: Any, model_path: str) -> list[int]:
    """The tokenizer's eos plus the model's generation_config eos ids; an error if there is none."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    except OSError:
        pass
    if not ids:
        raise ValueError(f"{model_path}: no eos token in the tokenizer or generation_config; cannot stop sampling")
    return sorted(ids)
