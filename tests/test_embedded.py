import json
import re
from pathlib import Path

import pytest

from async_or1.embedded import VERSION, build_report, ensure_embedded, is_complete
from async_or1.embedded.build import BuildParams
from async_or1.embedded.sft import SFTParams

# A build small enough for the default suite: the real task and formats, a model of a few
# thousand parameters, a handful of SFT steps.
SMALL = BuildParams(n_train=60, n_heldout=20, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                    threads=1, difficulty_n=2, heldout_k=2, engine_batch=32,
                    sft=SFTParams(max_steps=4, batch_size=8, log_every=2, max_new_tokens=24))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("cache")
    lines = []
    paths = ensure_embedded(cache, params=SMALL, log=lines.append)
    return cache, paths, lines


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_layout_and_loading(small):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, paths, lines = small
    assert paths.root == cache / VERSION
    assert any("building" in line for line in lines) and any("SFT: loss" in line for line in lines)
    assert not [p for p in cache.iterdir() if p.name.startswith(f".{VERSION}.tmp")]   # temp dir renamed away
    tok = AutoTokenizer.from_pretrained(str(paths.model))
    model = AutoModelForCausalLM.from_pretrained(str(paths.model))
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)
    assert (paths.model / "model.safetensors").is_file()
    msgs = read_jsonl(paths.heldout)[0]["prompt"]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n")
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    report = build_report(paths)
    assert report["sft"]["steps"] == 4 and [s for s, _ in report["sft"]["loss_curve"]] == [2, 4]
    assert report["heldout_k"] == 2 and 0 <= report["heldout_accuracy_t1"] <= 1


def test_rows_are_in_the_training_layout_and_verifiable(small):
    from async_or1.data.rows import load_problems
    from async_or1.embedded.task import DATA_SOURCE
    from async_or1.rewards.math import verify_math

    _, paths, _ = small
    train, counts = load_problems([paths.train, paths.heldout])
    assert counts["loaded"] == 80
    heldout_texts = {r["prompt"][0]["content"] for r in read_jsonl(paths.heldout)}
    train_rows = read_jsonl(paths.train)
    assert not heldout_texts & {r["prompt"][0]["content"] for r in train_rows}     # disjoint splits
    row = train_rows[0]
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert row["data_source"] == DATA_SOURCE and row["ability"] == "math"
    assert row["reward_model"]["style"] == "rule" and isinstance(row["reward_model"]["ground_truth"], str)
    assert set(row["extra_info"]) >= {"index", "model_difficulty"}
    steps = {r["extra_info"]["steps"] for r in train_rows}
    assert steps == {1, 2, 3, 4, 5}                                                  # difficulty varies
    for p in train[:40]:
        gold = p.ground_truth[0]
        assert verify_math(f"<think>\nwork\n</think>\n\\boxed{{{gold}}}", p.ground_truth) == (True, "exact match")
        assert not verify_math(f"<think>\nwork\n</think>\n\\boxed{{{int(gold) + 1}}}", p.ground_truth)[0]
        assert not verify_math(f"<think>\n\\boxed{{{gold}}}", p.ground_truth)[0]       # truncated: no </think>
    # every train row carries the build model's correct count out of difficulty_n
    assert all(0 <= r["extra_info"]["model_difficulty"]["embedded-tiny"] <= 2 for r in train_rows)


def test_worked_solutions_compute_the_gold():
    """The teacher's noise-free solution has one exact line per operation (``v op n = r``),
    each starting from the previous result and ending in the gold answer; a slipped solution
    keeps the operations, carries on from the value it wrote, and boxes its own last value."""
    import random

    from async_or1.embedded import task

    line_re = re.compile(r"^(\d+)([-+*])(\d+)=(-?\d+)$")
    rng = random.Random(0)
    for _ in range(200):
        p = task.sample_problem(rng, rng.randint(1, 5), max_value=20)
        text = task.worked_solution(p)
        lines = text.split("\n</think>\n")[0].split("\n")
        parsed = [line_re.match(x).groups() for x in lines]
        assert len(lines) == p.steps and int(parsed[-1][3]) == p.answer()
        assert text.endswith(f"\\boxed{{{p.answer()}}}")
        assert all(0 <= v <= 20 for v in p.values())
        assert [int(r) for *_, r in parsed] == p.values()
        assert all(eval(f"{a}{op}{b}") == int(r) for a, op, b, r in parsed)  # noqa: S307 - digits and + - * only
        assert [int(a) for a, *_ in parsed] == [p.start] + p.values()[:-1]
        noisy = task.worked_solution(p, rng, noise=1.0).split("\n</think>\n")
        nparsed = [line_re.match(x).groups() for x in noisy[0].split("\n")]
        assert [(op, b) for _, op, b, _ in nparsed] == [(op, b) for _, op, b, _ in parsed]   # same operations
        assert [int(a) for a, *_ in nparsed[1:]] == [int(r) for *_, r in nparsed[:-1]]      # carries on
        assert int(re.search(r"\\boxed\{(-?\d+)\}", noisy[1]).group(1)) == int(nparsed[-1][3])
    q = task.ArithProblem(4, (("add", 5), ("subtract", 2), ("multiply", 3)))
    assert q.text() == "Compute ((4+5)-2)*3. Answer in \\boxed{}."
    assert task.worked_solution(q) == "4+5=9\n9-2=7\n7*3=21\n</think>\n\\boxed{21}"
    assert task.slip("add", 4, 5) == 9 + 1 and task.slip("subtract", 7, 2) == 9 and task.slip("multiply", 7, 3) == 10


