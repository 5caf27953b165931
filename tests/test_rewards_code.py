"""Code sandbox: known-good solutions pass, comparisons are tolerant as documented, bad data is named."""

from __future__ import annotations

import json

import pytest

from async_or1.rewards.code import BadTests, extract_code, prepare_tests, run_code
from async_or1.rewards.compare import returned_value_matches, stdout_equal, values_equal


def R(code: str, reasoning: str = "think think") -> str:
    return f"{reasoning}\n```python\nprint('draft')\n```\n</think>\nHere it is:\n```python\n{code}\n```\n"


def run(code: str, tests, **kw) -> dict:
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("memory_mb", 1024)
    return run_code(R(code), tests, **kw)


STDIO = {"inputs": ["1 2\n", "10 -4\n", "0 0\n"], "outputs": ["3\n", "6\n", "0\n"]}


def test_extract_code_takes_last_python_block():
    text = "```python\na=1\n```\nand\n```py\nb=2\n```\n```\nnot python\n```\n```python\nunterminated"
    assert extract_code(text) == "b=2\n"
    assert extract_code("no code here") is None


@pytest.mark.parametrize("code", [
    "a, b = map(int, input().split())\nprint(a + b)",
    "import sys\na, b = map(int, sys.stdin.buffer.read().split())\nsys.stdout.write(str(a + b) + '   \\n')",
    "a, b = map(int, open(0).read().split())\nprint(a + b)\nimport sys\nsys.exit(0)",
    "def main():\n    a, b = map(int, input().split())\n    print(a + b)\n\nif __name__ == '__main__':\n    main()",
    "import os\na, b = map(int, input().split())\nprint(a + b, flush=True)\nos._exit(0)",
])
def test_stdin_stdout_solutions_pass(code):
    r = run(code, STDIO)
    assert r["passed"], r
    assert (r["passed_tests"], r["total_tests"]) == (3, 3)
    assert r["isolation"]


def test_partial_solution_reports_passed_over_total():
    r = run("a, b = map(int, input().split())\nprint(a + b if a else 99)", STDIO)
    assert not r["passed"] and (r["passed_tests"], r["total_tests"]) == (2, 3)
    assert "test 2: wrong output" in r["reason"]


def test_fn_name_bare_function_and_app_wrapped_outputs():
    tests = {"fn_name": "add", "inputs": [[1, 2], [5, 5]], "outputs": [[3], 10]}
    assert run("def add(a, b):\n    return a + b", tests)["passed"]
    assert not run("def add(a, b):\n    return a - b", tests)["passed"]


