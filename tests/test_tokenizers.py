"""SigLIP tokenization: parity with transformers, padding, special ids."""

import numpy as np
import pytest
import sentencepiece as spm

from core_jax import tokenizers

HOSTILE_TEXTS = [
    "",
    " ",
    "\t\n  ",
    "...",
    "Hello, World!",
    "A  Photo\tOF a\nDOG.",
    "   leading and trailing spaces   ",
    "ÜBER straße — naïve café 日本語 ☃ 🙂",
    "İstanbul ﬁne ligatures and ＦＵＬＬＷＩＤＴＨ",
    "\u2581already\u2581marked",
    "ends with a period.",
    "a b.c,d;e:f!g?h(i)j[k]l{m}n'o\"p",
    "x" * 2000,
    "word " * 300,
    "\x00control\x07chars\x1b",
]


@pytest.fixture(scope="module")
def model_file(real_captions, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "captions"
    return tokenizers.train_sentencepiece(real_captions, prefix, vocab_size=2000)


@pytest.fixture(scope="module")
def tokenizer(model_file):
    return tokenizers.SiglipTokenizer(model_file, length=64)


def test_ids_match_transformers_on_real_and_hostile_captions(
    model_file, tokenizer, real_captions
):
    transformers = pytest.importorskip("transformers")
    reference = transformers.SiglipTokenizer(model_file)
    texts = list(real_captions) + HOSTILE_TEXTS + [" ".join(real_captions[:50])]

    expected = reference(texts, padding="max_length", max_length=64, truncation=True)[
        "input_ids"
    ]

    got = tokenizer(texts)
    assert got.dtype == np.int32
    assert got.shape == (len(texts), 64)
    np.testing.assert_array_equal(got, np.asarray(expected, dtype=np.int32))


def test_special_ids_are_siglip_layout(model_file):
    processor = spm.SentencePieceProcessor(model_file=model_file)
    assert processor.pad_id() == 0
    assert processor.eos_id() == 1
    assert processor.unk_id() == 2
    assert processor.bos_id() == -1
    assert processor.id_to_piece(1) == "</s>"


def test_short_text_is_ids_then_eos_padding_to_full_length(model_file, tokenizer):
    processor = spm.SentencePieceProcessor(model_file=model_file)
    words = processor.encode("a dog on a beach")

    row = tokenizer(["A dog, on a beach."])[0]

    assert row.shape == (64,)
    np.testing.assert_array_equal(row[: len(words)], words)
    np.testing.assert_array_equal(row[len(words) :], np.ones(64 - len(words)))


def test_no_trailing_period_is_added(model_file, tokenizer):
    processor = spm.SentencePieceProcessor(model_file=model_file)
    period_pieces = {processor.piece_to_id("."), processor.piece_to_id("▁.")}
    row = tokenizer(["a dog"])[0]
    assert not period_pieces & set(row.tolist()) - {processor.unk_id()}
    # The text and its period-terminated form tokenize alike.
    np.testing.assert_array_equal(row, tokenizer(["a dog."])[0])


def test_empty_text_is_all_eos(tokenizer):
    np.testing.assert_array_equal(tokenizer([""]), np.ones((1, 64), np.int32))


def test_long_text_is_truncated_with_eos_last(tokenizer):
    row = tokenizer(["word " * 300])[0]
    assert row.shape == (64,)
    assert row[-1] == 1
    assert (row[:-1] != 1).all()


def test_padding_does_not_depend_on_batch(tokenizer):
    alone = tokenizer(["a cat"])
    batched = tokenizer(["a cat", "a much longer caption " * 5])
    np.testing.assert_array_equal(alone[0], batched[0])


def test_other_length(model_file):
    short = tokenizers.SiglipTokenizer(model_file, length=16)
    assert short(["a b c", ""]).shape == (2, 16)


def test_literal_eos_markup_is_ordinary_text(tokenizer):
    # "</s>" canonicalises to "s": the caption goes on after it.
    np.testing.assert_array_equal(tokenizer(["a </s> dog"]), tokenizer(["a s dog"]))


def test_canonicalize():
    assert tokenizers.canonicalize("  A, B!!\t\nC.  ") == "a b c"
    assert tokenizers.canonicalize("Café—Ü") == "café—ü"


def test_missing_model_file_names_it(tmp_path):
    path = tmp_path / "nothing.model"
    with pytest.raises(ValueError, match="nothing.model"):
        tokenizers.SiglipTokenizer(path)


def test_corrupt_model_file_names_it(tmp_path):
    path = tmp_path / "broken.model"
    path.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="broken.model"):
        tokenizers.SiglipTokenizer(path)


def test_a_single_string_is_refused(tokenizer):
    with pytest.raises(ValueError, match="sequence of str"):
        tokenizer("a dog")


def test_non_string_item_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"texts\[1\] must be str, got NoneType"):
        tokenizer(["a dog", None])
