"""Everything the data must satisfy, checked in one place before anything expensive starts.

The launcher calls ``check_model`` and ``prepare`` before it spawns a process (a bad row is one
line naming file, row and field, exit status 2); learner rank 0 calls ``prepare`` again with the
same inputs to get the same problems and prompt token ids (deterministic), so a multi-node run
started with ``--role learner`` is checked the same way.

``prepare`` = load rows (strict or ``skip``, counted) → ability filter → offline difficulty
filter → prompts through the model's chat template → drop prompts over ``max_prompt_tokens``
(counted as ``prompt_too_long``). An empty result is an error naming the counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence


class DataError(ValueError):
    """Data, tokenizer or model files that cannot be used; the message is the whole story."""


@dataclass
class Prepared:
    problems: list                                   # data.rows.Problem, in load order
    token_ids: dict = field(default_factory=dict)    # uid -> prompt token ids (chat template applied)
    counts: Counter = field(default_factory=Counter)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError… for a bad directory
        raise DataError(f"{path}: cannot load a tokenizer: {type(e).__name__}: {e}") from None


def check_model(model_path: str, tokenizer: Any) -> dict:
    """The model's config loads, its vocabulary holds every tokenizer id, the chat template works
    and a stop token exists. Returns {vocab_size, stop_ids, positions} (positions:
    max_position_embeddings, or None)."""
    from transformers import AutoConfig

    from async_or1.generation.text import stop_token_ids
    from async_or1.data.template import TemplateError, encode_prompt

    try:
        mc = AutoConfig.from_pretrained(model_path)
    except Exception as e:
        raise DataError(f"{model_path}: cannot load the model config (config.json): {type(e).__name__}: {e}") from None
    vocab = getattr(mc, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        raise DataError(f"{model_path}/config.json: field 'vocab_size': expected a positive integer, got {vocab!r}")
    n_tok = len(tokenizer)
    if n_tok > vocab:
        raise DataError(f"{model_path}: the tokenizer has {n_tok} tokens but config.json's vocab_size is {vocab}: "
                        "token ids past the embedding would crash the engines")
    try:
        encode_prompt(tokenizer, [{"role": "user", "content": "1+1"}])
    except TemplateError as e:
        raise DataError(str(e)) from None
    try:
        stops = stop_token_ids(tokenizer, model_path)
    except ValueError as e:
        raise DataError(str(e)) from None
    positions = getattr(mc, "max_position_embeddings", None)
    return {"vocab_size": vocab, "stop_ids": stops, "positions": positions if isinstance(positions, int) else None}


def check_fits(data: Prepared, positions: int | None, max_response_tokens: int, what: str) -> None:
    """The longest kept prompt plus the longest response must fit the model's positions (SGLang
    refuses a longer context; past it a model was never trained)."""
    if positions is None or not data.token_ids:
        return
    uid, ids = max(data.token_ids.items(), key=lambda kv: len(kv[1]))
    if len(ids) + max_response_tokens > positions:
        raise DataError(f"{what} row {uid}: a prompt of {len(ids)} tokens + max_response_tokens {max_response_tokens} "
                        f"exceeds the model's max_position_embeddings {positions} (lower data.max_prompt_tokens or the "
                        "response budget)")


def encode_all(tokenizer: Any, problems: Sequence[Any], max_prompt_tokens: int, counts: Counter) -> Prepared:
    from async_or1.data.template import TemplateError, encode_problems

    try:
        ids, kept, c = encode_problems(tokenizer, problems, max_prompt_tokens)
    except TemplateError as e:
        raise DataError(str(e)) from None
    counts.update(c)
    return Prepared(kept, ids, counts)


def prepare(files: Sequence[str], tokenizer: Any, *, max_prompt_tokens: int, on_bad_row: str = "error",
            abilities: Sequence[str] = ("math", "code"), difficulty_model: str = "",
            difficulty_n: int = 16) -> Prepared:
    """Training problems with their prompt ids; see the module docstring."""
    from async_or1.data.rows import RowError, load_problems

    try:
        problems, counts = load_problems(files, on_bad_row=on_bad_row, abilities=tuple(abilities))
    except (RowError, FileNotFoundError) as e:
        raise DataError(str(e)) from None
    except ValueError as e:       # duplicate file names, unknown abilities
        raise DataError(f"data: {e}") from None
    if difficulty_model:
        from async_or1.data.filter import filter_by_difficulty

        try:
            problems, dcounts = filter_by_difficulty(problems, difficulty_model, difficulty_n)
        except ValueError as e:
            raise DataError(str(e)) from None
        counts.update({f"difficulty_{k}": v for k, v in dcounts.items()})
    out = encode_all(tokenizer, problems, max_prompt_tokens, counts)
    if not out.problems:
        raise DataError(f"no training problem left in {', '.join(map(str, files))} ({dict(counts)})")
    return out


def prepare_eval(files: Sequence[str], tokenizer: Any, *, max_prompt_tokens: int, max_problems: int = 0) -> Prepared:
    """Held-out problems (training or AIME-style rows, every row must parse), the first
    ``max_problems`` (0: all), prompts over ``max_prompt_tokens`` dropped and counted."""
    from async_or1.data.rows import RowError, load_eval_problems

    try:
        problems = load_eval_problems(files)
    except (RowError, FileNotFoundError) as e:
        raise DataError(str(e)) from None
    except ValueError as e:
        raise DataError(f"eval data: {e}") from None
    if max_problems:
        problems = problems[:max_problems]
    out = encode_all(tokenizer, problems, max_prompt_tokens, Counter(loaded=len(problems)))
    if not out.problems:
        raise DataError(f"no evaluation problem left in {', '.join(map(str, files))} ({dict(out.counts)})")
    return out
