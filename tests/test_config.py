import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from async_or1.config import (Config, ConfigError, StageConfig, config_from_dict, describe, dump_yaml, load_config,
                              to_dict)

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_every_field_has_a_docstring():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
            tp = cls.__annotations__[f.name]
            if isinstance(tp, str):
                tp = {c.__name__: c for c in _all_classes()}.get(tp)
            if dataclasses.is_dataclass(tp):
                walk(tp)

    walk(Config)
    walk(StageConfig)


def _all_classes():
    import async_or1.config as c

    return [v for v in vars(c).values() if isinstance(v, type) and dataclasses.is_dataclass(v)]


def test_unknown_key_names_it_and_suggests(tmp_path):
    p = _write(tmp_path, "algo:\n  clip_hgih: 0.3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "algo.clip_hgih" in msg and "clip_high" in msg and str(p) in msg


def test_unknown_top_level_and_stage_key(tmp_path):
    with pytest.raises(ConfigError, match="schedule\\[1\\].prompt_per_step.*prompts_per_step"):
        load_config(_write(tmp_path, "schedule:\n  - steps: 1\n  - prompt_per_step: 3\n"))
    with pytest.raises(ConfigError, match="'lerner'.*'learner'"):
        load_config(None, ["lerner.lr=1"])


def test_yaml_plus_dotted_overrides(tmp_path):
    p = _write(tmp_path, "algo:\n  clip_high: 0.25\nschedule:\n  - {steps: 3, max_response_tokens: 8192,"
                         " prompts_per_step: 256, samples_per_prompt: 16}\n"
                         "  - {steps: 4, max_response_tokens: 16384, prompts_per_step: 256, samples_per_prompt: 16}\n")
    cfg = load_config(p, ["algo.clip_high=0.265", "schedule.1.steps=9", "learner.devices=2,3",
                          "algo.entropy.delta=1e-4", "generation.weight_update=between_requests"])
    assert cfg.algo.clip_high == 0.265
    assert [s.steps for s in cfg.stages] == [3, 9]
    assert cfg.stages[1].max_response_tokens == 16384
    assert cfg.learner.devices == ["2", "3"]
    assert cfg.algo.entropy.delta == 1e-4
    assert cfg.total_steps == 12
    assert cfg.stage_at(0)[0] == 0 and cfg.stage_at(2)[0] == 0 and cfg.stage_at(3)[0] == 1
    assert cfg.stage_at(11)[0] == 1


def test_type_and_choice_errors():
    with pytest.raises(ConfigError, match="algo.correction.*'none', 'tis', 'seq_is', 'mis', 'icepop', 'm2po'"):
        load_config(None, ["algo.correction=importance"])
    with pytest.raises(ConfigError, match="learner.zero_stage: expected an integer"):
        load_config(None, ["learner.zero_stage=two"])
    with pytest.raises(ConfigError, match="learner.zero_stage must be 0..3"):
        load_config(None, ["learner.zero_stage=4"])
    with pytest.raises(ConfigError, match="schedule\\[0\\].prompts_per_step must be >= 1"):
        load_config(None, ["schedule.0.prompts_per_step=0"])


def test_update_tuple_and_correction_knobs_are_checked():
    # Mini-batches hold whole groups, all of one size: N_SGD must divide every stage's prompts_per_step.
    with pytest.raises(ConfigError, match="schedule\\[1\\].prompts_per_step=6 is not a multiple of "
                                          "learner.mini_batches_per_step=4"):
        load_config(None, ["schedule=[{prompts_per_step: 8}, {prompts_per_step: 6}]",
                           "learner.mini_batches_per_step=4"])
    with pytest.raises(ConfigError, match="learner.passes_per_batch must be >= 1"):
        load_config(None, ["learner.passes_per_batch=0"])
    with pytest.raises(ConfigError, match="algo.icepop_low/icepop_high"):
        load_config(None, ["algo.icepop_low=6"])
    with pytest.raises(ConfigError, match="algo.is_cap must be > 0"):
        load_config(None, ["algo.is_cap=0"])
    with pytest.raises(ConfigError, match="algo.kl_estimator.*'k3', 'k1'"):
        load_config(None, ["algo.kl_estimator=k2"])
    cfg = load_config(None, ["learner.mini_batches_per_step=2", "learner.passes_per_batch=2", "algo.is_cap=inf",
                             "algo.correction=m2po"])
    assert cfg.learner.mini_batches_per_step == 2 and cfg.algo.is_cap == float("inf")


def test_on_policy_mode_forces_zero_staleness():
    cfg = load_config(None, ["mode=on-policy", "buffer.max_staleness=4"])
    assert cfg.max_staleness == 0
    assert load_config(None, ["buffer.max_staleness=4"]).max_staleness == 4


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", ["algo.clip_high=0.28"])
    again = config_from_dict(to_dict(cfg))
    assert again == cfg
    p = tmp_path / "dump.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(p) == cfg


def test_every_shipped_config_loads():
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert paths, "configs/ is empty"
    for p in paths:
        load_config(p)


def test_describe_lists_dotted_fields():
    lines = describe()
    assert any(line.startswith("algo.entropy.coef_max =") for line in lines)
    assert any(line.startswith("schedule[i].samples_per_prompt =") for line in lines)


def test_cli_help_is_fast_and_dry_run_prints_resolved_config():
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "async_or1.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0 and "train" in r.stdout
    assert elapsed < 5.0  # generous: the point is that torch is not imported (that alone takes seconds)
    r = subprocess.run([sys.executable, "-c", "import sys, async_or1.cli; print('torch' in sys.modules)"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "False"
    r = subprocess.run([sys.executable, "-m", "async_or1.cli", "train", "--config", "configs/cpu-tiny.yaml",
                        "--dry-run", "algo.clip_high=0.26"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "clip_high: 0.26" in r.stdout and "prompts_per_step:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "async_or1.cli", "train", "--dry-run", "algo.clip_hihg=0.26"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "did you mean 'clip_high'" in r.stderr


def test_math_7b_config_is_table_10():
    """configs/r1-distill-math-7b.yaml: the stage boundaries, batch, mini-batch (= batch / N_SGD) and
    group sizes of the paper's Table 10, stage 3.5 included."""
    cfg = load_config(ROOT / "configs" / "r1-distill-math-7b.yaml")
    ends, start = [], 0
    for st in cfg.stages:
        start += st.steps
        ends.append(start)
    assert ends == [740, 1740, 2080, 2160] and cfg.total_steps == 2160
    n_sgd = cfg.learner.mini_batches_per_step
    table = [(st.max_response_tokens, st.prompts_per_step, st.prompts_per_step // n_sgd, st.samples_per_prompt)
             for st in cfg.stages]
    assert table == [(8192, 256, 128, 16), (16384, 256, 128, 16), (32768, 256, 128, 16), (32768, 128, 64, 64)]
    assert cfg.learner.passes_per_batch == 1 and cfg.algo.kl_coef == 0 and cfg.learner.lr == 1e-6
