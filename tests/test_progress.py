"""Progress wherever a person waits: the bar itself, and evaluation and the difficulty filter
showing it while the real torch engine samples in a generator process (a tiny embedded build)."""

from __future__ import annotations

import io
import json
import re

import pytest

from async_or1.progress import bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_off_a_terminal_writes_one_plain_line_per_interval():
    f = io.StringIO()
    with bar(5, "work", unit="sample", file=f, mininterval=0.0) as pb:
        for _ in range(5):
            pb.update(1)
    text = f.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work:") and "0/5" in lines[0]
    assert "5/5" in lines[-1] and "sample/s" in lines[-1]                      # count and rate
    assert len(lines) == 6


def test_bar_off_a_terminal_is_quiet_between_intervals():
    f = io.StringIO()
    with bar(1000, "work", file=f) as pb:                                      # default: every 10 s at most
        for _ in range(1000):
            pb.update(1)
    assert len(f.getvalue().splitlines()) == 2                                 # the start and the end


def test_bar_on_a_terminal_redraws_in_place_unless_asked_for_lines():
    tty = _Tty()
    with bar(3, "work", file=tty, mininterval=0.0) as pb:
        pb.update(3)
    assert "\r" in tty.getvalue()
    tty = _Tty()
    with bar(3, "runs", file=tty, lines=True) as pb:
        for _ in range(3):
            pb.update(1)
    assert "\r" not in tty.getvalue() and len(tty.getvalue().splitlines()) == 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny embedded build (2 SFT steps: it answers nothing right) with 10 train and 6 held-out rows."""
    from async_or1.embedded import ensure_embedded
    from async_or1.embedded.build import BuildParams
    from async_or1.embedded.sft import SFTParams

    params = BuildParams(n_train=10, n_heldout=6, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                         threads=1, difficulty_n=0, heldout_k=1,
                         sft=SFTParams(max_steps=2, batch_size=4, log_every=2, max_new_tokens=8))
    return ensure_embedded(tmp_path_factory.mktemp("cache"), params=params, log=lambda s: None)


def _bar_lines(err: str, desc: str) -> list[str]:
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith(desc)]


def _pool_cfg():
    from pathlib import Path

    from async_or1.config import load_config

    root = Path(__file__).resolve().parents[1]
    return load_config(root / "configs/cpu-tiny.yaml", ["generation.devices=", "learner.devices=", "rewards.workers=1",
                                                        "transport.generator_timeout_s=60", "buffer.wait_timeout_s=120"])


def test_eval_shows_sampling_progress(tiny, tmp_path, capsys):
    """Sampling and scoring run in the pool's generator process; the bar counts scored samples."""
    from async_or1.launch_pool import eval_main

    assert eval_main(_pool_cfg(), model=str(tiny.model), data=str(tiny.heldout), k=3, temperature=1.0,
                     max_response_tokens=6, out=str(tmp_path / "ev"), max_problems=0, seed=0) == 0
    err = capsys.readouterr().err
    sampling = _bar_lines(err, "eval: 6 problems x 3")
    assert sampling and "18/18" in sampling[-1] and re.search(r"sample/s", sampling[-1]), err
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["problems"] == 6


def test_filter_shows_progress_with_counts(tiny, tmp_path, capsys):
    from async_or1.launch_pool import filter_main

    assert filter_main(_pool_cfg(), model=str(tiny.model), data=str(tiny.train), n=2, out=str(tmp_path / "kept.jsonl"),
                       max_response_tokens=6) == 0
    cap = capsys.readouterr()
    lines = _bar_lines(cap.err, "data filter: 10 problems x 2")
    assert lines and "20/20" in lines[-1], cap.err
    assert "dropped 10 at 0/2" in cap.out                                       # an untrained model: all wrong
