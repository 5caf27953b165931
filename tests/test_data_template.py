import random

import pytest

from async_or1.data.template import TemplateError, encode_problems, encode_prompt, opens_reasoning, render_prompt
from async_or1.data.rows import Problem
from async_or1.embedded import task
from async_or1.embedded.build import BuildParams, tokenizer_corpus


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The embedded tokenizer saved next to a Qwen2 config, so AutoTokenizer takes the real
    path (transformers maps model_type qwen2 to Qwen2Tokenizer)."""
    from async_or1.embedded.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    p = BuildParams()
    rng = random.Random(0)
    probs = [task.sample_problem(rng, rng.randint(1, 5), max_value=20) for _ in range(500)]
    tok = build_tokenizer(tokenizer_corpus(p, probs), d)
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2).save_pretrained(d)
    return d


def test_generation_prompt_opens_reasoning(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    msgs = [{"role": "user", "content": "Compute (3+4)*2. Answer in \\boxed{}."}]
    text = render_prompt(tok, msgs)
    assert text == "<|im_start|>user\nCompute (3+4)*2. Answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert opens_reasoning(tok)
    ids = encode_prompt(tok, msgs)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids[-2:] == [tok.convert_tokens_to_ids("<think>"), tok.encode("\n", add_special_tokens=False)[0]]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text                                      # round trip through the ids
    assert ids == tok(text, add_special_tokens=False)["input_ids"]       # same as tokenizing the text


def test_reloaded_tokenizer_tokenizes_like_the_built_one(tok_dir):
    """Qwen2Tokenizer rebuilds the pre-tokenizer from its own constants: ours must be identical."""
    from transformers import AutoTokenizer

    from async_or1.embedded.tokenizer import to_hf, train_tokenizer

    rng = random.Random(1)
    probs = [task.sample_problem(rng, rng.randint(1, 5), max_value=20) for _ in range(500)]
    built = to_hf(train_tokenizer(tokenizer_corpus(BuildParams(), probs)))
    loaded = AutoTokenizer.from_pretrained(str(tok_dir))
    for q in probs[:50]:
        text = q.text() + "\n" + task.worked_solution(q)
        assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    text = "19+5=24 and 1234 \\boxed{42}</think>"
    assert [loaded.convert_ids_to_tokens(i) for i in loaded.encode(text, add_special_tokens=False)][:3] == \
           ["1", "9", "+"]                                             # digits one per token, as Qwen2
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    assert built.backend_tokenizer.pre_tokenizer.__getstate__() == loaded.backend_tokenizer.pre_tokenizer.__getstate__()


def test_history_keeps_only_the_final_answer_of_assistant_turns(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "<think>\nit is 2\n</think>\n\\boxed{2}"},
            {"role": "user", "content": "2+2?"}]
    assert render_prompt(tok, msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                                        "<|im_start|>assistant\n\\boxed{2}<|im_end|>\n<|im_start|>user\n2+2?"
                                        "<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_encode_problems_drops_long_prompts(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ps = [Problem(f"u{i}", [{"role": "user", "content": "1+1?" * (1 + 20 * i)}], "math", ["2"], "t") for i in range(3)]
    ids, kept, counts = encode_problems(tok, ps, max_prompt_tokens=40)
    assert [p.uid for p in kept] == ["u0"] and list(ids) == ["u0"]
    assert counts == {"encoded": 1, "prompt_too_long": 2}


def test_missing_chat_template_is_an_error(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat_template"):
        encode_prompt(tok, [{"role": "user", "content": "x"}])
