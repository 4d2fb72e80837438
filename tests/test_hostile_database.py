"""Hostile corpora and damaged databases: each is a counted skip or repair,
or an error of a stated type whose message names the file, shard or row.

Small databases built with the real tiny SigLIP ("Tiny/16", random weights)
and a SentencePiece model trained on real captions.
"""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core_jax import database, encoders, tokenizers
from core_jax.models import siglip

FLOAT16_ATOL = 1e-3  # stored float16 unit vectors


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, real_captions):
    model = siglip.SigLIP.from_variant("Tiny/16", image_size=32)
    params = siglip.init_random(model, seed=0)
    prefix = tmp_path_factory.mktemp("spm") / "captions"
    model_file = tokenizers.train_sentencepiece(real_captions[:4000], prefix, 1000)
    tokenizer = tokenizers.SiglipTokenizer(model_file, length=model.text_length)
    return encoders.SiglipTextEncoder(model, params, tokenizer, batch_size=64)


def _build(corpus, directory, encoder, **options):
    options.setdefault("shard_size", 4)
    options.setdefault("backend", "exact")
    return database.open(
        database.build(
            corpus,
            directory,
            encoder,
            options=database.BuildOptions(**options),
            progress=False,
        )
    )


def _stats(db):
    return db.manifest["source"]["stats"]


def test_text_file_with_bom_crlf_cp1252_controls_and_no_final_newline(
    tmp_path, encoder
):
    corpus = tmp_path / "captions.txt"
    corpus.write_bytes(
        b"\xef\xbb\xbfa dog on a beach\r\n"
        b"   \r\n"
        b"caf\xe9 terrace at night\r\n"  # cp1252 e-acute, not UTF-8
        b"\r\n"
        b"tab\tand bell\x07 inside\n"
        b"na\xc3\xafve utf-8 text\n"
        b"the last line, cut off"
    )
    db = _build(corpus, tmp_path / "db", encoder)
    want = [
        "a dog on a beach",
        "caf\u00e9 terrace at night",
        "tab and bell  inside",
        "na\u00efve utf-8 text",
        "the last line, cut off",
    ]
    assert db.texts(np.arange(5)).tolist() == want
    stats = _stats(db)
    assert stats["rows"] == 7 and stats["kept"] == 5
    assert stats["skipped"] == {"empty or whitespace-only caption": 2}
    assert stats["repaired"] == {
        "UTF-8 byte order mark removed": 1,
        "control characters replaced by spaces": 1,
        "final line has no newline": 1,
        "invalid UTF-8 decoded as cp1252": 1,
    }
    # Captions and embedding rows stay aligned across the skips.
    np.testing.assert_allclose(
        db.embeddings()[np.arange(5)], encoder.encode(want), atol=FLOAT16_ATOL
    )
    # Shard 1 holds the fifth caption, from line 6 of the file (0-based).
    shard = pq.read_table(db.directory / "shards" / "00001.texts.parquet")
    assert shard.column("source_row").to_pylist() == [6]
    assert shard.column("id").to_pylist() == [4]


def test_a_100_kb_caption_is_kept_whole_and_embedded(tmp_path, encoder):
    long_caption = "a very long caption " * 5000  # 100,000 characters
    corpus = tmp_path / "captions.txt"
    corpus.write_text(f"short one\n{long_caption}\n", encoding="utf-8")
    db = _build(corpus, tmp_path / "db", encoder)
    assert db.texts(np.array([1]))[0] == long_caption.strip()
    np.testing.assert_allclose(
        db.embeddings()[np.array([1])],
        encoder.encode([long_caption.strip()]),
        atol=FLOAT16_ATOL,
    )


def test_jsonl_with_nulls_lists_numbers_and_broken_lines(tmp_path, encoder):
    corpus = tmp_path / "captions.jsonl"
    lines = [
        json.dumps({"caption": "first caption", "url": "x"}),
        json.dumps({"caption": None}),
        json.dumps({"caption": ["a", "list"]}),
        json.dumps({"caption": 42}),
        "{not json",
        json.dumps({"other": "no caption key"}),
        json.dumps({"caption": "  \u0000 "}),
        json.dumps({"caption": "lone \ud800 surrogate"}),
        json.dumps({"caption": "last caption"}),
    ]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = _build(corpus, tmp_path / "db", encoder, column="caption")
    assert db.texts(np.arange(3)).tolist() == [
        "first caption",
        "lone \ufffd surrogate",
        "last caption",
    ]
    stats = _stats(db)
    assert stats["skipped"] == {
        "empty or whitespace-only caption": 1,
        "invalid JSON (Expecting property name enclosed in double quotes)": 1,
        "not a string (int)": 1,
        "not a string (list)": 1,
        "null caption": 1,
        "record lacks 'caption'": 1,
    }
    assert stats["repaired"]["lone surrogates replaced by U+FFFD"] == 1


