"""RewardPool (mixed batches, threads, daemonic children, clean close) and the reward CLI."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
import time

import psutil

from async_or1.rewards.cli import main as cli_main
from async_or1.rewards.pool import RewardPool

TOWER = "</think> \\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}"
ADD = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}


def code(src: str) -> str:
    return f"reasoning</think>\n```python\n{src}\n```"


GOOD = code("a, b = map(int, input().split())\nprint(a + b)")
LOOP = code("while True:\n    pass")


def _live_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


def test_mixed_batch_every_item_gets_its_own_verdict():
    items = [("math", "x</think>\\boxed{\\frac{2}{4}}", ["0.5"]),
             ("math", "x</think>\\boxed{3}", "4"),
             ("math", TOWER, ["2"]),
             ("code", GOOD, ADD),
             ("code", LOOP, ADD),
             ("code", code("print(3)"), ADD),
             ("chemistry", "x", "y"),
             ("math", None, ["1"]),
             ("math", "x</think>\\boxed{1}", []),
             ("code", GOOD, {"bogus": 1}),
             ("math",)]
    t0 = time.monotonic()
    with RewardPool(workers=2, math_timeout_s=1.5, code_timeout_s=1.5, code_memory_mb=1024) as pool:
        res = pool.score(items)
        again = pool.score([("math", "x</think>\\boxed{7}", ["7"])])
    elapsed = time.monotonic() - t0
    assert [r.reward for r in res] == [1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert res[2].reason == "timeout" and 1.4 < res[2].seconds < 4
    assert res[3].details["passed_tests"] == 2 and res[5].details == {**res[5].details, "passed_tests": 1,
                                                                       "total_tests": 2}
    assert "timeout" in res[4].reason
    assert res[6].reason.startswith("unknown ability 'chemistry'")
    assert "response must be a string" in res[7].reason and "bad gold" in res[8].reason
    assert res[9].reason.startswith("bad tests") and res[10].reason.startswith("malformed item")
    assert again[0].correct
    assert elapsed < 20, elapsed
    assert not _live_children()


def _score_in(results: list, pool_kwargs: dict) -> None:
    with RewardPool(**pool_kwargs) as pool:
        results.extend((r.reward, r.reason) for r in pool.score(
            [("math", "x</think>\\boxed{5}", ["5"]), ("math", TOWER, ["1"]), ("code", GOOD, ADD)]))


def test_pool_from_a_non_main_thread():
    results: list = []
    t = threading.Thread(target=_score_in, args=(results, {"math_timeout_s": 1.0, "code_timeout_s": 5.0}))
    t.start()
    t.join(60)
    assert [r for r, _ in results] == [1, 0, 1] and results[1][1] == "timeout"


def _child(q) -> None:
    results: list = []
    _score_in(results, {"math_timeout_s": 1.0, "code_timeout_s": 5.0})
    q.put(results)


def test_pool_inside_a_daemonic_child_process():
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,), daemon=True)  # multiprocessing forbids children here
    p.start()
    out = q.get(timeout=60)
    p.join(10)
    assert [r for r, _ in out] == [1, 0, 1] and out[1][1] == "timeout"
    assert p.exitcode == 0


def test_close_leaves_no_process_and_rejects_new_work():
    pool = RewardPool(workers=2)
    pool.score([("math", "x</think>\\boxed{1}", ["1"]), ("code", GOOD, ADD)])
    pids = pool.math_worker_pids()
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    pool.close()
    assert not any(psutil.pid_exists(p) for p in pids) and not _live_children()
    try:
        pool.score([])
    except RuntimeError as e:
        assert "closed" in str(e)
    else:
        raise AssertionError("a closed pool accepted work")


def test_cli_math_rows_errors_and_order(tmp_path, capsys):
    f = tmp_path / "m.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": "a", "response": "r</think>\\boxed{0.25}", "gold": "\\frac{1}{4}"}),
        "{not json",
        json.dumps({"id": "b", "response": "r</think>\\boxed{2}"}),
        json.dumps({"id": "c", "response": "no end of reasoning \\boxed{2}", "gold": ["2"]}),
        "",
        json.dumps(["a", "list"]),
        json.dumps({"id": {"x": 1}, "response": "r", "gold": "1"}),
        json.dumps({"id": 7, "response": TOWER, "gold": [2]}),
    ]) + "\n")
    assert cli_main("math", str(f), workers=2, timeout_s=1.5, require_think=True) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 7
    assert rows[0] == {**rows[0], "id": "a", "correct": True}
    assert rows[1]["line"] == 2 and "bad JSON" in rows[1]["error"] and rows[1]["correct"] is False
    assert rows[2]["id"] == "b" and rows[2]["error"] == "line 3: missing field 'gold'"
    assert rows[3] == {**rows[3], "id": "c", "correct": False, "reason": "no </think>: truncated response"}
    assert rows[4]["line"] == 6 and "JSON object" in rows[4]["error"]
    assert rows[5]["line"] == 7 and "'id'" in rows[5]["error"]
    assert rows[6]["id"] == 7 and rows[6]["reason"] == "timeout"
    assert set(rows[0]) == {"id", "correct", "reason", "seconds"}


def test_cli_code_via_console_script(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": 1, "response": GOOD, "tests": ADD}),
        json.dumps({"id": 2, "response": code("import os\nos.system('kill -9 %d' % os.getppid())\nwhile 1: pass"),
                    "tests": json.dumps(ADD)}),
        json.dumps({"id": 3, "response": GOOD, "tests": {"inputs": ["1"], "outputs": []}}),
        json.dumps({"id": 4, "response": code("def f(x):\n    return x + 1"), "tests": ["assert f(1) == 2"]}),
    ]) + "\n")
    p = subprocess.run([sys.executable, "-m", "async_or1.cli", "reward", "code", "--jsonl", str(f), "--timeout", "1.5"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    assert rows[0] == {"id": 1, "passed": True, "passed_tests": 2, "total_tests": 2, "reason": "all 2 tests passed",
                       "seconds": rows[0]["seconds"]}
    assert rows[1]["passed"] is False and rows[3]["passed"] is True
    assert rows[2]["line"] == 3 and "same length" in rows[2]["error"]
    assert "code sandbox: namespaces: host files hidden, network unreachable, host processes hidden" in p.stderr


def test_cli_unreadable_file_exits_2(tmp_path, capsys):
    assert cli_main("code", str(tmp_path / "missing.jsonl"), workers=1, timeout_s=1, require_think=True) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "cannot read" in err
    assert cli_main("math", str(tmp_path), workers=1, timeout_s=1, require_think=True) == 2


def test_verdicts_stay_correct_under_parallel_load():
    rng_items, expected = [], []
    for k in range(24):
        a, b = k, 2 * k + 1
        tests = {"inputs": [f"{a} {b}\n", f"{b} {a}\n"], "outputs": [f"{a + b}\n", f"{a + b}\n"]}
        wrong = k % 3 == 0
        src = "a, b = map(int, input().split())\nprint(a + b" + (" + 1)" if wrong else ")")
        rng_items.append(("code", code(src), tests))
        expected.append(0.0 if wrong else 1.0)
    for k in range(120):
        gold = str(k) if k % 4 else str(k + 1)
        rng_items.append(("math", f"r</think>\\boxed{{{k}}}", [gold]))
        expected.append(1.0 if k % 4 else 0.0)
    with RewardPool(workers=3, code_timeout_s=10.0) as pool:
        got = [r.reward for r in pool.score(rng_items)]
    assert got == expected
