"""Tokenizers, saved into and loaded from workdirs (`<workdir>/tokenizer/`).

`BpeTokenizer` (kind "bpe") is a byte-level BPE trained offline on the training captions with Hugging
Face `tokenizers` (no download). `ClipBpeTokenizer` (kind "clip_bpe") is CLIP's own BPE (OpenAI CLIP /
open_clip, 49408 tokens), built from its merges file, which ships with the package
(`dalle2_jax/assets/bpe_simple_vocab_16e6.txt.gz`, MIT, OpenAI) and is copied into the workdir.

A tokenizer directory holds the tokenizer's own files and `tokenizer_meta.json`, naming its kind, the
start/end-of-text ids, the padding id and the context length; text is pooled at `eot_id`. Encoding gives
[SOT] tokens... [EOT] then zero padding; over-long text is truncated keeping the end token.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Iterable, Sequence

import numpy as np

from dalle2_jax import fileio

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
        fileio.write_text(fileio.join(directory, "tokenizer.json"), self._tok.to_str(pretty=True))
        meta = dict(kind=self.kind, file="tokenizer.json", context_length=self.context_length,
                    vocab_size=self.vocab_size, pad_id=self.pad_id, sot_id=self.sot_id, eot_id=self.eot_id)
        fileio.write_json(fileio.join(directory, META_FILE), meta)

    @classmethod
    def load(cls, directory: str, meta: dict) -> "BpeTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(fileio.read_text(fileio.join(directory, meta["file"]))), meta["context_length"])


CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 49152 - 256 - 2  # merges used: vocab 49408 = 256 bytes + 256 word-final + merges + 2


def default_clip_bpe_path() -> str:
    """The CLIP merges file shipped with the package (see dalle2_jax/assets/LICENSE-clip-bpe.txt)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", CLIP_BPE_FILE)


@functools.lru_cache()
def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in the id order of CLIP's first 256 tokens:
    the printable bytes as themselves, then the other bytes (ascending) as chr(256 + n)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
                 + list(range(0xAE, 0xFF + 1)))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clip_clean(text: str) -> str:
    """CLIP's text cleaning ('lower'): ftfy.fix_text, HTML unescape twice, strip, whitespace runs to one
    space, lowercase."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipBpeTokenizer:
    """CLIP's BPE: ids 0-255 bytes, 256-511 word-final bytes, then the merges, sot 49406, eot 49407;
    zero padding (pad id 0, which is also the token '!': harmless, the text tower pools at the EOT)."""

    kind = "clip_bpe"
    special_tokens = ("<start_of_text>", "<end_of_text>")

    def __init__(self, bpe_path: str | None = None, context_length: int = 77):
        import regex

        self.bpe_path = bpe_path or default_clip_bpe_path()
        lines = gzip.decompress(fileio.read_bytes(self.bpe_path)).decode("utf-8").split("\n")[1: CLIP_NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        symbols = list(_byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(self.special_tokens)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _byte_symbols()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: dict[str, tuple[str, ...]] = {t: (t,) for t in self.special_tokens}
        self._pattern = regex.compile("|".join(self.special_tokens)
                                      + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                      regex.IGNORECASE)
        self.context_length = int(context_length)
        self.vocab_size = len(vocab)
        self.pad_id = 0
        self.sot_id, self.eot_id = self.encoder[self.special_tokens[0]], self.encoder[self.special_tokens[1]]

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """One pre-tokenised piece (byte symbols) -> its BPE symbols, the last one ending in </w>."""
        if piece in self._cache:
            return self._cache[piece]
        word = tuple(piece[:-1]) + (piece[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self._cache[piece] = word
        return word

    def encode_ids(self, text: str) -> list[int]:
        """text -> token ids without SOT/EOT or truncation."""
        ids: list[int] = []
        for piece in self._pattern.findall(clip_clean(text)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(symbols))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> int32 ids [N, context_length]: SOT, tokens, EOT, zero padding; over-long text is cut to
        the context and its last position set to EOT (as open_clip does)."""
        out = np.zeros((len(texts), self.context_length), np.int32)
        for i, text in enumerate(texts):
            ids = [self.sot_id] + self.encode_ids(text) + [self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_id
            out[i, : len(ids)] = ids
        return out

    def encode(self, text: str) -> np.ndarray:
        """One text -> int32 ids [context_length]."""
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text (as cleaned: lowercased), up to the first EOT, without SOT."""
        symbols = [self.decoder[i] for i in (int(i) for i in ids) if i != self.sot_id]
        if self.special_tokens[1] in symbols:
            symbols = symbols[: symbols.index(self.special_tokens[1])]
        words = "".join(symbols).split("</w>")
        return " ".join(bytearray(self.byte_decoder[c] for c in w).decode("utf-8", errors="replace")
                        for w in words if w)

    def is_truncated(self, text: str) -> bool:
        """Whether `text` does not fit the context (it would lose tokens)."""
        return len(self.encode_ids(text)) > self.context_length - 2

    def save(self, directory: str) -> None:
        """Copies the merges file into `directory` and writes tokenizer_meta.json."""
        dst = fileio.join(directory, CLIP_BPE_FILE)
        if fileio.resolve(self.bpe_path) != fileio.resolve(dst):
            fileio.copy_file(self.bpe_path, dst)
        meta = dict(kind=self.kind, file=CLIP_BPE_FILE, context_length=self.context_length,
                    vocab_size=self.vocab_size, pad_id=self.pad_id, sot_id=self.sot_id, eot_id=self.eot_id)
        fileio.write_json(fileio.join(directory, META_FILE), meta)

    @classmethod
    def load(cls, directory: str, meta: dict) -> "ClipBpeTokenizer":
        return cls(fileio.join(directory, meta["file"]), meta["context_length"])


TOKENIZER_KINDS = {"bpe": BpeTokenizer, "clip_bpe": ClipBpeTokenizer}


def load_tokenizer(directory: str):
    """Loads the tokenizer saved in `directory` (a workdir's `tokenizer/`), whatever its kind."""
    path = fileio.join(directory, META_FILE)
    if not fileio.exists(path):
        raise FileNotFoundError(f"no tokenizer in {directory!r} (missing {META_FILE})")
    meta = fileio.read_json(path)
    if meta.get("kind") not in TOKENIZER_KINDS:
        raise ValueError(f"{path}: unknown tokenizer kind {meta.get('kind')!r}; known: {sorted(TOKENIZER_KINDS)}")
    return TOKENIZER_KINDS[meta["kind"]].load(directory, meta)
