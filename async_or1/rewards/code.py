"""Code rewards after the Skywork-OR1 paper (section 7.2): the last fenced Python block vs the tests.

Test layouts (``ground_truth`` decoded, or a JSON string of it):
  - APPS/TACO ``{"inputs": [...], "outputs": [...]}``: stdin/stdout tests, compared as in
    ``rewards.compare`` (whitespace- and number-format tolerant);
  - the same with ``"fn_name"``: call-based tests — a bare function or a LeetCode-style
    ``class Solution`` method is called with each input's argument list (LiveCodeBench's layout,
    inputs as newline-separated JSON strings, is decoded too); returned values are compared by value;
  - a list of assert strings (or ``{"assert_case": [...]}``): ``assert EXPR == LITERAL`` (either
    side literal) is split: the sandbox evaluates EXPR only and the parent compares it with LITERAL,
    so the program never sees the expected value and cannot answer with an always-equal object.
    Any other assert runs as written inside the sandbox and passes if it does not raise.

Reward 1 only if every test passes. A syntax error (AST check) fails before anything runs.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from async_or1.rewards.compare import returned_value_matches, stdout_equal
from async_or1.rewards.math import extract_final_answer
from async_or1.rewards.sandbox import SandboxRun, execute, require

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


class BadTests(ValueError):
    """The ground truth cannot be turned into tests (a data problem, not the solution's fault)."""


def extract_code(response: str) -> str | None:
    """The last fenced Python block of ``response`` (```python / ```py), or None."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else None


def _as_text(x: Any, what: str) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return str(x)
    if isinstance(x, list) and all(isinstance(v, str) for v in x):
        return "\n".join(x)
    raise BadTests(f"{what} must be a string (or a list of lines), got {type(x).__name__}")


def _split_assert(src: str) -> tuple[dict, Any]:
    """({"expr": ...}, literal) for ``assert EXPR == LITERAL``; ({"stmt": src}, None) otherwise."""
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return {"stmt": src}, None
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert):
        test = tree.body[0].test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
            for expr, lit in ((test.left, test.comparators[0]), (test.comparators[0], test.left)):
                try:
                    value = ast.literal_eval(lit)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    continue
                try:
                    json.dumps(value, allow_nan=True)
                except (TypeError, ValueError):
                    break  # e.g. a set literal: not representable as plain JSON, run it as written
                return {"expr": ast.unparse(expr)}, value
    return {"stmt": src}, None


def prepare_tests(ground_truth: Any) -> tuple[str, list[dict], list[Any], str | None]:
    """(mode, tests for the child, expected values kept in the parent, fn_name)."""
    gt = ground_truth
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except ValueError as e:
            raise BadTests(f"tests are a string but not JSON: {e}") from None
    if isinstance(gt, dict) and "assert_case" in gt:
        gt = gt["assert_case"]
    if isinstance(gt, list):
        if not all(isinstance(s, str) for s in gt):
            raise BadTests("a list of tests must hold assert strings")
        pairs = [_split_assert(s) for s in gt]
        return "assert", [p[0] for p in pairs], [p[1] for p in pairs], None
    if not isinstance(gt, dict) or "inputs" not in gt or "outputs" not in gt:
        keys = sorted(gt) if isinstance(gt, dict) else type(gt).__name__
        raise BadTests(f"unsupported test layout ({keys}): need inputs/outputs or a list of asserts")
    inputs, outputs = gt["inputs"], gt["outputs"]
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise BadTests("inputs and outputs must be lists of the same length")
    fn_name = gt.get("fn_name") or None
    if fn_name is None:
        return ("stdio", [{"stdin": _as_text(x, f"inputs[{i}]")} for i, x in enumerate(inputs)],
                [_as_text(y, f"outputs[{i}]") for i, y in enumerate(outputs)], None)
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise BadTests(f"fn_name must be an identifier, got {fn_name!r}")
    tests, expected = [], []
    for i, (x, y) in enumerate(zip(inputs, outputs)):
        if isinstance(x, str):  # LiveCodeBench: one JSON value per line, output as JSON text
            try:
                args = [json.loads(line) for line in x.split("\n") if line.strip()]
                y = json.loads(y) if isinstance(y, str) else y
            except ValueError as e:
                raise BadTests(f"inputs[{i}]/outputs[{i}] are not JSON lines: {e}") from None
        else:
            args = x if isinstance(x, list) else [x]
        tests.append({"args": args})
        expected.append(y)
    return "call", tests, expected, fn_name


def _test_passes(mode: str, rec: dict, test: dict, want: Any) -> tuple[bool, str]:
    if rec.get("status") != "ok":
        return False, str(rec.get("err") or "error")
    if mode == "stdio":
        ok = stdout_equal(str(rec.get("out", "")), want)
    elif mode == "call" or "expr" in test:
        ok = "value" in rec and returned_value_matches(rec["value"], want)
    else:
        ok = True
    return ok, "" if ok else "wrong output"


def score_run(mode: str, tests: list[dict], expected: list[Any], run: SandboxRun) -> tuple[int, str]:
    """(passed_tests, reason) from the records of one sandbox run."""
    n = len(tests)
    if run.setup_error:
        return 0, f"sandbox error: {run.setup_error}"
    if not run.ready:
        return 0, f"sandbox error: {run.stderr.strip()[-300:] or 'the harness never became ready'}"
    if run.corrupt:
        return 0, f"result channel tampered with: {run.corrupt}"
    if run.module_error:
        return 0, f"solution failed before the tests: {run.module_error}"
    passed, first = 0, None
    for i, (rec, test, want) in enumerate(zip(run.tests, tests, expected)):
        if rec is None:
            why = run.end.get("why", "no end record")
            why = f"no result ({why}, {run.end.get('status', '?')})" if why != "exit" else \
                f"program ended before reporting ({run.end.get('status', '?')})"
            first = first or f"test {i}: {why}"
            continue
        ok, why = _test_passes(mode, rec, test, want)
        passed += ok
        if not ok and first is None:
            first = f"test {i}: {why}"
    return passed, (f"all {n} tests passed" if passed == n else f"{passed}/{n} tests passed; first failure {first}")


def run_code(response: str, tests: Any, *, timeout_s: float, memory_mb: int, require_think: bool = True,
             isolation: str = "namespaces") -> dict:
    """{passed, passed_tests, total_tests, reason, isolation, seconds}; never raises for a bad program.

    Raises ``SandboxUnavailable`` (before running anything) when the sandbox cannot give ``isolation``."""
    out = {"passed": False, "passed_tests": 0, "total_tests": 0, "reason": "", "isolation": "", "seconds": 0.0}
    try:
        mode, child_tests, expected, fn_name = prepare_tests(tests)
    except BadTests as e:
        out["reason"] = f"bad tests: {e}"
        return out
    out["total_tests"] = len(child_tests)
    text = extract_final_answer(response, require_think)
    if text is None:
        out["reason"] = "no </think>: truncated response"
        return out
    code = extract_code(text)
    if code is None:
        out["reason"] = "no ```python code block"
        return out
    try:
        ast.parse(code)
    except (SyntaxError, ValueError) as e:
        out["reason"] = f"syntax error: {e}"[:300]
        return out
    except (MemoryError, RecursionError):
        out["reason"] = "syntax check failed: expression too deep"
        return out
    if not child_tests:
        out["reason"] = "no tests"
        return out
    require(isolation)
    run = execute(code, mode, child_tests, fn_name=fn_name, timeout_s=timeout_s, memory_mb=memory_mb,
                  isolation=isolation)
    passed, reason = score_run(mode, child_tests, expected, run)
    out.update(passed=passed == len(child_tests), passed_tests=passed, reason=reason, isolation=run.isolation,
               seconds=round(run.seconds, 4))
    return out