def test_jsonl_without_the_column_names_file_and_columns(tmp_path, encoder):
    corpus = tmp_path / "captions.jsonl"
    corpus.write_text(json.dumps({"text": "a", "url": "b"}) + "\n")
    with pytest.raises(database.DatabaseError) as error:
        _build(corpus, tmp_path / "db", encoder, column="caption")
    message = str(error.value)
    assert str(corpus) in message and "'caption'" in message
    assert "['text', 'url']" in message


def test_csv_without_the_column_names_file_and_columns(tmp_path, encoder):
    corpus = tmp_path / "captions.csv"
    corpus.write_text("url,alt_text\nhttp://x,a dog\n")
    with pytest.raises(database.DatabaseError) as error:
        _build(corpus, tmp_path / "db", encoder, column="caption")
    assert str(corpus) in str(error.value)
    assert "['url', 'alt_text']" in str(error.value)


def test_tsv_with_quotes_newlines_empty_fields_and_cp1252(tmp_path, encoder):
    corpus = tmp_path / "captions.tsv"
    corpus.write_bytes(
        b"url\tcaption\n"
        b"u1\ta plain caption\n"
        b'u2\t"a quoted\nmulti-line caption"\n'
        b"u3\t\n"
        b"u4\tcaf\xe9 sign\n"
    )
    db = _build(corpus, tmp_path / "db", encoder, column="caption")
    assert db.texts(np.arange(3)).tolist() == [
        "a plain caption",
        "a quoted multi-line caption",
        "caf\u00e9 sign",
    ]
    stats = _stats(db)
    assert stats["skipped"] == {"null caption": 1}
    assert stats["repaired"]["invalid UTF-8 decoded as cp1252"] == 1


def test_parquet_with_nulls_and_stray_bytes_streams_in_batches(tmp_path, encoder):
    corpus = tmp_path / "captions.parquet"
    values = [b"first", None, b"", b"caf\xe9 bytes", b"  spaced  "]
    pq.write_table(
        pa.table({"id": [1, 2, 3, 4, 5], "caption": pa.array(values, pa.binary())}),
        corpus,
    )
    db = _build(corpus, tmp_path / "db", encoder, column="caption")
    assert db.texts(np.arange(3)).tolist() == ["first", "caf\u00e9 bytes", "spaced"]
    assert _stats(db)["skipped"] == {
        "empty or whitespace-only caption": 1,
        "null caption": 1,
    }


def test_parquet_list_column_and_missing_column(tmp_path, encoder):
    corpus = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": [["a", "b"], ["c"]]}), corpus)
    with pytest.raises(database.DatabaseError, match="no captions left"):
        _build(corpus, tmp_path / "db", encoder, column="caption")
    with pytest.raises(database.DatabaseError, match=r"columns found: \['caption'\]"):
        _build(corpus, tmp_path / "db2", encoder, column="text")


@pytest.fixture()
def small_db(tmp_path, encoder, real_captions):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(real_captions[:40]) + "\n", encoding="utf-8")
    return _build(corpus, tmp_path / "db", encoder, shard_size=16).directory


def test_damaged_shard_is_named_by_checksum_error(small_db):
    path = small_db / "shards" / "00001.siglip.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    db = database.open(small_db)
    db.embeddings()[np.array([0])]  # shard 0 is intact
    with pytest.raises(database.ChecksumError, match="00001.siglip.npy"):
        db.embeddings()[np.array([20])]
    with pytest.raises(database.ChecksumError, match="00001.siglip.npy"):
        database.open(small_db, verify="full")


def test_half_written_shard_is_named(small_db):
    path = small_db / "shards" / "00002.siglip.npy"
    path.write_bytes(path.read_bytes()[:200])
    db = database.open(small_db, verify="none")
    with pytest.raises(database.IncompleteError, match="00002.siglip.npy"):
        db.embeddings()[np.array([35])]


