"""Random tiny model folders, built offline in seconds, for the tests and the benchmark.

Baichuan2 (`make_tiny_model`, `make_tiny_tokenizer`, `tiny_config`): the tokenizer mirrors the real
one's layout: ids 0/1/2 = <unk>/<s>/</s>, ids 3..196 user-defined `<reserved_N>` pieces with
195/196 = `<reserved_106>`/`<reserved_107>` (the chat turn markers), then the 256 byte-fallback
pieces, then BPE merges (byte fallback, digits split, no dummy prefix, identity normalisation),
trained on `TINY_CORPUS`. The model is hidden 128 / intermediate 256 / 2 layers / 4 heads (multiples
of 128, which the CPU 4-bit kernels need) with a generation_config.json mirroring Baichuan2-7B-Chat's.

Qwen2 (`make_tiny_qwen2`): a random tiny Qwen2ForCausalLM with a fast byte-level BPE tokenizer and a
ChatML chat template, no pad token unless asked: the non-Baichuan path (the
DeepSeek-R1-Distill-Qwen design: Auto classes, chat template, no pad token).

Examples:
    python -c "from tools.tiny_models import make_tiny_model; print(make_tiny_model('/tmp/tiny-baichuan'))"
    python tools/tiny_models.py qwen2 /tmp/tiny-qwen2
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

TINY_CORPUS = """你好，我是孙悟空，齐天大圣。今天天气很好，我们一起去花果山吧！
刻晴会用什么元素？刻晴使用雷元素。钟离是岩元素的神，他住在璃月港。
请问你叫什么名字？我叫旅行者，来自遥远的星空。你的说话风格要全面模仿被赋予的人格角色。
你喜欢吃什么？我喜欢吃桃子和香蕉。现在请你回答我的一些问题。
角色扮演：请你扮演一个可爱的小猫，说话要温柔，不要太过于正式或礼貌。
Hello world! This is a tiny test corpus with ASCII words, numbers 12345 and 67890.
The quick brown fox jumps over the lazy dog. 1 + 2 = 3, and 10 * 7 = 70.
User: what is your name? Assistant: my name is Baichuan, nice to meet you.
"""

USER_TOKEN = "<reserved_106>"  # id 195
ASSISTANT_TOKEN = "<reserved_107>"  # id 196
USER_TOKEN_ID = 195
ASSISTANT_TOKEN_ID = 196
TINY_VOCAB_SIZE = 768
TINY_MAX_LENGTH = 512

# generation_config.json of Baichuan2-7B-Chat, with a small max_new_tokens for tests.
CHAT_GENERATION_CONFIG: dict[str, Any] = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "user_token_id": USER_TOKEN_ID,
    "assistant_token_id": ASSISTANT_TOKEN_ID,
    "max_new_tokens": 32,
    "temperature": 0.3,
    "top_k": 5,
    "top_p": 0.85,
    "repetition_penalty": 1.05,
    "do_sample": True,
}

TINY_MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": TINY_MAX_LENGTH,
    "model_max_length": TINY_MAX_LENGTH,
}


def reserved_symbols() -> list[str]:
    """User-defined pieces for ids 3..196: `<reserved_N>` fillers, then 195/196 = reserved_106/107."""
    fillers = [f"<reserved_{n}>" for n in [*range(106), *range(108, 194)]]  # 192 names, ids 3..194
    return fillers + [USER_TOKEN, ASSISTANT_TOKEN]


def train_tiny_sentencepiece(vocab_size: int = TINY_VOCAB_SIZE, text: str = TINY_CORPUS) -> bytes:
    """A serialised sentencepiece BPE model trained on `text` with the Baichuan2 options."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines() * 20),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=reserved_symbols(),
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def make_tiny_tokenizer(directory: str | os.PathLike, model_max_length: int = TINY_MAX_LENGTH) -> Path:
    """Write a tiny BaichuanTokenizer folder (tokenizer.model + configs as shipped) and return its path.

    Saved like the real shipped tokenizer_config.json: add_bos_token false, pad "<unk>".
    """
    from baichuan import BaichuanTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw_model = directory / "tokenizer.model"
    raw_model.write_bytes(train_tiny_sentencepiece())
    tokenizer = BaichuanTokenizer(
        vocab_file=str(raw_model), add_bos_token=False, add_eos_token=False, pad_token="<unk>",
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(directory)
    return directory


def tiny_config(**overrides: Any) -> Any:
    """A tiny BaichuanConfig (vocab = tiny tokenizer size); keyword arguments override fields."""
    from baichuan import BaichuanConfig

    fields = {"vocab_size": TINY_VOCAB_SIZE, **TINY_MODEL_CONFIG, **overrides}
    return BaichuanConfig(**fields)


def make_tiny_model(directory: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write a random tiny BaichuanForCausalLM folder (safetensors, config, generation config,
    tokenizer) and return its path. Keyword arguments override config fields (e.g.
    `position_embedding="alibi"`)."""
    import torch
    from transformers import GenerationConfig

    from baichuan import BaichuanForCausalLM

    directory = Path(directory)
    make_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    model = BaichuanForCausalLM(tiny_config(**overrides))
    model.generation_config = GenerationConfig(**CHAT_GENERATION_CONFIG)
    model.save_pretrained(directory)
    return directory


# ChatML-style template like Qwen2's: the assistant reply is what training puts loss on.
QWEN2_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_CORPUS = [
    "你好，今天天气很好。", "请问你是谁？我是一个助手。", "刻晴是璃月的玉衡星，使用雷元素。",
    "孙悟空是齐天大圣，会七十二变。", "the quick brown fox jumps over the lazy dog 0123456789",
    "system user assistant 角色 问题 回答 性别 国籍 元素力 身份 性格",
]


def make_tiny_qwen2(out_dir: str | Path, with_pad: bool = False, hidden: int = 128) -> Path:
    """Write a random tiny Qwen2ForCausalLM + fast BPE tokenizer (no pad token unless asked)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=QWEN2_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(QWEN2_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None,
                                   pad_token="<|endoftext|>" if with_pad else None)
    fast.chat_template = QWEN2_CHAT_TEMPLATE
    fast.save_pretrained(out)
    config = Qwen2Config(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


__all__ = [
    "ASSISTANT_TOKEN",
    "ASSISTANT_TOKEN_ID",
    "CHAT_GENERATION_CONFIG",
    "QWEN2_CHAT_TEMPLATE",
    "QWEN2_CORPUS",
    "QWEN2_SPECIALS",
    "TINY_CORPUS",
    "TINY_MAX_LENGTH",
    "TINY_MODEL_CONFIG",
    "TINY_VOCAB_SIZE",
    "USER_TOKEN",
    "USER_TOKEN_ID",
    "make_tiny_model",
    "make_tiny_qwen2",
    "make_tiny_tokenizer",
    "reserved_symbols",
    "tiny_config",
    "train_tiny_sentencepiece",
]


if __name__ == "__main__":
    import sys

    kind, folder = (sys.argv[1:3] + [None, None])[:2]
    if kind not in ("baichuan", "qwen2"):
        sys.exit("usage: python tools/tiny_models.py baichuan|qwen2 [FOLDER]")
    if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `baichuan` lives in the repo root
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    make = make_tiny_model if kind == "baichuan" else make_tiny_qwen2
    print(make(folder or f"/tmp/tiny-{kind}"))
