"""Rows in the Skywork-OR1-RL-Data layout, loaded from parquet or JSONL into ``Problem``s.

A row: ``data_source``, ``prompt`` (chat messages), ``ability`` (math | code),
``reward_model.ground_truth`` (a JSON string: a list of gold answers for math; for code a
dict ``{inputs, outputs, fn_name?}`` or a list of assert strings), ``extra_info.model_difficulty``.

Every problem with a row names the file, the row (1-based: the JSONL line, the parquet
row) and the field. A key whose value is null counts as absent: the reference code took
``fn_name: null`` for present and sent stdin/stdout problems to the call-based tester.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

ROLES = ("system", "user", "assistant")
ABILITIES = ("math", "code")
# R1-distill's recommended instruction for math prompts.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class RowError(ValueError):
    """A row that cannot be used; ``field`` is the dotted field, ``reason`` a short tag for counting."""

    def __init__(self, where: str, field_name: str, message: str, reason: str = "invalid") -> None:
        super().__init__(f"{where}: field '{field_name}': {message}")
        self.where, self.field, self.reason = where, field_name, reason


@dataclass
class Problem:
    uid: str
    prompt: list[dict]                  # chat messages [{role, content}]
    ability: str                        # "math" | "code"
    ground_truth: Any                   # math: list[str]; code: {inputs, outputs, fn_name?} | list[str]
    data_source: str
    difficulty: dict = field(default_factory=dict)   # extra_info.model_difficulty: model name -> correct count


# ---------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------

def iter_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row) of a .jsonl/.json-lines or .parquet file. A JSONL line that
    is not JSON is yielded as a RowError so that skip mode can count it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
        return
    with p.open("r", encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, RowError(f"{p}:{i}", "<line>", f"not valid JSON: {e.msg}", reason="not_json")


def write_rows(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL or parquet (by extension); returns the count. Written to a temp
    name and renamed, so a crash never leaves half a file under the final name."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    rows = list(rows)
    if p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        with tmp.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return len(rows)


# ---------------------------------------------------------------------------
# one row -> Problem
# ---------------------------------------------------------------------------

def _get(d: Any, key: str) -> Any:
    """d[key], with null treated as absent."""
    return d.get(key) if isinstance(d, dict) else None


def parse_messages(value: Any, where: str, field_name: str = "prompt") -> list[dict]:
    if hasattr(value, "tolist"):            # numpy arrays from some parquet readers
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise RowError(where, field_name, f"expected a non-empty list of chat messages, got {type(value).__name__}",
                       reason="bad_prompt")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(where, f"{field_name}[{j}]", "expected a {role, content} mapping", reason="bad_prompt")
        role, content = _get(m, "role"), _get(m, "content")
        if role not in ROLES:
            raise RowError(where, f"{field_name}[{j}].role", f"expected one of {list(ROLES)}, got {role!r}",
                           reason="bad_prompt")
        if not isinstance(content, str):
            raise RowError(where, f"{field_name}[{j}].content", f"expected a string, got {type(content).__name__}",
                           reason="bad_prompt")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise RowError(where, f"{field_name}[{len(out) - 1}].role", "the last message must be the user's",
                       reason="bad_prompt")
    return out


def _decode_json(raw: Any, where: str, fld: str) -> tuple[Any, bool]:
    """(value, was_json). Non-string raw values are taken as already decoded."""
    if not isinstance(raw, str):
        return raw, True
    try:
        return json.loads(raw), True
    except json.JSONDecodeError:
        return raw, False


def parse_math_gold(raw: Any, where: str) -> list[str]:
    fld = "reward_model.ground_truth"
    value, _ = _decode_json(raw, where, fld)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]                                   # a bare gold answer
    if not isinstance(value, list) or not value:
        raise RowError(where, fld, f"math gold must be a non-empty list of answers, got {raw!r:.80}",
                       reason="bad_ground_truth")
    golds = []
    for g in value:
        if isinstance(g, bool) or not isinstance(g, (str, int, float)) or (isinstance(g, str) and not g.strip()):
            raise RowError(where, fld, f"math gold answers must be non-empty strings or numbers, got {g!r:.80}",
                           reason="bad_ground_truth")
        golds.append(str(g))
    return golds


def parse_code_tests(raw: Any, where: str) -> Any:
    fld = "reward_model.ground_truth"
    value, was_json = _decode_json(raw, where, fld)
    if not was_json:
        raise RowError(where, fld, "code tests must be a JSON string", reason="bad_ground_truth")
    if isinstance(value, list):
        if not value or not all(isinstance(t, str) and t.strip() for t in value):
            raise RowError(where, fld, "a list of tests must hold non-empty assert strings", reason="bad_ground_truth")
        return list(value)
    if not isinstance(value, dict):
        raise RowError(where, fld, f"code tests must be a dict or a list of asserts, got {type(value).__name__}",
                       reason="bad_ground_truth")
    inputs, outputs = _get(value, "inputs"), _get(value, "outputs")
    if inputs is None or outputs is None:
        missing = "inputs" if inputs is None else "outputs"
        raise RowError(where, f"{fld}.{missing}", "missing or null", reason="bad_ground_truth")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs:
        raise RowError(where, f"{fld}.inputs", "inputs and outputs must be non-empty lists", reason="bad_ground_truth")
    if len(inputs) != len(outputs):
        raise RowError(where, f"{fld}.outputs", f"{len(inputs)} inputs but {len(outputs)} outputs",
                       reason="bad_ground_truth")
    tests: dict = {"inputs": inputs, "outputs": outputs}
    fn_name = _get(value, "fn_name")
    if fn_name is not None:                               # null is absent: a stdin/stdout problem
        if not isinstance(fn_name, str) or not fn_name.strip():
            raise RowError(where, f"{fld}.fn_name", f"expected a function name, got {fn_name!r}",
                           reason="bad_ground_truth")
        tests["fn_name"] = fn_name
    return tests


def parse_difficulty(extra: Any, where: str) -> dict:
    md = _get(extra, "model_difficulty")
    if md is None:
        return {}
    if not isinstance(md, dict):
        raise RowError(where, "extra_info.model_difficulty", "expected a mapping model name -> correct count",
                       reason="bad_difficulty")
    out = {}
    for k, v in md.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or int(v) != v:
            raise RowError(where, f"extra_info.model_difficulty.{k}", f"expected a count >= 0, got {v!r}",
                           reason="bad_difficulty")
        out[str(k)] = int(v)
    return out


def parse_row(row: Any, where: str, uid: str) -> Problem:
    """One row in the training layout -> Problem; RowError names the field."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(where, "<row>", f"expected a mapping, got {type(row).__name__}", reason="not_a_mapping")
    source = _get(row, "data_source")
    if not isinstance(source, str) or not source:
        raise RowError(where, "data_source", f"expected a non-empty string, got {source!r}", reason="bad_data_source")
    prompt = parse_messages(_get(row, "prompt"), where)
    ability = _get(row, "ability")
    if ability not in ABILITIES:
        raise RowError(where, "ability", f"expected one of {list(ABILITIES)}, got {ability!r}", reason="bad_ability")
    rm = _get(row, "reward_model")
    if not isinstance(rm, dict):
        raise RowError(where, "reward_model", "missing or not a mapping", reason="bad_ground_truth")
    raw = _get(rm, "ground_truth")
    if raw is None:
        raise RowError(where, "reward_model.ground_truth", "missing or null", reason="bad_ground_truth")
    gold = parse_math_gold(raw, where) if ability == "math" else parse_code_tests(raw, where)
    extra = _get(row, "extra_info")
    if extra is not None and not isinstance(extra, dict):
        raise RowError(where, "extra_info", "expected a mapping", reason="bad_difficulty")
    return Problem(uid=uid, prompt=prompt, ability=ability, ground_truth=gold, data_source=source,
                   difficulty=parse_difficulty(extra, where))


