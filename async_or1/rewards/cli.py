"""``async-or1 reward math|code --jsonl F``: score JSONL rows, one JSON line out per row in.

math rows ``{"id", "response", "gold"}`` (gold: a string/number or a list of them) ->
    ``{"id", "correct", "reason", "seconds"}``
code rows ``{"id", "response", "tests"}`` (tests: see ``rewards.code``) ->
    ``{"id", "passed", "passed_tests", "total_tests", "reason", "seconds"}``

Every non-blank input line gets exactly one output line, in order, however hostile the solution.
A malformed line gets the same keys with a failing verdict plus ``"line"`` and ``"error"`` naming
the line and the problem. For code, the sandbox's self-check comes first (one stderr line saying
what it measured); with less isolation than ``--isolation`` nothing runs. Exit status 0, or 2 when
the file cannot be read or the sandbox refuses.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

from async_or1.rewards.code import prepare_tests
from async_or1.rewards.math import normalize_gold
from async_or1.rewards.pool import RewardPool, RewardResult
from async_or1.rewards.sandbox import SandboxUnavailable, probe

CHUNK_ROWS = 256
_TRUTH_FIELD = {"math": "gold", "code": "tests"}


class RowError(ValueError):
    pass


def parse_row(kind: str, raw: bytes, lineno: int) -> tuple[Any, Any, Any]:
    """(id, response, ground truth) of one line, or RowError naming the line and the problem."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RowError(f"line {lineno}: not UTF-8: {e}") from None
    except ValueError as e:
        raise RowError(f"line {lineno}: bad JSON: {e}") from None
    if not isinstance(row, dict):
        raise RowError(f"line {lineno}: a row must be a JSON object, got {type(row).__name__}")
    truth_field = _TRUTH_FIELD[kind]
    for name in ("id", "response", truth_field):
        if name not in row:
            raise RowError(f"line {lineno}: missing field {name!r}")
    row_id = row["id"]
    if isinstance(row_id, (dict, list)):
        raise RowError(f"line {lineno}: field 'id' must be a string or number, got {type(row_id).__name__}")
    if not isinstance(row["response"], str):
        raise RowError(f"line {lineno}: field 'response' must be a string, got {type(row['response']).__name__}")
    truth = row[truth_field]
    try:
        if kind == "math":
            truth = normalize_gold(truth)
        else:
            prepare_tests(truth)  # validation only: the pool prepares the tests again
    except ValueError as e:  # BadTests included
        raise RowError(f"line {lineno}: field {truth_field!r}: {e}") from None
    return row_id, row["response"], truth


def _out_row(kind: str, row_id: Any, r: RewardResult) -> dict:
    if kind == "math":
        return {"id": row_id, "correct": r.correct, "reason": r.reason, "seconds": round(r.seconds, 4)}
    return {"id": row_id, "passed": r.correct, "passed_tests": int(r.details.get("passed_tests", 0)),
            "total_tests": int(r.details.get("total_tests", 0)), "reason": r.reason, "seconds": round(r.seconds, 4)}


def _safe_id(raw: bytes) -> Any:
    try:
        row = json.loads(raw.decode("utf-8"))
        rid = row.get("id") if isinstance(row, dict) else None
        return rid if not isinstance(rid, (dict, list)) else None
    except (ValueError, UnicodeDecodeError):
        return None


def _flush(kind: str, pool: RewardPool, batch: list[tuple[int, Any, Any]]) -> None:
    items = [item for _, _, item in batch if not isinstance(item, RowError)]
    scored = iter(pool.score([(kind, resp, truth) for resp, truth in items]) if items else [])
    for lineno, row_id, item in batch:
        if isinstance(item, RowError):
            out = _out_row(kind, row_id, RewardResult(0.0, False, str(item), 0.0))
            out.update(line=lineno, error=str(item))
        else:
            out = _out_row(kind, row_id, next(scored))
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def probe_main(isolation: str) -> int:
    """``async-or1 reward code --probe``: the sandbox self-check as one JSON object; 2 when it falls short."""
    report = probe(isolation)
    print(json.dumps({**asdict(report), "shortfall": report.shortfall()}))
    return 0 if report.shortfall() is None else 2


def main(kind: str, jsonl_path: str, workers: int = 2, timeout_s: float = 10.0, require_think: bool = True,
         isolation: str = "namespaces") -> int:
    if kind not in _TRUTH_FIELD:
        print(f"async-or1 reward: unknown kind {kind!r} (math or code)", file=sys.stderr)
        return 2
    try:
        f = open(jsonl_path, "rb")
    except OSError as e:
        print(f"async-or1 reward: cannot read {jsonl_path}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        with f, RewardPool(workers=workers, math_timeout_s=timeout_s, code_timeout_s=timeout_s,
                           require_think=require_think, code_isolation=isolation) as pool:
            if kind == "code":
                print(f"async-or1 reward: code sandbox: {pool.sandbox().summary()}", file=sys.stderr)
            batch: list[tuple[int, Any, Any]] = []
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row_id, response, truth = parse_row(kind, raw, lineno)
                    batch.append((lineno, row_id, (response, truth)))
                except RowError as e:
                    batch.append((lineno, _safe_id(raw), e))
                if len(batch) >= CHUNK_ROWS:
                    _flush(kind, pool, batch)
                    batch = []
            if batch:
                _flush(kind, pool, batch)
    except SandboxUnavailable as e:
        print(f"async-or1 reward: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # stdout closed by the reader (e.g. piped into head)
            return 0
        print(f"async-or1 reward: error reading {jsonl_path}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0
