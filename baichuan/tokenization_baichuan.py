"""`BaichuanTokenizer`: the slow sentencepiece tokenizer of Baichuan2, for transformers 5.

Behaviour as the reference Baichuan2 tokenizer's: ids come straight from `tokenizer.model`; BOS is
added by default when built from a vocab file alone (`add_bos_token=True`), while the shipped
`tokenizer_config.json` turns it off and sets pad to "<unk>"; decoding keeps the reference's spacing
quirk around special tokens.

Example:
    >>> from baichuan import BaichuanTokenizer
    >>> tok = BaichuanTokenizer.from_pretrained("output/tiny-baichuan2-chat")
    >>> tok.decode(tok.encode("你好", add_special_tokens=False))
    '你好'
"""

from __future__ import annotations

import json
import os
from shutil import copyfile
from typing import Any, ClassVar

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class BaichuanTokenizer(PreTrainedTokenizer):
    """Baichuan2 tokenizer over a sentencepiece BPE model (`tokenizer.model`).

    Args:
        vocab_file: path of the sentencepiece model.
        unk_token / bos_token / eos_token / pad_token: special tokens (pad defaults to none).
        add_bos_token / add_eos_token: whether `build_inputs_with_special_tokens` adds BOS / EOS.
        sp_model_kwargs: extra arguments for `SentencePieceProcessor`.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = None,
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        self.sp_model_kwargs = {} if sp_model_kwargs is None else sp_model_kwargs
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # The sentencepiece model must exist before the base __init__, which looks tokens up while
        # registering the special tokens.
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        kwargs.pop("backend", None)
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            backend="sentencepiece",
            **kwargs,
        )

    # --- pickling: the sentencepiece processor is not picklable ---------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["_sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        proto = state.pop("_sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(proto)

    # --- vocabulary --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (added tokens not counted)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        """Piece -> id for every sentencepiece piece, plus the added tokens."""
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Pieces of `text` (special tokens have been split off by the caller)."""
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces into text.

        Runs of ordinary pieces are decoded by sentencepiece; special tokens are emitted literally. As in
        the reference, a special token that follows an ordinary piece (and is not the first token) puts
        one space before that preceding run: `[a, <s>, b, </s>]` -> " A<s> B</s>".
        """
        specials = set(self.all_special_tokens)
        out = ""
        run: list[str] = []
        prev_is_special = False
        for i, token in enumerate(tokens):
            if token in specials:
                if not prev_is_special and i != 0:
                    out += " "
                out += self.sp_model.decode(run) + token
                prev_is_special = True
                run = []
            else:
                run.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(run)

    # --- special tokens ----------------------------------------------------------------------
    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """`[bos]? + a + [eos]?`, and for a pair `+ [bos]? + b + [eos]?`."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            output = output + bos + list(token_ids_1) + eos
        return output

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 where `build_inputs_with_special_tokens` puts BOS/EOS, 0 on sequence tokens."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """0 over the first sequence (with its special tokens), 1 over the second."""
        n_special = int(self.add_bos_token) + int(self.add_eos_token)
        output = [0] * (len(token_ids_0) + n_special)
        if token_ids_1 is not None:
            output += [1] * (len(token_ids_1) + n_special)
        return output

    # --- saving ------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write `tokenizer.model` into `save_directory` (copied, or serialised if the file is gone)."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"Vocabulary path ({save_directory}) should be a directory")
        out_vocab_file = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_vocab_file) and os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, out_vocab_file)
        elif not os.path.isfile(self.vocab_file):
            with open(out_vocab_file, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out_vocab_file,)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """Save like the base class, then record `add_bos_token`/`add_eos_token` in tokenizer_config.json.

        transformers 5 drops those two keys when saving, which would silently turn BOS back on at the
        next load (the constructor default); the real shipped config stores `add_bos_token: false`.
        """
        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        config_file = os.path.join(str(save_directory), (prefix + "-" if prefix else "") + TOKENIZER_CONFIG_FILE)
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        config["add_bos_token"] = self.add_bos_token
        config["add_eos_token"] = self.add_eos_token
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files


__all__ = ["BaichuanTokenizer"]
