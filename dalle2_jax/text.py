"""Tokenizers, saved into and loaded from workdirs (`<workdir>/tokenizer/`).

`BpeTokenizer` is a byte-level BPE trained offline on the training captions with Hugging Face
`tokenizers` (no download). A tokenizer directory holds the tokenizer's own files and
`tokenizer_meta.json`, naming its kind, the start/end-of-text ids, the padding id and the context length;
text is pooled at `eot_id`. Encoding gives [SOT] tokens... [EOT] then zero padding; over-long text is
truncated keeping the end token.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

META_FILE = "tokenizer_meta.json"
PAD, SOT, EOT = "<|pad|>", "<|startoftext|>", "<|endoftext|>"


class BpeTokenizer:
    """A byte-level BPE over lowercased text with ids pad=0, sot=1, eot=2."""

    kind = "bpe"

    def __init__(self, tokenizer, context_length: int):
        self._tok = tokenizer
        self.context_length = int(context_length)
        self.pad_id = tokenizer.token_to_id(PAD)
        self.sot_id = tokenizer.token_to_id(SOT)
        self.eot_id = tokenizer.token_to_id(EOT)
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, context_length: int) -> "BpeTokenizer":
        """Trains a BPE of at most `vocab_size` tokens on `texts`."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, SOT, EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, context_length)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> int32 ids [N, context_length]: SOT, tokens, EOT, zero padding (EOT kept on truncation)."""
        out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
        for i, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.sot_id] + enc.ids[: self.context_length - 2] + [self.eot_id]
            out[i, : len(ids)] = ids
        return out

    def encode(self, text: str) -> np.ndarray:
        """One text -> int32 ids [context_length]."""
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text, special tokens dropped."""
        return self._tok.decode([int(i) for i in ids if i not in (self.pad_id, self.sot_id, self.eot_id)]).strip()

    def is_truncated(self, text: str) -> bool:
        """Whether `text` does not fit the context (it would lose tokens)."""
        return len(self._tok.encode(text, add_special_tokens=False).ids) > self.context_length - 2

    def save(self, directory: str) -> None:
        """Writes tokenizer.json and tokenizer_meta.json into `directory`."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        meta = dict(kind=self.kind, file="tokenizer.json", context_length=self.context_length,
                    vocab_size=self.vocab_size, pad_id=self.pad_id, sot_id=self.sot_id, eot_id=self.eot_id)
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, directory: str, meta: dict) -> "BpeTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(os.path.join(directory, meta["file"])), meta["context_length"])


TOKENIZER_KINDS = {"bpe": BpeTokenizer}


def load_tokenizer(directory: str):
    """Loads the tokenizer saved in `directory` (a workdir's `tokenizer/`), whatever its kind."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer in {directory!r} (missing {META_FILE})")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("kind") not in TOKENIZER_KINDS:
        raise ValueError(f"{path}: unknown tokenizer kind {meta.get('kind')!r}; known: {sorted(TOKENIZER_KINDS)}")
    return TOKENIZER_KINDS[meta["kind"]].load(directory, meta)
