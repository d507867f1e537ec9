"""A tiny Qwen2-architecture chat model and tokenizer, built offline, for testing the non-Baichuan
path (the DeepSeek-R1-Distill-Qwen design): Auto classes, chat template, no pad token.

    python tests/tiny_qwen2.py /tmp/tiny-qwen2
"""

from __future__ import annotations

import sys
from pathlib import Path

# ChatML-style template like Qwen2's: the assistant reply is what training puts loss on.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
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
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None,
                                   pad_token="<|endoftext|>" if with_pad else None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    config = Qwen2Config(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


if __name__ == "__main__":
    print(make_tiny_qwen2(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-qwen2"))
