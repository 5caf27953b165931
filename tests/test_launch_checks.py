"""Data errors before anything starts: ``async-or1 train`` checks the rows, the tokenizer and the
model's config before it creates the run directory or spawns a process. A bad input is one line
naming file, row and field, exit status 2, no traceback, no resume advice. Prompts over
``data.max_prompt_tokens`` are dropped and counted when the data is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline import tiny  # noqa: F401  (fixture: a random tiny Qwen2, the embedded tokenizer, 64 rows)

ROOT = Path(__file__).resolve().parents[1]


def _train(tiny: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    args = [f"output_dir={out}", "name=run", f"model.path={tiny / 'model'}", f"data.train_files={tiny / 'train.jsonl'}",
            "generation.devices=", "learner.devices=", *extra]
    return subprocess.run([sys.executable, "-m", "async_or1.cli", "train", "--config",
                           str(ROOT / "configs/cpu-tiny.yaml"), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def _refused(p: subprocess.CompletedProcess, out: Path, line: str) -> None:
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr == f"async-or1: data error: {line}\n", p.stderr
    assert "Traceback" not in p.stdout + p.stderr and "--resume" not in p.stdout + p.stderr
    assert not (out / "run").exists(), "nothing may be created or started for a run that cannot start"


def test_a_bad_row_is_one_line_before_anything_starts(tiny, tmp_path):
    rows = (tiny / "train.jsonl").read_text().splitlines()
    bad = json.loads(rows[2])
    bad["data_source"] = None
    rows[2] = json.dumps(bad)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "runs"
    p = _train(tiny, out, f"data.train_files={data}")
    _refused(p, out, f"{data}:3: field 'data_source': expected a non-empty string, got None")


def test_a_tokenizer_larger_than_the_model_is_refused(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(str(model)))
    cfg = json.loads((model / "config.json").read_text())
    cfg["vocab_size"] = n - 1
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "runs"
    p = _train(tiny, out, f"model.path={model}")
    _refused(p, out, f"{model}: the tokenizer has {n} tokens but config.json's vocab_size is {n - 1}: token ids past "
                     "the embedding would crash the engines")


def test_long_prompts_are_dropped_and_counted(tiny):
    """Hand count: the embedded template wraps each arithmetic question; the rows whose encoded
    prompt exceeds the limit are exactly those dropped, the rest keep their ids."""
    from transformers import AutoTokenizer

    from async_or1.data.prepare import DataError, prepare
    from async_or1.data.rows import load_problems
    from async_or1.data.template import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny / "model"))
    problems, _ = load_problems([tiny / "train.jsonl"])
    lengths = {p.uid: len(encode_prompt(tok, p.prompt)) for p in problems}
    limit = sorted(lengths.values())[len(lengths) // 2]
    too_long = {u for u, n in lengths.items() if n > limit}
    assert 0 < len(too_long) < len(lengths)
    got = prepare([tiny / "train.jsonl"], tok, max_prompt_tokens=limit)
    assert {p.uid for p in got.problems} == set(lengths) - too_long
    assert got.counts["prompt_too_long"] == len(too_long) and got.counts["encoded"] == len(lengths) - len(too_long)
    assert all(len(got.token_ids[p.uid]) <= limit for p in got.problems)
    with pytest.raises(DataError, match="no training problem left"):
        prepare([tiny / "train.jsonl"], tok, max_prompt_tokens=min(lengths.values()) - 1)