def test_nan_rows_are_named_by_id(small_db):
    path = small_db / "shards" / "00001.siglip.npy"
    rows = np.load(path, allow_pickle=False)
    rows[[2, 5]] = np.nan
    np.save(path, rows, allow_pickle=False)
    # A database whose checksums were recorded over the bad rows.
    manifest = json.loads((small_db / "manifest.json").read_text())
    manifest["shards"][1]["files"]["00001.siglip.npy"] = database.sha256_file(path)
    (small_db / "manifest.json").write_text(json.dumps(manifest))
    db = database.open(small_db)
    with pytest.raises(
        database.CorruptRowsError, match=r"00001.siglip.npy.*\[18, 21\]"
    ):
        db.embeddings()[np.array([17])]


def test_missing_manifest_and_unfinished_build(tmp_path, small_db):
    with pytest.raises(database.DatabaseError, match="no manifest.json"):
        database.open(tmp_path / "nowhere")
    (small_db / "manifest.json").unlink()
    with pytest.raises(database.IncompleteError, match="did not finish"):
        database.open(small_db)


def test_dims_of_another_encoder_are_refused(small_db, encoder):
    class Wider:
        # A real 128-d encoder: the SigLIP embedding and its negation.
        name, dim = "wider", 128
        fingerprint = encoder.fingerprint

        def encode(self, texts):
            z = encoder.encode(texts)
            return np.concatenate([z, -z], axis=1) / np.sqrt(2)

    with pytest.raises(database.EncoderMismatchError, match="64-d.*128-d"):
        database.open(small_db, encoder=Wider())


def test_queries_of_the_wrong_width_and_k_too_large(small_db):
    db = database.open(small_db)
    with pytest.raises(database.EncoderMismatchError, match="64-d"):
        db.search(np.zeros((1, 32), np.float32), 3)
    with pytest.raises(database.DatabaseError, match="k=41"):
        db.search(np.zeros((1, 64), np.float32), 41)


def test_resume_with_other_settings_is_refused(tmp_path, encoder, real_captions):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(real_captions[:10]) + "\n", encoding="utf-8")
    directory = tmp_path / "db"
    _build(corpus, directory, encoder, shard_size=4)
    (directory / "manifest.json").unlink()
    with pytest.raises(database.DatabaseError, match="shard_size differs") as error:
        _build(corpus, directory, encoder, shard_size=5)
    assert str(directory) in str(error.value)
    assert "--config.database_dir" in str(error.value)


