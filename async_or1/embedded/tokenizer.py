"""A small byte-level BPE tokenizer with a Qwen/R1-like chat template, saved in Hugging Face format.

The normalizer and pre-tokenizer are exactly Qwen2's: ``AutoTokenizer`` loads any model dir
whose config says ``qwen2`` as ``Qwen2Tokenizer``, which rebuilds them from its own
constants and keeps only vocab and merges from tokenizer.json. Anything else here would
tokenize differently after a reload than during the build. So digits are one token each
(arithmetic digit by digit, as in the real R1-distill models) and words merge.
"""

from __future__ import annotations

from pathlib import Path

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"          # end of a turn = eos, as in Qwen2/R1-distill chat models
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, THINK, END_THINK]

# Qwen2's split pattern (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX): letter runs, single
# digits, punctuation runs, newlines, spaces.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# R1-distill style: turns in <|im_start|>role ... <|im_end|>; an assistant turn in history keeps only
# the text after its reasoning; the generation prompt opens the reasoning with <think>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif -%}"
)


def train_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A tokenizers.Tokenizer trained on ``corpus`` (deterministic for a given corpus)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def to_hf(tok):
    """Wrap as a transformers fast tokenizer with the chat template and special tokens set."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None,
                                 unk_token=None, additional_special_tokens=[IM_START, THINK, END_THINK],
                                 model_max_length=2048, padding_side="left", clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_tokenizer(corpus: list[str], out_dir: str | Path, vocab_size: int = 512):
    hf = to_hf(train_tokenizer(corpus, vocab_size))
    hf.save_pretrained(str(out_dir))
    return hf
