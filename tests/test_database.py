"""Specification of core_jax.database on the real 15,833 CC3M captions.

The database is built once per module with the real tiny SigLIP ("Tiny/16",
random weights) and a SentencePiece model trained on the captions. Expected
values come from the encoder applied directly, NumPy searches written here,
and the caption file read here with plain Python.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from core_jax import database, encoders, index, sharding, tokenizers
from core_jax.models import siglip

# Stored embeddings are float16: unit vectors round by <= 2^-11 per entry.
FLOAT16_ATOL = 1e-3


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, real_captions):
    model = siglip.SigLIP.from_variant("Tiny/16", image_size=32)
    params = siglip.init_random(model, seed=0)
    prefix = tmp_path_factory.mktemp("spm") / "captions"
    model_file = tokenizers.train_sentencepiece(real_captions, prefix, 1000)
    tokenizer = tokenizers.SiglipTokenizer(model_file, length=model.text_length)
    return encoders.SiglipTextEncoder(model, params, tokenizer, batch_size=512)


@pytest.fixture(scope="module")
def captions_file(real_captions):
    from conftest import CAPTIONS_FILE

    return CAPTIONS_FILE


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoder, captions_file):
    directory = tmp_path_factory.mktemp("db") / "cc3m"
    options = database.BuildOptions(shard_size=4096, encode_batch=2048)
    database.build(captions_file, directory, encoder, options=options, progress=False)
    return directory


@pytest.fixture(scope="module")
def db(built):
    return database.open(built)


def _expected_captions(path):
    # Plain reading: every non-blank line, stripped, in order.
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return [(row, line.strip()) for row, line in enumerate(lines) if line.strip()]


def test_count_ids_and_texts_follow_corpus_order(db, captions_file):
    expected = _expected_captions(captions_file)
    assert db.count == len(expected) == 15_833
    ids = np.array([0, 1, 4095, 4096, 15_832])
    np.testing.assert_array_equal(db.texts(ids), [expected[i][1] for i in ids])
    assert db.texts(np.array([[-1, 2]])).tolist() == [["", expected[2][1]]]


def test_manifest_records_encoder_dims_count_and_checksums(built, encoder):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["count"] == 15_833
    assert manifest["columns"]["siglip"] == {
        "encoder": encoder.name,
        "fingerprint": encoder.fingerprint,
        "dim": 64,
        "dtype": "float16",
    }
    assert manifest["columns"]["t2t"] == {"alias": "siglip"}
    assert [s["rows"] for s in manifest["shards"]] == [4096] * 3 + [15_833 - 3 * 4096]
    shard = manifest["shards"][1]
    for name, checksum in shard["files"].items():
        assert database.sha256_file(built / "shards" / name) == checksum
    stored = np.load(built / "shards" / "00001.siglip.npy", allow_pickle=False)
    assert stored.dtype == np.float16 and stored.shape == (4096, 64)


def test_stored_embeddings_are_the_encoders(db, real_captions, encoder):
    ids = np.array([0, 7, 5000, 15_832])
    want = encoder.encode([real_captions[i].strip() for i in ids])
    np.testing.assert_allclose(db.embeddings("siglip")[ids], want, atol=FLOAT16_ATOL)
    assert db.embeddings("t2t").shape == (15_833, 64)


def test_search_returns_stored_embeddings_gathered_by_id(db, built):
    queries = np.asarray(db.embeddings()[np.arange(20)])
    found = db.search(queries, 10, dedup=False)
    assert found.ids.shape == found.sims.shape == found.mask.shape == (20, 10)
    assert found.embeddings.shape == (20, 10, 64)
    assert found.embeddings.dtype == np.float32
    stored = np.concatenate(
        [
            np.load(p, allow_pickle=False)
            for p in sorted(built.glob("shards/*.siglip.npy"))
        ]
    )
    np.testing.assert_array_equal(
        found.embeddings, stored[found.ids].astype(np.float32)
    )
    # Each query is a stored row: its best neighbour scores |q|^2 ~ 1.
    full = queries @ stored.astype(np.float32).T
    want = np.sort(full, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(found.sims, want, atol=1e-5)


# The random-weight tiny SigLIP maps most captions within cosine 0.97 of each
# other, so these tests link only near-identical captions (>= 0.999).
NEAR_IDENTICAL = 0.999


def test_dedup_keeps_no_linked_pair_and_fills_k(db):
    stored = np.asarray(db.embeddings())
    rng = np.random.default_rng(0)
    queries = stored[rng.choice(len(stored), 50, replace=False)]
    found = db.search(queries, 10, dedup_threshold=NEAR_IDENTICAL)
    assert found.mask.all()  # 15k captions leave k after de-duplication
    for row in range(50):
        kept = stored[found.ids[row]]
        kept = kept / np.linalg.norm(kept, axis=1, keepdims=True)
        cosine = kept @ kept.T
        # Kept captions lead different components, so none are linked.
        assert np.all(cosine[np.triu_indices(10, 1)] < NEAR_IDENTICAL)
        assert np.all(np.diff(found.sims[row]) <= 1e-6)


def test_dedup_drops_repeated_captions(db, real_captions):
    # Real duplicates in the corpus: identical texts, identical embeddings.
    seen, pairs = {}, []
    for i, text in enumerate(t.strip() for t in real_captions):
        if text in seen:
            pairs.append((seen[text], i))
        seen[text] = i
    assert pairs, "the corpus has repeated captions"
    first, second = pairs[0]
    query = db.embeddings()[np.array([first])]
    plain = db.search(query, 10, dedup=False).ids[0]
    assert {first, second} <= set(plain.tolist())
    found = db.search(query, 10, dedup_threshold=NEAR_IDENTICAL)
    assert found.mask.all()
    assert len({first, second} & set(found.ids[0].tolist())) == 1


def test_default_threshold_masks_when_everything_is_alike(db):
    # With 0.94 nearly every caption of this model is linked: the fetch is
    # capped and the empty slots are masked, with zeros, not garbage.
    found = db.search(np.asarray(db.embeddings()[np.arange(3)]), 10)
    assert found.mask[:, 0].all() and not found.mask.all()
    assert np.all(found.ids[~found.mask] == -1)
    assert np.all(found.sims[~found.mask] == 0)
    assert np.all(found.embeddings[~found.mask] == 0)


def test_k_larger_than_database_is_an_error(db):
    with pytest.raises(database.DatabaseError, match="k=15834 .* 15833"):
        db.search(np.zeros((1, 64), np.float32), 15_834)


def test_scann_tree_recall_at_10_against_exact_on_real_embeddings(db):
    stored = np.asarray(db.embeddings())
    # Force the partitioned tree (15k rows would get brute force). This
    # random-weight model packs all captions into a narrow cone (median
    # cosine 0.97), which blurs the k-means leaves: a third of the leaves
    # and 1,000 re-ordered candidates are searched instead of the defaults.
    scann_index = index.build(
        stored, backend="scann", brute_force=False, leaves_to_search=40, reorder=1000
    )
    assert isinstance(scann_index, index.ScannIndex)
    assert scann_index.params.num_leaves == round(np.sqrt(len(stored)))
    rng = np.random.default_rng(1)
    queries = stored[rng.choice(len(stored), 300, replace=False)]
    queries = queries + 0.05 * rng.standard_normal(queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids, _ = scann_index.search(queries, 10)
    # Recall by score at rank 10, ties counted, inner product on both sides.
    scores = queries.astype(np.float64) @ stored.astype(np.float64).T
    kth = np.sort(scores, axis=1)[:, -10]
    hits = np.take_along_axis(scores, ids, axis=1) >= kth[:, None] - 1e-6
    assert hits.mean() >= 0.95


def test_exact_search_identical_on_one_and_eight_devices(db):
    stored = np.asarray(db.embeddings())
    queries = stored[:64]
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        idx = index.build(
            stored, backend="exact", mesh=sharding.make_mesh(devices), dtype=np.float16
        )
        results.append(idx.search(queries, 10))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_open_refuses_another_encoder(built, encoder):
    other = encoders.SiglipTextEncoder(
        encoder.model,
        jax.tree_util.tree_map(lambda p: p * 1.01, encoder.params),
        encoder.tokenizer,
    )
    with pytest.raises(database.EncoderMismatchError, match="manifest.json.*built by"):
        database.open(built, encoder=other)
    database.open(built, encoder=encoder)  # the right one is accepted


def test_rebuilding_a_half_written_shard_gives_identical_files(
    tmp_path, built, encoder, captions_file
):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    # A build killed while writing shard 2: no done record, a truncated
    # embedding file, a temporary file, no index for it and no manifest.
    (copy / "manifest.json").unlink()
    (copy / "shards" / "00002.done.json").unlink()
    (copy / "shards" / "00003.done.json").unlink()
    (copy / "shards" / "00003.texts.parquet").unlink()
    data = (copy / "shards" / "00002.siglip.npy").read_bytes()
    (copy / "shards" / "00002.siglip.npy").write_bytes(data[: len(data) // 3])
    (copy / "shards" / "00002.texts.parquet.partial").write_bytes(b"PAR1 half")
    shutil.rmtree(copy / "index")
    with pytest.raises(database.IncompleteError, match="did not finish"):
        database.open(copy)
    options = database.BuildOptions(shard_size=4096, encode_batch=2048)
    database.build(captions_file, copy, encoder, options=options, progress=False)
    _assert_same_tree(built, copy)


def _assert_same_tree(a, b):
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for name in files_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