def _tree(directory):
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _flip_byte(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_rebuilding_a_damaged_database_repairs_it_to_clean_bytes(
    small_db, encoder, caplog
):
    corpus = small_db.parent / "captions.txt"
    clean = _tree(small_db)
    (small_db / "shards" / "00001.siglip.npy").unlink()
    _flip_byte(small_db / "shards" / "00002.texts.parquet")
    (small_db / "shards" / "00000.done.json").unlink()
    with pytest.raises(database.IncompleteError, match="00001.siglip.npy"):
        database.open(small_db, verify="full")
    with caplog.at_level(logging.INFO):
        _build(corpus, small_db, encoder, shard_size=16)
    log = caplog.text
    assert "already a complete database" not in log
    assert "Shard 00001" in log and "00001.siglip.npy is missing" in log
    assert "Shard 00002" in log and "00002.texts.parquet does not match" in log
    assert "Shard 00000" in log and "00000.done.json is missing" in log
    assert _tree(small_db) == clean
    database.open(small_db, verify="full")

    # Intact now: a third run changes nothing and says so.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _build(corpus, small_db, encoder, shard_size=16)
    assert "already a complete database" in caplog.text
    assert _tree(small_db) == clean


def test_rebuilding_repairs_a_damaged_index_and_manifest(small_db, encoder, caplog):
    corpus = small_db.parent / "captions.txt"
    clean = _tree(small_db)
    index_file = next(p for p in sorted((small_db / "index" / "siglip").iterdir()))
    _flip_byte(index_file)
    with caplog.at_level(logging.INFO):
        _build(corpus, small_db, encoder, shard_size=16)
    assert "index/siglip does not match the manifest" in caplog.text
    assert _tree(small_db) == clean

    (small_db / "manifest.json").write_text("{not json")
    _build(corpus, small_db, encoder, shard_size=16)
    assert _tree(small_db) == clean


def test_a_corpus_changed_since_the_build_is_refused(small_db, encoder):
    corpus = small_db.parent / "captions.txt"
    with corpus.open("a", encoding="utf-8") as f:
        f.write("a caption added after the build\n")
    with pytest.raises(database.DatabaseError, match="changed since") as error:
        _build(corpus, small_db, encoder, shard_size=16)
    message = str(error.value)
    assert str(corpus) in message and "--config.database_dir" in message
    # Likewise when the first build was interrupted: nothing is mixed.
    (small_db / "manifest.json").unlink()
    with pytest.raises(database.DatabaseError, match="changed since"):
        _build(corpus, small_db, encoder, shard_size=16)
    assert not (small_db / "manifest.json").exists()


def test_missing_corpus_and_unknown_format_name_the_flags(tmp_path, encoder):
    missing = tmp_path / "nope.txt"
    with pytest.raises(database.DatabaseError) as error:
        _build(missing, tmp_path / "db", encoder)
    assert str(error.value) == (
        f"corpus file {missing} (--config.corpus) does not exist"
    )
    assert not (tmp_path / "db").exists()
    odd = tmp_path / "captions.xyz"
    odd.write_text("a caption\n")
    with pytest.raises(database.DatabaseError, match="--config.format") as error:
        _build(odd, tmp_path / "db", encoder)
    assert str(odd) in str(error.value) and "'.xyz'" in str(error.value)
    with pytest.raises(database.DatabaseError, match="--config.format"):
        _build(odd, tmp_path / "db", encoder, format="yaml")


def test_launcher_checks_the_corpus_before_loading_the_model(tmp_path):
    from configs import database as database_config  # noqa: PLC0415
    from launch import build_database  # noqa: PLC0415

    config = database_config.get_config("")
    config.corpus = str(tmp_path / "nope.txt")
    config.model.checkpoint = str(tmp_path / "no_checkpoint.npz")
    with pytest.raises(database.DatabaseError, match=r"nope\.txt \(--config\.corpus\)"):
        build_database.build_from_config(config)


def test_binary_lines_are_skipped_and_counted_with_1_based_lines(
    tmp_path, encoder, caplog
):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
    noise = noise.replace(b"\n", b"").replace(b"\r", b"")
    corpus = tmp_path / "captions.txt"
    corpus.write_bytes(
        b"a dog on a beach\n"
        b"caf\xe9 terrace at night\n"  # cp1252 text: repaired, kept
        + noise
        + b"\n"
        + b"valid\x00utf-8 with a NUL\n"
        + b"the last caption\n"
    )
    with caplog.at_level(logging.INFO):
        db = _build(corpus, tmp_path / "db", encoder)
    assert db.texts(np.arange(3)).tolist() == [
        "a dog on a beach",
        "caf\u00e9 terrace at night",
        "the last caption",
    ]
    stats = _stats(db)
    assert stats["rows"] == 5 and stats["kept"] == 3
    assert stats["skipped"] == {database.BINARY_SKIP: 2}
    assert stats["repaired"] == {"invalid UTF-8 decoded as cp1252": 1}
    assert stats["first_examples"][database.BINARY_SKIP] == "lines 3, 4"
    assert stats["first_examples"]["invalid UTF-8 decoded as cp1252"] == "line 2"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        database.BINARY_SKIP in r.getMessage()
        and "lines 3, 4" in r.getMessage()
        and str(corpus) in r.getMessage()
        for r in warnings
    )
    # The stored source_row stays 0-based, as documented.
    shard = pq.read_table(db.directory / "shards" / "00000.texts.parquet")
    assert shard.column("source_row").to_pylist() == [0, 1, 4]


def test_looks_binary_rule():
    # Printable text, with or without a few cp1252 bytes, is text.
    assert not database.looks_binary(b"caf\xe9 au lait", utf8=False)
    assert not database.looks_binary(b"tab\tand bell\x07 inside", utf8=True)
    # Any NUL byte.
    assert database.looks_binary(b"text\x00", utf8=True)
    # 3 control bytes in 12 (25% > 10%).
    assert database.looks_binary(b"\x01\x02\x03abcdefghi", utf8=True)
    # Not UTF-8 and 2 printable ASCII bytes in 6 (< half).
    assert database.looks_binary(b"ab\xe9\xe8\xea\xeb", utf8=False)
    # cp1252's undefined bytes count as control bytes only outside UTF-8.
    assert database.looks_binary(b"abcdefgh\x81\x8d", utf8=False)


def test_jsonl_line_numbers_in_errors_are_1_based(tmp_path, encoder):
    corpus = tmp_path / "captions.jsonl"
    corpus.write_text("\n" + json.dumps({"text": "a"}) + "\n")
    with pytest.raises(database.DatabaseError, match="line 2 has no caption column"):
        _build(corpus, tmp_path / "db", encoder, column="caption")


def test_unreadable_build_json_is_named(small_db, encoder):
    (small_db / "build.json").write_text("{cut off")
    with pytest.raises(database.DatabaseError, match="build.json is not valid JSON"):
        _build(small_db.parent / "captions.txt", small_db, encoder, shard_size=16)
