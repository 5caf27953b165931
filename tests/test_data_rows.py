import json

import pytest

from async_or1.data.rows import (MATH_INSTRUCTION, Problem, RowError, load_eval_problems, load_problems,
                                 problem_to_row, write_rows)


def math_row(gold='["42"]', **over):
    row = {"data_source": "numina", "prompt": [{"role": "user", "content": "What is 6*7?"}], "ability": "math",
           "reward_model": {"ground_truth": gold, "style": "rule"},
           "extra_info": {"index": 3, "model_difficulty": {"DeepSeek-R1-Distill-Qwen-7B": 5}}}
    row.update(over)
    return row


def code_row(tests, **over):
    row = {"data_source": "taco", "prompt": [{"role": "user", "content": "Echo the input."}], "ability": "code",
           "reward_model": {"ground_truth": json.dumps(tests), "style": "rule"}, "extra_info": {}}
    row.update(over)
    return row


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path, suffix):
    rows = [math_row(), math_row(gold='["1/2", "0.5"]'),
            code_row({"inputs": ["1\n"], "outputs": ["1\n"], "fn_name": None}),
            code_row({"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}),
            code_row(["assert f(1) == 2", "assert f(2) == 3"])]
    path = tmp_path / f"rows{suffix}"
    assert write_rows(path, rows) == 5
    probs, counts = load_problems([path])
    assert counts["loaded"] == 5
    assert [p.uid for p in probs] == [f"rows{suffix}:{i}" for i in range(1, 6)]
    assert probs[0] == Problem(uid=f"rows{suffix}:1", prompt=[{"role": "user", "content": "What is 6*7?"}],
                               ability="math", ground_truth=["42"], data_source="numina",
                               difficulty={"DeepSeek-R1-Distill-Qwen-7B": 5})
    assert probs[1].ground_truth == ["1/2", "0.5"]
    # fn_name null is absent: a stdin/stdout problem, not a call-based one
    assert probs[2].ground_truth == {"inputs": ["1\n"], "outputs": ["1\n"]}
    assert probs[3].ground_truth == {"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}
    assert probs[4].ground_truth == ["assert f(1) == 2", "assert f(2) == 3"]
    # and back: problem_to_row -> write -> load gives the same problems
    again = tmp_path / f"again{suffix}"
    write_rows(again, [problem_to_row(p) for p in probs])
    probs2, _ = load_problems(again)
    assert [(p.prompt, p.ability, p.ground_truth, p.data_source, p.difficulty) for p in probs2] == \
           [(p.prompt, p.ability, p.ground_truth, p.data_source, p.difficulty) for p in probs]


def test_bare_string_gold_becomes_a_list(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [math_row(gold="\\frac{1}{2}"), math_row(gold='"7"'),
                                              math_row(gold="12")])
    probs, _ = load_problems(path)
    assert [p.ground_truth for p in probs] == [["\\frac{1}{2}"], ["7"], ["12"]]


BAD = [
    ("not json", "<line>", "not_json"),
    (math_row(data_source=None), "data_source", "bad_data_source"),
    (math_row(prompt="hello"), "prompt", "bad_prompt"),
    (math_row(prompt=[{"role": "robot", "content": "x"}]), "prompt[0].role", "bad_prompt"),
    (math_row(prompt=[{"role": "user", "content": None}]), "prompt[0].content", "bad_prompt"),
    (math_row(ability="poetry"), "ability", "bad_ability"),
    (math_row(reward_model=None), "reward_model", "bad_ground_truth"),
    (math_row(gold=None), "reward_model.ground_truth", "bad_ground_truth"),
    (math_row(gold="[]"), "reward_model.ground_truth", "bad_ground_truth"),
    (code_row({"inputs": None, "outputs": ["1"]}), "reward_model.ground_truth.inputs", "bad_ground_truth"),
    (code_row({"inputs": ["1"], "outputs": ["1", "2"]}), "reward_model.ground_truth.outputs", "bad_ground_truth"),
    (code_row({"inputs": ["1"], "outputs": ["1"], "fn_name": 3}), "reward_model.ground_truth.fn_name",
     "bad_ground_truth"),
    (code_row([]), "reward_model.ground_truth", "bad_ground_truth"),
    (math_row(extra_info={"model_difficulty": {"m": -1}}), "extra_info.model_difficulty.m", "bad_difficulty"),
    (math_row(extra_info={"model_difficulty": [1]}), "extra_info.model_difficulty", "bad_difficulty"),
]


@pytest.mark.parametrize("bad,field,reason", BAD)
def test_bad_row_names_file_row_and_field(tmp_path, bad, field, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [math_row(), bad])
    with pytest.raises(RowError) as e:
        load_problems(path)
    assert f"{path}:2" in str(e.value) and f"field '{field}'" in str(e.value)
    assert e.value.field == field and e.value.reason == reason


def test_bad_row_in_parquet_names_row_index(tmp_path):
    path = tmp_path / "d.parquet"
    write_rows(path, [math_row(), math_row(), math_row(gold='[]')])
    with pytest.raises(RowError, match=r"d\.parquet:3: field 'reward_model.ground_truth'"):
        load_problems(path)


def test_skip_mode_counts_per_reason(tmp_path):
    rows = [math_row(), "not json", math_row(gold="[]"), code_row({"inputs": None, "outputs": []}),
            math_row(ability="poetry"), code_row(["assert True"]), math_row()]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    probs, counts = load_problems(path, on_bad_row="skip")
    assert [p.uid for p in probs] == ["d.jsonl:1", "d.jsonl:6", "d.jsonl:7"]
    assert counts == {"loaded": 3, "bad_row:not_json": 1, "bad_row:bad_ground_truth": 2, "bad_row:bad_ability": 1}


def test_ability_filter_and_null_difficulty(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [math_row(extra_info={"model_difficulty": None}),
                                             code_row(["assert 1"]), math_row(extra_info=None)])
    probs, counts = load_problems(path, abilities=["math"])
    assert [p.difficulty for p in probs] == [{}, {}]
    assert counts == {"loaded": 2, "ability_filtered": 1}
    with pytest.raises(ValueError, match="unknown ability 'maths'"):
        load_problems(path, abilities=["maths"])


def test_duplicate_file_names_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p1 = write_jsonl(tmp_path / "a" / "x.jsonl", [math_row()])
    p2 = write_jsonl(tmp_path / "b" / "x.jsonl", [math_row()])
    with pytest.raises(ValueError, match="share the name 'x.jsonl'"):
        load_problems([p1, p2])


def test_aime_rows_for_evaluation(tmp_path):
    path = write_jsonl(tmp_path / "aime24.jsonl", [{"problem": "Find x.", "answer": 204, "id": 1},
                                                  {"problem": "Find y.", "answer": "033"}, math_row()])
    probs = load_eval_problems(path)
    assert probs[0].prompt == [{"role": "user", "content": "Find x.\n" + MATH_INSTRUCTION}]
    assert probs[0].ground_truth == ["204"] and probs[0].ability == "math"
    assert probs[1].ground_truth == ["033"]
    assert probs[2].ground_truth == ["42"] and probs[2].prompt[0]["content"] == "What is 6*7?"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "Find z.", "answer": None}])
    with pytest.raises(RowError, match=r"bad\.jsonl:1: field 'answer'"):
        load_eval_problems(bad)
