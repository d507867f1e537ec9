"""`BaichuanConfig`: the Baichuan2 model configuration (field names and defaults of Baichuan2-7B).

A real Baichuan2-7B-Chat or 13B-Chat `config.json` loads unchanged: unknown keys such as
`model_max_length`, `_from_model_config` or `auto_map` are kept as attributes by the transformers 5
config base class, and `torch_dtype` is read as `dtype`.

Example:
    >>> from baichuan import BaichuanConfig
    >>> BaichuanConfig(hidden_size=5120, num_hidden_layers=40).position_embedding
    'alibi'
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

POSITION_EMBEDDINGS = ("rope", "alibi")


def infer_position_embedding(hidden_size: int, num_hidden_layers: int) -> str:
    """The position scheme of a config that does not name one.

    The published config files do not carry a position field: Baichuan2-13B (hidden 5120, 40 layers)
    uses ALiBi biases, every other published size (7B) uses RoPE.
    """
    return "alibi" if hidden_size == 5120 and num_hidden_layers == 40 else "rope"


class BaichuanConfig(PretrainedConfig):
    """Configuration of a Baichuan2 causal LM; defaults are the Baichuan2-7B values.

    Fields beyond the published ones:
    - `z_loss_weight` (default 0): weight of the auxiliary z-loss added to the LM loss.
    - `position_embedding`: "rope" (7B) or "alibi" (13B); inferred from the sizes when absent.
    - `model_max_length` (default 4096): the context length the chat prompt builder budgets with.
      The real config.json carries it as an extra key; it is declared here so a config built in code
      has it too.
    There is no RoPE base field: it is fixed at 10000, as in the reference implementation.
    """

    model_type: ClassVar[str] = "baichuan"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values", "cache"]  # the cache under either name

    vocab_size: int = 125696
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    z_loss_weight: float = 0.0
    position_embedding: str | None = None
    model_max_length: int = 4096

    def __post_init__(self, **kwargs: Any) -> None:
        """Infer `position_embedding` when absent and validate the sizes, then run the base init."""
        if self.position_embedding is None:
            self.position_embedding = infer_position_embedding(self.hidden_size, self.num_hidden_layers)
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        """Per-head width (hidden_size / num_attention_heads); there is no separate key/value head count."""
        return self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        # Derived, not stored; a config file that spells it out must agree with the sizes.
        if value != self.hidden_size // self.num_attention_heads:
            raise ValueError(f"head_dim {value} contradicts hidden_size / num_attention_heads")


__all__ = ["BaichuanConfig", "infer_position_embedding"]