def test_cache_reuse_and_rebuild_when_incomplete(small):
    cache, paths, _ = small
    lines = []
    again = ensure_embedded(cache, params=SMALL, log=lines.append)
    assert again == paths and lines == []                                            # no rebuild
    stamp_params = json.loads((paths.root / "STAMP.json").read_text())["params"]
    assert is_complete(paths.root, stamp_params) == (True, "")
    # a changed file makes the cache incomplete, and so do other build parameters
    with (paths.root / "heldout.jsonl").open("a") as f:
        f.write("\n")
    assert is_complete(paths.root, stamp_params) == (False, "changed heldout.jsonl")
    other = json.loads(json.dumps(BuildParams().to_json()))
    assert is_complete(paths.root, other)[1] == "built with other parameters"


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    from async_or1.embedded import default_cache_dir

    monkeypatch.setenv("ASYNC_OR1_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ASYNC_OR1_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "async-or1"


def test_rebuild_after_damage_is_deterministic(tmp_path):
    """Two builds with the same params give the same files (a fresh build replaces a damaged one)."""
    import hashlib

    import torch

    torch.set_num_threads(1)
    tiny = BuildParams(n_train=10, n_heldout=5, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                       threads=1, difficulty_n=0, heldout_k=1,
                       sft=SFTParams(max_steps=2, batch_size=4, log_every=2, max_new_tokens=8))
    a = ensure_embedded(tmp_path / "a", params=tiny, log=lambda s: None)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    first = {f.name: digest(f) for f in [a.model / "model.safetensors", a.train, a.heldout]}
    (a.model / "model.safetensors").unlink()
    b = ensure_embedded(tmp_path / "a", params=tiny, log=lambda s: None)
    assert {f.name: digest(f) for f in [b.model / "model.safetensors", b.train, b.heldout]} == first


_BUILD_IN_A_PROCESS = """
import json, sys
from async_or1.embedded import ensure_embedded, build_report
from async_or1.embedded.build import BuildParams
from async_or1.embedded.sft import SFTParams
p = BuildParams(n_train=40, n_heldout=10, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, threads=2,
                difficulty_n=3, heldout_k=2, engine_batch=16,
                sft=SFTParams(max_steps=6, batch_size=8, log_every=3, max_new_tokens=16))
paths = ensure_embedded(sys.argv[1], params=p, log=lambda s: None)
stamp = json.loads((paths.root / "STAMP.json").read_text())
print(json.dumps({"files": stamp["files"], "samples": stamp["report"]["samples_sha256"]}))
"""


def test_same_params_same_library_versions_identical_files(tmp_path):
    """Two builds in separate processes, with different string-hash seeds and ambient thread
    settings (the build pins its own thread count), write byte-identical files and sample the
    same tokens in the engine pass."""
    import os
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_IN_A_PROCESS, str(tmp_path / f"c{i}")],
                              env=dict(os.environ, PYTHONHASHSEED=hashseed, OMP_NUM_THREADS=omp, TQDM_DISABLE="1",
                                       OMP_WAIT_POLICY="PASSIVE"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (hashseed, omp) in enumerate([("1", "1"), ("2", "2")])]    # side by side: one core each
    outs = []
    for pr in procs:
        out, err = pr.communicate(timeout=300)
        assert pr.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = outs
    assert set(a["files"]) >= {"model/model.safetensors", "model/tokenizer.json", "train.jsonl", "heldout.jsonl"}
    assert a == b


def test_a_waiting_build_says_so(tmp_path):
    """A second process finds the cache lock held: it says it waits (nothing silent for minutes),
    then builds once the lock is free."""
    import fcntl
    import threading

    tiny = BuildParams(n_train=10, n_heldout=5, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                       threads=1, difficulty_n=0, heldout_k=1,
                       sft=SFTParams(max_steps=2, batch_size=4, log_every=2, max_new_tokens=8))
    tmp_path.mkdir(exist_ok=True)
    lines: list[str] = []
    with (tmp_path / f".{VERSION}.lock").open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        t = threading.Thread(target=ensure_embedded, args=(tmp_path,), kwargs={"params": tiny, "log": lines.append})
        t.start()
        for _ in range(200):
            if lines:
                break
            threading.Event().wait(0.05)
        assert lines and "another process is building" in lines[0], lines
        assert t.is_alive()
    t.join(120)
    assert not t.is_alive() and any("done in" in line for line in lines)
