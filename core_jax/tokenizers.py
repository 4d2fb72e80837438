"""SentencePiece tokenization for SigLIP's text tower.

SigLIP's text tower reads exactly `length` token ids (64 for the released
checkpoints), pools the last position, and applies no padding mask. So every
text is canonicalised, tokenized, given one EOS, truncated, and padded to the
full length with the pad id, which equals the EOS id ("sticky EOS"). Padding
to the longest text of a batch instead would change the embeddings.

Canonicalisation follows the SigLIP tokenizer of `transformers` (itself a
port of big_vision's prompt canonicalisation): lowercase, remove ASCII
punctuation (`string.punctuation`), collapse runs of whitespace to one space,
strip. No trailing period is added.

The token ids equal those of `transformers.SiglipTokenizer` loaded from the
same model file with `padding="max_length", truncation=True`, with one
deliberate difference: that tokenizer treats the literal strings `</s>` and
`<unk>` inside a text as control tokens, while here they are ordinary text
(canonicalised to `s` and `unk`), as in big_vision. A caption that happens to
contain markup must not be able to end itself early.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging

# SentencePiece's word-boundary marker (U+2581).
WORD_BOUNDARY = "\u2581"

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


def canonicalize(text: str) -> str:
    """Lowercases `text`, removes ASCII punctuation, collapses whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return _WHITESPACE.sub(" ", text).strip()


class SiglipTokenizer:
    """Turns texts into SigLIP's fixed-length int32 token ids.

    Args:
      model_file: a local SentencePiece `.model` file (read once, no network).
      length: the text tower's sequence length (64 for released checkpoints).

    Attributes:
      eos_id: the id appended after each text, also used as padding.
      vocab_size: number of pieces in the model.
    """

    def __init__(self, model_file: str | os.PathLike, length: int = 64):
        model_file = os.fspath(model_file)
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        if not os.path.isfile(model_file):
            raise ValueError(f"{model_file}: SentencePiece model file not found")

        self._processor = spm.SentencePieceProcessor()
        try:
            self._processor.Load(model_file)
        except (OSError, RuntimeError) as error:
            raise ValueError(
                f"{model_file}: not a readable SentencePiece model ({error})"
            ) from error

        self.model_file = model_file
        self.length = length
        self.vocab_size = self._processor.get_piece_size()
        self.eos_id = self._processor.piece_to_id("</s>")
        if self._processor.id_to_piece(self.eos_id) != "</s>":
            raise ValueError(
                f"{model_file}: the model has no '</s>' piece; SigLIP needs one "
                "as end-of-sequence and padding token"
            )
        self._unk_piece = self._processor.id_to_piece(self._processor.unk_id())
        # The model may add a word boundary before its input (add_dummy_prefix).
        # Encoding every text behind the unknown-token piece and dropping that
        # piece's tokens gives the same segmentation whether or not it does,
        # which is what the transformers tokenizer does too.
        self._prefix_tokens = len(self._processor.encode(self._unk_piece))
        logging.info(
            "SigLIP tokenizer %s: %d pieces, length %d, EOS/pad id %d",
            model_file,
            self.vocab_size,
            length,
            self.eos_id,
        )

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with no EOS, truncation or padding."""
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{row}] must be str, got {type(text).__name__}")
        prefixed = [
            self._unk_piece
            + canonicalize(WORD_BOUNDARY + text.replace(WORD_BOUNDARY, " "))
            for text in texts
        ]
        # An unknown piece comes out as its surface text with out_type=str, and
        # as the unknown id with out_type=int: the ids are the same either way.
        encoded = self._processor.encode(prefixed, out_type=int, num_threads=2)
        return [ids[self._prefix_tokens :] for ids in encoded]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Tokenizes a batch of texts.

        Args:
          texts: N strings.

        Returns:
          int32 (N, length): each row is the text's ids, then EOS, padded with
          the EOS id; a text longer than `length - 1` tokens is cut there so
          that EOS always fits.
        """
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of str, got one str")
        tokens = np.full((len(texts), self.length), self.eos_id, dtype=np.int32)
        for row, ids in enumerate(self.encode(texts)):
            ids = ids[: self.length - 1]
            tokens[row, : len(ids)] = ids
        return tokens


def train_sentencepiece(
    texts: Iterable[str],
    out_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "unigram",
) -> str:
    """Trains a SentencePiece model laid out like SigLIP's English vocabulary.

    The special ids are those of the released SigLIP (T5-style) vocabulary:
    pad `<pad>` = 0, EOS `</s>` = 1, unknown `<unk>` = 2, and no BOS. SigLIP
    pads with the EOS id, so id 0 never appears in its token rows. Texts are
    canonicalised before training, as they will be before tokenizing.

    Args:
      texts: training texts; empty ones (after canonicalisation) are dropped.
      out_prefix: path prefix; `{out_prefix}.model` and `.vocab` are written.
      vocab_size: requested number of pieces. With a small corpus the trainer
        may produce fewer (the limit is soft) rather than fail.
      model_type: SentencePiece model type ("unigram" or "bpe").

    Returns:
      The path of the `.model` file, loadable by `SiglipTokenizer` and by
      `transformers.SiglipTokenizer`.
    """
    out_prefix = os.fspath(out_prefix)
    corpus = [line for line in (canonicalize(t) for t in texts) if line]
    if not corpus:
        raise ValueError("train_sentencepiece needs at least one non-empty text")

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=out_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=2,
        minloglevel=2,
    )
    path = out_prefix + ".model"
    logging.info(
        "Trained SentencePiece model %s on %d texts (vocab %d)",
        path,
        len(corpus),
        vocab_size,
    )
    return path
