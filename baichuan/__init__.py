"""Baichuan2 for transformers 5, without remote code.

Importing this package registers the classes with the Auto API, so after `import baichuan`
`AutoConfig`, `AutoModelForCausalLM` and `AutoTokenizer` load Baichuan2 folders (model_type
"baichuan", tokenizer_class "BaichuanTokenizer") with no `trust_remote_code`.

Example:
    >>> import baichuan  # noqa: F401  (registers the Auto classes)
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained("output/tiny-baichuan2-chat")
    >>> model = AutoModelForCausalLM.from_pretrained("output/tiny-baichuan2-chat")
    >>> model.chat(tok, [{"role": "user", "content": "你好"}])
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_baichuan import BaichuanConfig
from .generation_utils import TextIterStreamer, build_chat_ids, build_chat_input
from .modeling_baichuan import BaichuanForCausalLM, BaichuanModel, BaichuanPreTrainedModel
from .quantizer import quantize_model, resident_weight_bytes
from .tokenization_baichuan import BaichuanTokenizer

# exist_ok: re-importing (e.g. importlib.reload in a notebook) must not fail.
AutoConfig.register("baichuan", BaichuanConfig, exist_ok=True)
AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaichuanTokenizer, exist_ok=True)

__all__ = [
    "BaichuanConfig",
    "BaichuanForCausalLM",
    "BaichuanModel",
    "BaichuanPreTrainedModel",
    "BaichuanTokenizer",
    "TextIterStreamer",
    "build_chat_ids",
    "build_chat_input",
    "quantize_model",
    "resident_weight_bytes",
]