def test_class_solution_method_with_typing_prelude():
    code = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
            "        seen = {}\n        for i, x in enumerate(nums):\n"
            "            if target - x in seen:\n                return [seen[target - x], i]\n"
            "            seen[x] = i\n")
    tests = {"fn_name": "twoSum", "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]], "outputs": [[0, 1], [1, 2]]}
    r = run(code, tests)
    assert r["passed"], r
    # LiveCodeBench layout: one JSON value per line, outputs as JSON text; tuples compare as lists
    lcb = {"fn_name": "twoSum", "inputs": ["[2, 7, 11, 15]\n9"], "outputs": ["[0, 1]"]}
    assert run(code.replace("return [seen[target - x], i]", "return (seen[target - x], i)"), lcb)["passed"]


def test_assert_string_tests():
    code = "def sq(x):\n    return x * x\n\ndef half(x):\n    return x / 2"
    asserts = ["assert sq(3) == 9", "assert 16 == sq(4)", "assert half(1) == 0.5",
               "assert abs(half(3) - 1.5) < 1e-9", "assert sq(2) in (4, 5)"]
    r = run(code, asserts)
    assert r["passed"] and r["passed_tests"] == 5, r
    r = run(code, asserts + ["assert sq(5) == 24"])
    assert not r["passed"] and r["passed_tests"] == 5
    assert run(code, json.dumps({"assert_case": asserts}))["passed"]


def test_require_think_and_syntax_check():
    truncated = "```python\nprint(3)\n```"  # a complete block, but the reasoning never ended
    tests = {"inputs": [""], "outputs": ["3"]}
    assert run_code(truncated, tests, timeout_s=5, memory_mb=512)["reason"] == "no </think>: truncated response"
    assert run_code(truncated, tests, timeout_s=5, memory_mb=512, require_think=False)["passed"]
    r = run("def f(:\n    pass", tests)
    assert not r["passed"] and r["reason"].startswith("syntax error")
    assert run_code("</think> no code", tests, timeout_s=5, memory_mb=512)["reason"] == "no ```python code block"


def test_module_error_and_runtime_error_fail():
    assert "failed before the tests" in run("raise ValueError('boom')", {"fn_name": "f", "inputs": [[1]],
                                                                        "outputs": [1]})["reason"]
    r = run("print(1 // 0)", {"inputs": [""], "outputs": ["0"]})
    assert not r["passed"] and "ZeroDivisionError" in r["reason"]


def test_stdout_comparison_rules():
    assert stdout_equal("3  \n4\r\n\n", "3\n4")
    assert stdout_equal("1.50 2", "1.5 2.0")
    assert stdout_equal("0.3333333", "0.333333333")
    assert not stdout_equal("0.334", "0.333")
    assert not stdout_equal("1000000", "1000001")           # integers are exact
    assert not stdout_equal("1 2", "1\n2")                  # line structure matters
    assert not stdout_equal("YES", "yes")
    assert stdout_equal("", "")


def test_value_comparison_rules():
    assert values_equal([1, [2.0000001, "a"]], [1, [2, "a"]])
    assert not values_equal(True, 1) and not values_equal(1, "1") and not values_equal(None, 0)
    assert values_equal({"a": [1]}, {"a": [1]}) and not values_equal({"a": 1}, {"b": 1})
    assert returned_value_matches(5, [5]) and not returned_value_matches(1, [1, 2])


def test_prepare_tests_names_problems():
    assert prepare_tests('{"inputs": ["1"], "outputs": ["2"]}')[0] == "stdio"
    mode, tests, expected, _ = prepare_tests(["assert f(1) == [1, 2]", "assert g(2)"])
    assert mode == "assert" and tests == [{"expr": "f(1)"}, {"stmt": "assert g(2)"}] and expected[0] == [1, 2]
    for bad, msg in [("not json", "not JSON"), ({"inputs": [1, 2], "outputs": [1]}, "same length"),
                     ({"foo": 1}, "unsupported"),
                     ({"inputs": [[1]], "outputs": ["1"]}, r"inputs\[0\] must be a string"),
                     ({"fn_name": "1x", "inputs": [], "outputs": []}, "identifier"), ([1, 2], "assert strings")]:
        with pytest.raises(BadTests, match=msg):
            prepare_tests(bad)
    r = run("print(1)", {"inputs": ["1"]})
    assert r["reason"].startswith("bad tests") and not r["passed"]


# -- defects found with real benchmark data (issue 13) -------------------------------------------------

@pytest.mark.parametrize("code", ["pass", "x = 1", "import math", "# nothing here"])
def test_empty_program_cannot_pass_with_the_preludes_names(code):
    # the prelude star-imports operator and math: `add`, `gcd`, `floor` exist before the solution runs
    for tests in ({"fn_name": "add", "inputs": [[1, 2], [5, 5]], "outputs": [3, 10]},
                  {"fn_name": "gcd", "inputs": [[4, 6]], "outputs": [2]},
                  ["assert add(1, 2) == 3", "assert floor(2.5) == 2"],
                  ["assert add(1, 2) == 3 and add(2, 2) == 4"]):
        r = run(code, tests)
        assert not r["passed"] and r["passed_tests"] == 0, (code, tests, r)
        assert "does not define" in r["reason"] or "defines no function" in r["reason"], r


def test_names_the_solution_binds_itself_may_be_called():
    # importing a library function under the tested name is the solution's own choice
    assert run("from math import gcd", {"fn_name": "gcd", "inputs": [[4, 6]], "outputs": [2]})["passed"]
    assert run("from operator import add", ["assert add(1, 2) == 3"])["passed"]
    # tests may use builtins, whole-module prelude imports and their own bound names
    code = "def add(a, b):\n    return a + b"
    assert run(code, ["assert math.isclose(add(0.1, 0.2), 0.3)", "assert all(add(x, 0) == x for x in range(5))",
                      "assert sorted([add(2, 1), add(0, 1)]) == [1, 3]"])["passed"]


DATACLASS = ("from dataclasses import dataclass, field\n\n@dataclass\nclass Item:\n    w: int\n    v: int\n"
             "    tags: list = field(default_factory=list)\n\n")


def test_module_level_dataclass_in_call_assert_and_stdio_solutions():
    call = DATACLASS + ("class Solution:\n    def best(self, ws: List[int], vs: List[int]) -> int:\n"
                        "        return max(Item(w, v).v for w, v in zip(ws, vs))\n")
    r = run(call, {"fn_name": "best", "inputs": [[[1, 2], [5, 7]]], "outputs": [7]})
    assert r["passed"], r
    assert run(DATACLASS + "def f(w):\n    return Item(w, 2 * w).v", ["assert f(3) == 6"])["passed"]
    stdio = DATACLASS + "a, b = map(int, input().split())\nprint(Item(a, b).v + Item(b, a).v)"
    assert run(stdio, STDIO)["passed"]


def test_builtins_are_not_shadowed_by_the_prelude():
    # math.pow (float, 2 arguments) and operator.abs came after the builtins in the prelude
    r = run("n = int(input())\nprint(pow(2, n, 10**9 + 7), pow(3, n), abs(-n))",
            {"inputs": ["100\n"], "outputs": [f"{pow(2, 100, 10**9 + 7)} {3**100} 100"]})
    assert r["passed"], r


def test_stdin_solution_that_prints_from_a_thread_it_started():
    # the common way to raise the stack for deep recursion: output comes after the module returned
    code = ("import sys, threading, time\nsys.setrecursionlimit(10**6)\nthreading.stack_size(1 << 26)\n"
            "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
            "def main():\n    a, b = map(int, input().split())\n    time.sleep(0.2)\n    print(a + b + depth(20000) - 20000)\n"
            "threading.Thread(target=main).start()")
    r = run(code, STDIO)
    assert r["passed"], r


@pytest.mark.parametrize("stop", ["exit()", "quit()", "exit(0)", "import sys\nsys.exit()"])
def test_exit_and_quit_after_printing_the_answer(stop):
    # exit/quit come from the site module, which the sandbox's `python -S` does not load
    r = run("a, b = map(int, input().split())\nprint(a + b)\n" + stop + "\nprint('never')", STDIO)
    assert r["passed"], r
    r = run("print(1)\nexit(3)", {"inputs": [""], "outputs": ["1"]})
    assert not r["passed"] and "exit status 3" in r["reason"]