# ---------------------------------------------------------------------------
# many files
# ---------------------------------------------------------------------------

def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _uid_prefixes(paths: list[Path]) -> list[str]:
    """File name as uid prefix (stable across machines); two inputs with one name are an error."""
    names = [p.name for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two data files share the name {dup[0]!r}: uids (file:row) would collide; rename one")
    return names


def load_problems(paths: str | Path | Iterable[str | Path], on_bad_row: str = "error",
                  abilities: Iterable[str] = ABILITIES) -> tuple[list[Problem], Counter]:
    """Problems of every row, in file order; uid = "<file name>:<row>".

    ``counts``: ``loaded``, ``ability_filtered`` (a valid row of an ability not asked for),
    and in skip mode ``bad_row:<reason>`` per skipped row."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    wanted = set(abilities)
    unknown = wanted - set(ABILITIES)
    if unknown:
        raise ValueError(f"data.abilities: unknown ability {sorted(unknown)[0]!r} (known: {list(ABILITIES)})")
    paths = _as_paths(paths)
    problems: list[Problem] = []
    counts: Counter = Counter()
    for path, prefix in zip(paths, _uid_prefixes(paths)):
        for i, row in iter_rows(path):
            try:
                p = parse_row(row, f"{path}:{i}", f"{prefix}:{i}")
            except RowError as e:
                if on_bad_row == "error":
                    raise
                counts[f"bad_row:{e.reason}"] += 1
                continue
            if p.ability not in wanted:
                counts["ability_filtered"] += 1
                continue
            problems.append(p)
            counts["loaded"] += 1
    return problems, counts


def parse_eval_row(row: Any, where: str, uid: str, instruction: str = MATH_INSTRUCTION) -> Problem:
    """An AIME-style row {problem, answer} (a user message + instruction), or a training-layout row."""
    if isinstance(row, dict) and "prompt" in row and "reward_model" in row:
        return parse_row(row, where, uid)
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(where, "<row>", f"expected a mapping, got {type(row).__name__}", reason="not_a_mapping")
    problem = _get(row, "problem")
    if problem is None:
        problem = _get(row, "question")
    if not isinstance(problem, str) or not problem.strip():
        raise RowError(where, "problem", "missing, null or not a string", reason="bad_prompt")
    answer = _get(row, "answer")
    if answer is None:
        raise RowError(where, "answer", "missing or null", reason="bad_ground_truth")
    content = f"{problem.strip()}\n{instruction}" if instruction else problem.strip()
    source = _get(row, "data_source") or _get(row, "source") or "eval"
    return Problem(uid=uid, prompt=[{"role": "user", "content": content}], ability="math",
                   ground_truth=parse_math_gold(json.dumps([str(answer)]), where), data_source=str(source),
                   difficulty={})


def load_eval_problems(paths: str | Path | Iterable[str | Path], instruction: str = MATH_INSTRUCTION) -> list[Problem]:
    """Evaluation problems: AIME-style rows or training-layout rows; any bad row is an error."""
    paths = _as_paths(paths)
    out = []
    for path, prefix in zip(paths, _uid_prefixes(paths)):
        for i, row in iter_rows(path):
            out.append(parse_eval_row(row, f"{path}:{i}", f"{prefix}:{i}", instruction))
    return out


def problem_to_row(p: Problem, index: int | None = None) -> dict:
    """A Problem back in the training layout (ground truth re-encoded as a JSON string)."""
    extra: dict = {"model_difficulty": dict(p.difficulty)}
    if index is not None:
        extra["index"] = index
    return {"data_source": p.data_source, "prompt": [dict(m) for m in p.prompt], "ability": p.ability,
            "reward_model": {"ground_truth": json.dumps(p.ground_truth), "style": "rule"}, "extra_info": extra}
