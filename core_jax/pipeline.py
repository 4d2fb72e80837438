"""The evaluation job: stages, each cached on disk, from files to a report.

    class prototypes    SigLIP text of templated class names      (C, D)
    class neighbours    t2t retrieval of each class prompt        (C, k, D)
    image embeddings    SigLIP image tower, per split, in chunks  (N, D)
    image neighbours    i2t retrieval of each image               (N, k, D)
    sweep               grid search of alpha, beta, tau on train
    test                zero-shot and CoRE logits, metrics, report

Each stage's result is stored under `cache_dir/<stage>/<key>/`, where the key
hashes exactly what the result depends on: file fingerprints (checkpoint,
tokenizer, database manifest, the image files' names, sizes and modification
times), the config fields the stage reads, and the keys of the stages it
consumes. Changing a template therefore recomputes the class prototypes and
what follows from them, never the image embeddings. Entries are written to a
temporary folder and renamed into place, so a run killed at any moment
leaves either a finished entry or none, and a restart reuses what finished.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from absl import logging

from core_jax import report

# Bump when a stage's computation changes in a way its key does not show.
CACHE_VERSION = 1

_COMPLETE = "COMPLETE"


class PipelineError(ValueError):
    """A config value or input file the pipeline cannot use."""


class RunDirectoryExistsError(PipelineError):
    """The run directory exists and neither overwrite nor resume was asked."""


# ---------------------------------------------------------------------------
# Config validation

_WEIGHTINGS = ("softmax", "similarity")
_ON_ERROR = ("skip", "raise")


def _config_error(field: str, value, allowed: str) -> PipelineError:
    return PipelineError(f"--config.{field}={value!r}; expected {allowed}")


def _number(config, field: str):
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _check_real(field, value, allowed, accept) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise _config_error(field, value, allowed)
    if not np.isfinite(float(value)) or not accept(float(value)):
        raise _config_error(field, value, allowed)


def _check_int(field, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise _config_error(field, value, f"an integer >= {minimum}")
    if value < minimum:
        raise _config_error(field, value, f"an integer >= {minimum}")


def validate_config(config) -> None:
    """Checks every value the job reads, before any model or image is touched.

    Args:
      config: a ConfigDict as made by `configs/common.py`.

    Raises:
      PipelineError: naming the `--config.<field>`, its value and what is
        allowed.
    """
    positive = "a finite number > 0"
    unit = "a finite number in [0, 1]"
    for field in ("tau_i2t", "tau_t2t"):
        _check_real(field, _number(config, field), positive, lambda v: v > 0)
    for field in ("alpha", "beta"):
        _check_real(field, _number(config, field), unit, lambda v: 0 <= v <= 1)
    for name, allowed, accept in (
        ("alpha", unit, lambda v: 0 <= v <= 1),
        ("beta", unit, lambda v: 0 <= v <= 1),
        ("tau_i2t", positive, lambda v: v > 0),
        ("tau_t2t", positive, lambda v: v > 0),
    ):
        values = config.grid[name]
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise _config_error(
                f"grid.{name}", values, f"a non-empty list of {allowed}"
            )
        for value in values:
            try:
                _check_real(f"grid.{name}", value, allowed, accept)
            except PipelineError:
                raise PipelineError(
                    f"--config.grid.{name}={tuple(values)!r} holds {value!r}; "
                    f"expected every value to be {allowed}"
                ) from None
    if config.weighting not in _WEIGHTINGS:
        raise _config_error("weighting", config.weighting, f"one of {_WEIGHTINGS}")
    if config.on_error not in _ON_ERROR:
        raise _config_error("on_error", config.on_error, f"one of {_ON_ERROR}")
    _check_real(
        "dedup_threshold",
        config.dedup_threshold,
        "a finite number in (0, 1]",
        lambda v: 0 < v <= 1,
    )
    _check_int("k", config.k, 1)
    for field in (
        "image_batch_size",
        "text_batch_size",
        "image_chunk_size",
        "image_workers",
    ):
        _check_int(field, _number(config, field), 1)
    _check_int("qualitative_samples", config.qualitative_samples, 0)
    limit = config.dataset.get("limit", 0)
    try:
        _check_int("dataset.limit", limit, 0)
    except PipelineError:
        raise _config_error(
            "dataset.limit", limit, "an integer >= 0 (0: every image)"
        ) from None


# ---------------------------------------------------------------------------
# Fingerprints


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_path(
    path: str | os.PathLike, memo_dir: str | os.PathLike | None = None
) -> str:
    """A SHA-256 of a file's bytes, or of a folder's file names and bytes.

    Hashing a multi-gigabyte checkpoint takes seconds, so the result is
    remembered in `memo_dir` under the file's absolute path, size and
    modification time; touching or replacing the file invalidates it.

    Args:
      path: a file or a folder (every regular file below it counts).
      memo_dir: where to remember digests; None hashes every time.

    Returns:
      A hex digest.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    files = (
        [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    )
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        name = file.name if file == path else file.relative_to(path).as_posix()
        stamp = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        memo = None
        if memo_dir is not None:
            memo = pathlib.Path(memo_dir) / hashlib.sha256(stamp.encode()).hexdigest()
        if memo is not None and memo.exists():
            file_digest = memo.read_text().strip()
        else:
            file_digest = _sha256_file(file)
            if memo is not None:
                report.write_text(memo, file_digest)
        digest.update(f"{name}:{file_digest}\n".encode())
    return digest.hexdigest()


def fingerprint_files(paths: Sequence[str]) -> str:
    """A SHA-256 of image files' names, sizes and modification times.

    Missing files hash as missing (they are skipped later, with a reason).
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()


def _hash_json(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=report._json_default)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------
# Stage cache


@dataclasses.dataclass
class Entry:
    """One stage result: named arrays, JSON metadata, and the key it is under."""

    arrays: dict[str, np.ndarray]
    meta: dict
    key: str


# A temporary entry this old was left by a killed process, not one at work.
_ABANDONED_AFTER_S = 24 * 3600


def _remove_abandoned(folder: pathlib.Path) -> None:
    now = time.time()
    for tmp in folder.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _ABANDONED_AFTER_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


class StageCache:
    """Stage results on disk, keyed by a hash of what they depend on.

    `computed` and `reused` count, per stage name, how many results were
    computed and how many were read back; a run records both.

    Args:
      root: the cache folder; created on first write.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        self.computed: collections.Counter = collections.Counter()
        self.reused: collections.Counter = collections.Counter()

    @staticmethod
    def key(stage: str, fields: Mapping) -> str:
        """The key of `stage` computed from `fields` (any JSON-able mapping)."""
        return _hash_json({"stage": stage, "version": CACHE_VERSION, **fields})[:32]

    def path(self, stage: str, key: str) -> pathlib.Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> Entry | None:
        """The stored entry, or None when there is no finished one."""
        folder = self.path(stage, key)
        if not (folder / _COMPLETE).exists():
            return None
        with np.load(folder / "arrays.npz", allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return Entry(arrays, meta, key)

    def save(
        self,
        stage: str,
        key: str,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping,
        fields: Mapping,
    ) -> Entry:
        """Writes an entry atomically: a temporary folder, then one rename."""
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(final.parent)
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            with open(tmp / "arrays.npz", "wb") as handle:
                np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()})
                handle.flush()
                os.fsync(handle.fileno())
            (tmp / "meta.json").write_text(report.to_json(dict(meta)), "utf-8")
            (tmp / "key.json").write_text(
                report.to_json({"stage": stage, **fields}), "utf-8"
            )
            (tmp / _COMPLETE).write_text("")
            if final.exists() and not (final / _COMPLETE).exists():
                # Not ours to trust (an interrupted copy, say): replace it.
                shutil.rmtree(final)
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process finished the same entry first; theirs is
                # equal to ours by construction of the key.
                if not (final / _COMPLETE).exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(dict(arrays), dict(meta), key)

    def get(
        self,
        stage: str,
        fields: Mapping,
        compute: Callable[[], tuple[Mapping[str, np.ndarray], Mapping]],
    ) -> Entry:
        """The stored result of `stage` for `fields`, computing it if absent.

        Args:
          stage: the stage name (a folder under the cache root).
          fields: everything the result depends on (JSON-able).
          compute: returns (arrays, meta) when there is no stored entry.

        Returns:
          The entry.
        """
        key = self.key(stage, fields)
        entry = self.load(stage, key)
        if entry is not None:
            self.reused[stage] += 1
            logging.info("%s: reusing cached result %s", stage, key)
            return entry
        arrays, meta = compute()
        self.computed[stage] += 1
        return self.save(stage, key, arrays, meta, fields)

    def stats(self) -> dict[str, dict[str, int]]:
        """{stage: {"computed": n, "reused": m}} for this process so far."""
        stages = sorted(set(self.computed) | set(self.reused))
        return {
            s: {"computed": self.computed[s], "reused": self.reused[s]} for s in stages
        }


# ---------------------------------------------------------------------------
# Timing and progress


class Timer:
    """Wall-clock seconds per named step, in the order steps ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed


def _progress(iterable, total: int, description: str, unit: str):
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=description,
        unit=unit,
        disable=total < 2 or not _is_main_process(),
        leave=False,
    )


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


# ---------------------------------------------------------------------------
# Class side


def prototype_texts(
    class_names: Sequence[str],
    common_names: Sequence[str] | None,
    templates: Sequence[str],
) -> list[str]:
    """The texts whose SigLIP embeddings make the class prototypes.

    Returns:
      C * V * T strings, class-major, then name variant (scientific, then
      common when given), then template.
    """
    texts = []
    for c, name in enumerate(class_names):
        variants = [name] if common_names is None else [name, common_names[c]]
        for variant in variants:
            texts.extend(template.format(variant) for template in templates)
    return texts


def average_prototypes(
    embeddings: np.ndarray, num_classes: int, num_variants: int, num_templates: int
) -> np.ndarray:
    """Class prototypes from the embeddings of `prototype_texts`.

    For each class and name variant the template embeddings are averaged and
    re-normalised; then the name variants (scientific and common) are averaged
    and re-normalised, since a mean of unit vectors is not a unit vector.

    Args:
      embeddings: (C * V * T, D) unit-norm text embeddings.
      num_classes: C.
      num_variants: V, 1 or 2.
      num_templates: T.

    Returns:
      float32 (C, D) unit-norm prototypes.
    """
    grid = np.asarray(embeddings, np.float64).reshape(
        num_classes, num_variants, num_templates, -1
    )
    per_variant = _normalize(grid.mean(axis=2))
    return _normalize(per_variant.mean(axis=1)).astype(np.float32)


def _normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def retrieval_prompts(
    class_names: Sequence[str], common_names: Sequence[str] | None, template: str
) -> list[str]:
    """One text-to-text retrieval prompt per class.

    `template.format("scientific (common)")` when common names are given, as
    the reference release writes them, else `template.format(name)`.
    """
    if common_names is None:
        return [template.format(name) for name in class_names]
    return [
        template.format(f"{name} ({common})")
        for name, common in zip(class_names, common_names, strict=True)
    ]


# ---------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class Split:
    """A labelled split after `dataset.limit` and this process's share.

    Attributes:
      name: "train" or "test".
      paths: N image paths.
      labels: int64 (N,) class ids.
      missing: (path, reason, CSV line) of listed images that do not exist.
    """

    name: str
    paths: list[str]
    labels: np.ndarray
    missing: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Classes:
    """Class names (and common names, or None), in class-id order."""

    names: list[str]
    common: list[str] | None


def _limit(split: Split, limit: int, seed: int) -> Split:
    """A seeded subset of at most `limit` images, in the original order."""
    if limit <= 0 or len(split.paths) <= limit:
        return split
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(split.paths))[:limit])
    return Split(
        split.name,
        [split.paths[i] for i in chosen],
        split.labels[chosen],
        split.missing,
    )


def load_dataset(config) -> tuple[Classes, Split, Split]:
    """Reads the train and test splits the config names.

    Returns:
      (classes, train split, test split).
    """
    from core_jax import datasets

    data = config.dataset
    if data.source == "csv":
        if not data.root:
            raise PipelineError(
                "--config.dataset.root is not set; set it to the folder holding "
                "class_mapping.csv, train.csv and test.csv"
            )
        root = pathlib.Path(data.root).expanduser()
        if not root.is_dir():
            raise PipelineError(
                f"dataset root {str(root)!r} is not a folder; set "
                "--config.dataset.root to the folder holding class_mapping.csv, "
                "train.csv and test.csv"
            )
        images_dir = data.images_dir or None
        base = pathlib.Path(images_dir).expanduser() if images_dir else root

        def read(split):
            try:
                return datasets.from_csv(
                    root, split, images_dir=images_dir, on_missing=config.on_error
                )
            except datasets.DatasetError as error:
                # Said in the config's own terms, not the reader's argument.
                message = str(error).replace(
                    "on_missing='skip'", "--config.on_error=skip"
                )
                raise type(error)(message) from None
    elif data.source == "tfds":
        base = pathlib.Path()
        read = lambda split: datasets.from_tfds(data.name, split)  # noqa: E731
    else:
        raise PipelineError(
            f"dataset.source={data.source!r} is not supported; expected 'csv' or 'tfds'"
        )

    splits = []
    for name in (data.train_split, data.test_split):
        raw = read(name)
        split = Split(
            name,
            [os.fspath(p) for p in raw.paths],
            np.asarray(raw.labels, np.int64),
            [(os.fspath(base / n), why, int(line)) for line, n, why in raw.skipped],
        )
        splits.append(_limit(split, data.limit, config.seed))
    common = raw.common_names if data.use_common_names else None
    classes = Classes(list(raw.class_names), None if common is None else list(common))
    logging.info(
        "Dataset %s: %d classes%s, %d train and %d test images",
        data.name or data.root,
        len(classes.names),
        " with common names" if classes.common else "",
        len(splits[0].paths),
        len(splits[1].paths),
    )
    return classes, splits[0], splits[1]


# ---------------------------------------------------------------------------
# Models, tokenizer and database, loaded only when a stage must compute


def _existing(path: str, flag: str, what: str) -> pathlib.Path:
    resolved = pathlib.Path(path).expanduser()
    if not path or not resolved.exists():
        raise PipelineError(f"{what} {path!r} does not exist; set {flag}=/path/to/it")
    return resolved


class Resources:
    """What the stages need, each opened on first use and then kept.

    A run whose stages are all cached fingerprints the files but never loads
    the model.
    """

    def __init__(self, config, cache_root: pathlib.Path):
        self.config = config
        self.memo = cache_root / "fingerprints"
        self.checkpoint_path = _existing(
            config.model.checkpoint, "--config.model.checkpoint", "SigLIP checkpoint"
        )
        self.tokenizer_path = _existing(
            config.model.tokenizer, "--config.model.tokenizer", "tokenizer model"
        )
        self.database_path = _existing(
            config.database_dir, "--config.database_dir", "caption database"
        )

    @functools.cached_property
    def checkpoint_fingerprint(self) -> str:
        return fingerprint_path(self.checkpoint_path, self.memo)

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        return fingerprint_path(self.tokenizer_path, self.memo)

    @functools.cached_property
    def database_fingerprint(self) -> str:
        # The manifest lists the database's counts, models and checksums, so it
        # changes whenever the stored captions or embeddings do.
        return _hash_json(self.manifest)

    @functools.cached_property
    def manifest(self) -> dict:
        path = self.database_path / "manifest.json"
        try:
            return json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as error:
            raise PipelineError(
                f"{path}: cannot read the caption database's manifest ({error}); "
                "build the database with launch/build_database.py, or resume its "
                "build if it was interrupted"
            ) from None

    @functools.cached_property
    def t2t_is_siglip(self) -> bool:
        """Whether the database's "t2t" column is SigLIP's text tower."""
        columns = self.manifest.get("columns", {})
        column = columns.get("t2t", {"alias": "siglip"})
        return column.get("alias") == "siglip" or column == columns.get("siglip")

    @functools.cached_property
    def t2t_fingerprint(self) -> str:
        if self.t2t_is_siglip:
            return _hash_json([self.checkpoint_fingerprint, self.tokenizer_fingerprint])
        encoder = self.manifest["columns"]["t2t"].get("encoder", "an LLM embedder")
        path = _existing(
            self.config.t2t_encoder_path,
            "--config.t2t_encoder_path",
            f"the database's t2t column was built by {encoder}; its model folder",
        )
        return fingerprint_path(path, self.memo)

    @functools.cached_property
    def mesh(self):
        # Each process feeds its own devices; on one host these are all.
        import jax

        from core_jax import sharding

        return sharding.make_mesh(jax.local_devices())

    @functools.cached_property
    def fusion_mesh(self):
        """The mesh for the sweep and the logits, or None for one device.

        With several processes the sweep and logits run on each process's
        first device (they are small next to embedding the images): sharding
        host-local NumPy inputs across a mesh needs global arrays.
        """
        import jax

        return self.mesh if jax.process_count() == 1 else None

    @functools.cached_property
    def siglip(self):
        import jax.numpy as jnp

        from core_jax.models import siglip

        dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
        if self.config.model.dtype not in dtypes:
            raise PipelineError(
                f"model.dtype={self.config.model.dtype!r}; expected one of "
                f"{sorted(dtypes)}"
            )
        start = time.perf_counter()
        model, params = siglip.load(
            self.checkpoint_path,
            self.config.model.variant or None,
            dtype=dtypes[self.config.model.dtype],
            image_size=self.config.model.image_size or None,
        )
        logging.info(
            "Loaded SigLIP %s in %.1f s: image size %d, embedding size %d, "
            "text length %d, vocabulary %d",
            self.checkpoint_path,
            time.perf_counter() - start,
            model.image_size,
            model.embed_dim,
            model.text_length,
            model.vocab_size,
        )
        return model, params

    @functools.cached_property
    def tokenizer(self):
        from core_jax import tokenizers

        model, _ = self.siglip
        tokenizer = tokenizers.SiglipTokenizer(
            self.tokenizer_path, length=model.text_length
        )
        # Ids past the model's embedding table read garbage (NaN on some
        # backends) instead of failing, so the sizes are compared up front.
        if tokenizer.vocab_size > model.vocab_size:
            raise PipelineError(
                f"the tokenizer {self.tokenizer_path} has a vocabulary of "
                f"{tokenizer.vocab_size} pieces but the checkpoint "
                f"{self.checkpoint_path} embeds only {model.vocab_size} token ids; "
                "use the tokenizer the checkpoint was trained with "
                "(--config.model.tokenizer)"
            )
        return tokenizer

    @functools.cached_property
    def text_encoder(self):
        from core_jax import encoders

        model, params = self.siglip
        return encoders.SiglipTextEncoder(
            model,
            params,
            self.tokenizer,
            batch_size=self.config.text_batch_size,
            mesh=self.mesh,
        )

    @functools.cached_property
    def image_encoder(self):
        from core_jax import encoders

        model, params = self.siglip
        return encoders.SiglipImageEncoder(
            model, params, batch_size=self.config.image_batch_size, mesh=self.mesh
        )

    @functools.cached_property
    def t2t_encoder(self):
        """Encodes class prompts for the "t2t" column (as queries)."""
        if self.t2t_is_siglip:
            return self.text_encoder
        from core_jax.models import text_embedder

        self.t2t_fingerprint  # noqa: B018  (checks the path is given)
        documents = text_embedder.Encoder(
            self.config.t2t_encoder_path,
            batch_size=self.config.text_batch_size,
            mesh=self.mesh,
        )
        stored = self.manifest["columns"]["t2t"]
        if documents.fingerprint != stored.get("fingerprint"):
            raise PipelineError(
                f"{self.config.t2t_encoder_path} is not the text-to-text encoder "
                f"the database {self.database_path} was built with "
                f"({stored.get('encoder')}); pass that model's folder as "
                "--config.t2t_encoder_path"
            )
        self._t2t_documents = documents
        return documents.for_queries()

    @functools.cached_property
    def database(self):
        """The caption database, checked against this run's text encoders.

        SigLIP's text tower (and the document side of the t2t embedder, once
        that is loaded) must be the encoders the database was built with:
        captions embedded by other weights do not live in this model's space.
        """
        from core_jax import database

        t2t = self.__dict__.get("_t2t_documents")
        try:
            return database.open(
                self.database_path,
                encoder=self.text_encoder,
                t2t_encoder=t2t,
                mesh=self.mesh,
            )
        except database.EncoderMismatchError as error:
            raise database.EncoderMismatchError(
                f"{error}. The caption database --config.database_dir="
                f"{os.fspath(self.database_path)!r} was built by another model "
                f"than --config.model.checkpoint={os.fspath(self.checkpoint_path)!r}"
                f" with --config.model.tokenizer={os.fspath(self.tokenizer_path)!r}"
                f" (dtype {self.config.model.dtype}); rebuild it with "
                "launch/build_database.py from this checkpoint or point at the "
                "database built from it"
            ) from None

    def check_database(self) -> None:
        """Refuses a database built by another model, before any stage runs.

        Opening the database with the encoders loads the model, so a passed
        check is remembered under the cache (keyed by the files'
        fingerprints) and a rerun whose stages are all cached stays quick.
        """
        key = _hash_json(
            {
                "checkpoint": self.checkpoint_fingerprint,
                "tokenizer": self.tokenizer_fingerprint,
                "dtype": self.config.model.dtype,
                "database": self.database_fingerprint,
            }
        )
        marker = self.memo.parent / "database_checks" / key[:32]
        if marker.exists():
            return
        self.database  # noqa: B018  (raises on a mismatch)
        report.write_text(marker, "ok")


# ---------------------------------------------------------------------------
# Stages


class NonFiniteError(PipelineError):
    """A stage produced NaN or infinite values (a corrupt checkpoint, say)."""


def require_finite(array: np.ndarray, stage: str, names: Sequence[str]) -> None:
    """Refuses an array with NaN or infinite values, naming the first row's item.

    Args:
      array: (N, ...) values of one stage.
      stage: what computed them, for the message.
      names: N names of the rows (class names, image paths).

    Raises:
      NonFiniteError: naming the stage, the first offending row and the count.
    """
    array = np.asarray(array)
    if not array.size:
        return
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise NonFiniteError(
            f"{stage}: {int(bad.sum())} of {len(array)} rows hold NaN or infinite "
            f"values, the first for {names[first]!r}; the checkpoint "
            "(--config.model.checkpoint) or the caption database "
            "(--config.database_dir) likely holds NaN or infinite weights"
        )


_NEIGHBOUR_FIELDS = ("ids", "sims", "mask", "embeddings")


def _retrieval_fields(config) -> dict:
    return {
        "k": int(config.k),
        "dedup": bool(config.dedup),
        "dedup_threshold": float(config.dedup_threshold),
    }


def search_database(
    db, queries: np.ndarray, config, *, column: str, description: str
) -> dict[str, np.ndarray]:
    """k nearest captions of each query, near-duplicates masked.

    Args:
      db: an open caption database.
      queries: (Q, D') unit-norm queries in the space of `column`.
      config: supplies k, dedup and dedup_threshold.
      column: the stored embedding column searched.
      description: the progress bar's label.

    Returns:
      ids (Q, k) int64, sims (Q, k) float32, mask (Q, k) bool and embeddings
      (Q, k, D) float32, the captions' stored SigLIP text embeddings.
    """
    batch = 4096
    parts = {name: [] for name in _NEIGHBOUR_FIELDS}
    starts = range(0, len(queries), batch)
    for start in _progress(starts, len(starts), description, "batch"):
        found = db.search(
            queries[start : start + batch],
            config.k,
            column=column,
            dedup=config.dedup,
            dedup_threshold=config.dedup_threshold,
        )
        for name in _NEIGHBOUR_FIELDS:
            parts[name].append(np.asarray(getattr(found, name)))
    if not queries.shape[0]:
        dim = db.embeddings("siglip").shape[1]
        return {
            "ids": np.zeros((0, config.k), np.int64),
            "sims": np.zeros((0, config.k), np.float32),
            "mask": np.zeros((0, config.k), bool),
            "embeddings": np.zeros((0, config.k, dim), np.float32),
        }
    return {
        "ids": np.concatenate(parts["ids"]).astype(np.int64),
        "sims": np.concatenate(parts["sims"]).astype(np.float32),
        "mask": np.concatenate(parts["mask"]).astype(bool),
        "embeddings": np.concatenate(parts["embeddings"]).astype(np.float32),
    }


def class_prototypes_stage(
    config, classes: Classes, resources: Resources, cache: StageCache
) -> Entry:
    """Zero-shot prototypes W (C, D) from the templated class names."""
    templates = list(config.dataset.templates)
    if not templates or any("{}" not in t for t in templates):
        raise PipelineError(
            f"dataset.templates={templates!r}: each template needs one '{{}}' "
            "where the class name goes"
        )
    fields = {
        "checkpoint": resources.checkpoint_fingerprint,
        "tokenizer": resources.tokenizer_fingerprint,
        "dtype": config.model.dtype,
        "templates": templates,
        "class_names": classes.names,
        "common_names": classes.common,
    }

    def compute():
        texts = prototype_texts(classes.names, classes.common, templates)
        embeddings = resources.text_encoder.encode(texts)
        variants = 1 if classes.common is None else 2
        require_finite(
            np.asarray(embeddings).reshape(len(classes.names), -1),
            "class prototypes (SigLIP text embeddings of the templated names)",
            [f"class {name}" for name in classes.names],
        )
        prototypes = average_prototypes(
            embeddings, len(classes.names), variants, len(templates)
        )
        logging.info(
            "Class prototypes: %d classes from %d texts (%d template(s)%s)",
            len(classes.names),
            len(texts),
            len(templates),
            ", scientific and common names" if variants == 2 else "",
        )
        return {"prototypes": prototypes}, {"num_texts": len(texts)}

    entry = cache.get("class_prototypes", fields, compute)
    require_finite(
        entry.arrays["prototypes"],
        "class prototypes",
        [f"class {name}" for name in classes.names],
    )
    return entry


def class_neighbours_stage(
    config, classes: Classes, resources: Resources, cache: StageCache
) -> Entry:
    """Text-to-text retrieval of each class's prompt: (C, k) neighbours."""
    template = config.dataset.retrieval_template or config.dataset.templates[0]
    prompts = retrieval_prompts(classes.names, classes.common, template)
    fields = {
        "t2t_encoder": resources.t2t_fingerprint,
        "database": resources.database_fingerprint,
        "prompts": prompts,
        **_retrieval_fields(config),
    }

    def compute():
        queries = resources.t2t_encoder.encode(prompts)
        require_finite(
            queries, "t2t query embeddings", [f"class {n}" for n in classes.names]
        )
        found = search_database(
            resources.database,
            queries,
            config,
            column="t2t",
            description="t2t retrieval",
        )
        _require_finite_neighbours(
            found, "class neighbours", [f"class {n}" for n in classes.names]
        )
        return found, {"prompts": prompts}

    entry = cache.get("class_neighbours", fields, compute)
    _require_finite_neighbours(
        entry.arrays, "class neighbours", [f"class {n}" for n in classes.names]
    )
    return entry


def _require_finite_neighbours(arrays, stage: str, names: Sequence[str]) -> None:
    mask = np.asarray(arrays["mask"], bool)
    # Masked-out slots are never read, so only kept neighbours count.
    sims = np.where(mask, arrays["sims"], 0.0)
    embeddings = np.where(mask[..., None], arrays["embeddings"], 0.0)
    require_finite(sims, f"{stage} (retrieval similarities)", names)
    require_finite(embeddings, f"{stage} (stored caption embeddings)", names)


@dataclasses.dataclass
class Embedded:
    """A split's image embeddings, after unreadable images were skipped.

    Attributes:
      embeddings: (K, D) float32 for the K readable images.
      kept: int64 (K,) index of each into the split's paths.
      skipped: (path, reason) of each image left out.
      keys: the cache keys of the chunks (what later stages depend on).
    """

    embeddings: np.ndarray
    kept: np.ndarray
    skipped: list[tuple[str, str]]
    keys: list[str]


def _chunks(count: int, size: int) -> list[range]:
    return [range(s, min(s + size, count)) for s in range(0, count, size)]


def image_embeddings_stage(
    config, split: Split, resources: Resources, cache: StageCache
) -> Embedded:
    """SigLIP image embeddings of a split, computed and cached chunk by chunk.

    With several processes, chunk j is computed by process j % P and the
    results are gathered, so every process ends with the whole split.
    """
    import jax

    from core_jax import images

    chunks = _chunks(len(split.paths), max(1, int(config.image_chunk_size)))
    process, processes = jax.process_index(), jax.process_count()
    mine = [j for j in range(len(chunks)) if j % processes == process]
    bar = _progress(None, sum(len(chunks[j]) for j in mine), split.name, "img")
    computed_images, computed_seconds = 0, 0.0
    entries: dict[int, Entry] = {}
    for j in mine:
        chunk_paths = [split.paths[i] for i in chunks[j]]
        fields = {
            "checkpoint": resources.checkpoint_fingerprint,
            "dtype": config.model.dtype,
            "image_size": int(config.model.image_size),
            "files": fingerprint_files(chunk_paths),
            "count": len(chunk_paths),
            "on_error": config.on_error,
        }

        def compute(chunk_paths=chunk_paths):
            nonlocal computed_images, computed_seconds
            start_time = time.perf_counter()
            model, _ = resources.siglip
            batch = max(1, int(config.image_batch_size))
            embedded, kept, skipped = [], [], []
            for start in range(0, len(chunk_paths), batch):
                pixels, kept_here, skipped_here = images.load_batch(
                    chunk_paths[start : start + batch],
                    model.image_size,
                    on_error=config.on_error,
                    workers=config.image_workers,
                )
                if len(pixels):
                    rows = np.asarray(resources.image_encoder.encode(pixels))
                    require_finite(
                        rows,
                        "image embeddings",
                        [chunk_paths[start + int(i)] for i in kept_here],
                    )
                    embedded.append(rows)
                kept.append(kept_here + start)
                skipped.extend(skipped_here)
                bar.update(len(chunk_paths[start : start + batch]))
            computed_images += len(chunk_paths)
            computed_seconds += time.perf_counter() - start_time
            arrays = {
                "embeddings": np.concatenate(embedded).astype(np.float32)
                if embedded
                else np.zeros((0, model.embed_dim), np.float32),
                "kept": np.concatenate(kept).astype(np.int64),
            }
            return arrays, {"skipped": [list(s) for s in skipped]}

        entries[j] = cache.get("image_embeddings", fields, compute)
    bar.close()
    if computed_images:
        logging.info(
            "%s: embedded %d images in %.1f s (%.1f images/s)",
            split.name,
            computed_images,
            computed_seconds,
            computed_images / max(computed_seconds, 1e-9),
        )

    if processes > 1:
        entries = _gather_chunks(entries, chunks, split.paths)
    embeddings, kept, skipped, keys = [], [], [], []
    for j, rows in enumerate(chunks):
        entry = entries[j]
        embeddings.append(entry.arrays["embeddings"])
        kept.append(entry.arrays["kept"] + rows.start)
        skipped.extend(tuple(s) for s in entry.meta.get("skipped", []))
        keys.append(entry.key)
    dim = embeddings[0].shape[1] if embeddings else 0
    all_kept = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    if embeddings:
        require_finite(
            np.concatenate(embeddings),
            "image embeddings",
            [split.paths[int(i)] for i in all_kept],
        )
    return Embedded(
        embeddings=np.concatenate(embeddings) if embeddings else np.zeros((0, dim)),
        kept=np.concatenate(kept) if kept else np.zeros(0, np.int64),
        skipped=skipped,
        keys=keys,
    )


def _gather_chunks(
    entries: dict[int, Entry], chunks: list[range], paths: Sequence[str]
) -> dict[int, Entry]:
    """Every process's chunks on every process (multi-host runs).

    Chunks are padded to one shape, gathered with `process_allgather`, and
    unpadded by their kept counts. Skip reasons stay in the log of the
    process that met them; other processes list the path with its owner.
    """
    import jax
    from jax.experimental import multihost_utils

    processes = jax.process_count()
    size = max(len(rows) for rows in chunks)
    per_process = -(-len(chunks) // processes)
    dim = next(iter(entries.values())).arrays["embeddings"].shape[1] if entries else 0
    dim = int(multihost_utils.process_allgather(np.asarray(dim)).max())
    embeddings = np.zeros((per_process, size, dim), np.float32)
    kept = np.full((per_process, size), -1, np.int64)
    for slot, j in enumerate(sorted(entries)):
        arrays = entries[j].arrays
        embeddings[slot, : len(arrays["kept"])] = arrays["embeddings"]
        kept[slot, : len(arrays["kept"])] = arrays["kept"]
    embeddings = np.asarray(multihost_utils.process_allgather(embeddings))
    kept = np.asarray(multihost_utils.process_allgather(kept))

    gathered = {}
    for j, rows in enumerate(chunks):
        owner, slot = j % processes, j // processes
        valid = kept[owner, slot] >= 0
        chunk_kept = kept[owner, slot][valid]
        if j in entries:
            meta, key = entries[j].meta, entries[j].key
        else:
            missing = sorted(set(range(len(rows))) - set(chunk_kept.tolist()))
            meta = {
                "skipped": [
                    [paths[rows.start + i], f"skipped by process {owner} (see its log)"]
                    for i in missing
                ]
            }
            key = f"process{owner}-chunk{j}"
        arrays = {
            "embeddings": embeddings[owner, slot][valid],
            "kept": chunk_kept,
        }
        gathered[j] = Entry(arrays, meta, key)
    return gathered


def image_neighbours_stage(
    config, split: Split, embedded: Embedded, resources: Resources, cache: StageCache
) -> Entry:
    """Image-to-text retrieval of each kept image: (K, k) neighbours."""
    fields = {
        "image_embeddings": embedded.keys,
        "database": resources.database_fingerprint,
        **_retrieval_fields(config),
    }

    def compute():
        found = search_database(
            resources.database,
            embedded.embeddings.astype(np.float32),
            config,
            column="siglip",
            description=f"{split.name} i2t retrieval",
        )
        _require_finite_neighbours(found, f"{split.name} image neighbours", names)
        return found, {}

    names = [split.paths[int(i)] for i in embedded.kept]
    entry = cache.get(f"image_neighbours_{split.name}", fields, compute)
    _require_finite_neighbours(entry.arrays, f"{split.name} image neighbours", names)
    return entry


def _grid(config):
    from core_jax import sweep

    return sweep.Grid(
        alphas=tuple(config.grid.alpha),
        betas=tuple(config.grid.beta),
        taus_i2t=tuple(config.grid.tau_i2t),
        taus_t2t=tuple(config.grid.tau_t2t),
    )


def _image_set(neighbours: Entry, embedded: Embedded, labels: np.ndarray):
    from core_jax import sweep

    return sweep.ImageSet(
        emb=embedded.embeddings,
        nbrs=neighbours.arrays["embeddings"],
        sims=neighbours.arrays["sims"],
        mask=neighbours.arrays["mask"],
        labels=labels[embedded.kept],
    )


def _class_set(prototypes: Entry, neighbours: Entry):
    from core_jax import sweep

    return sweep.ClassSet(
        emb=prototypes.arrays["prototypes"],
        nbrs=neighbours.arrays["embeddings"],
        sims=neighbours.arrays["sims"],
        mask=neighbours.arrays["mask"],
    )


def sweep_stage(
    config,
    train: Split,
    train_embedded: Embedded,
    train_neighbours: Entry,
    prototypes: Entry,
    class_neighbours: Entry,
    cache: StageCache,
    mesh,
) -> Entry:
    """Acc@1 and Acc@5 hit counts on train at every grid point."""
    from core_jax import sweep

    grid = _grid(config)
    images = _image_set(train_neighbours, train_embedded, train.labels)
    fields = {
        "prototypes": prototypes.key,
        "class_neighbours": class_neighbours.key,
        "image_neighbours": train_neighbours.key,
        "image_embeddings": train_embedded.keys,
        "labels": _hash_json(np.asarray(images.labels).tolist()),
        "grid": dataclasses.asdict(grid),
        "weighting": config.weighting,
    }

    def compute():
        if not len(images.labels):
            raise PipelineError(
                f"the {train.name!r} split has no readable images to sweep on"
            )
        start = time.perf_counter()
        result = sweep.sweep(
            images,
            _class_set(prototypes, class_neighbours),
            grid=grid,
            weighting=config.weighting,
            include_zero_shot=True,
            mesh=mesh,
        )
        seconds = time.perf_counter() - start
        logging.info(
            "Swept %d grid points on %d train images in %.1f s",
            grid.size,
            result.num_images,
            seconds,
        )
        arrays = {
            "correct1": result.correct1,
            "correct5": result.correct5,
            "zero_shot_correct": np.asarray(
                [result.zero_shot_correct1, result.zero_shot_correct5]
            ),
        }
        return arrays, {"num_images": result.num_images}

    return cache.get("sweep", fields, compute)


def sweep_result(config, entry: Entry):
    """The cached sweep entry as a `sweep.SweepResult`."""
    from core_jax import sweep

    return sweep.SweepResult(
        grid=_grid(config),
        weighting=config.weighting,
        num_images=int(entry.meta["num_images"]),
        correct1=entry.arrays["correct1"],
        correct5=entry.arrays["correct5"],
        zero_shot_correct1=int(entry.arrays["zero_shot_correct"][0]),
        zero_shot_correct5=int(entry.arrays["zero_shot_correct"][1]),
    )


# ---------------------------------------------------------------------------
# Run directory

_OUTPUT_FILES = (
    "config.json",
    "results.json",
    "predictions.csv",
    "heatmap_train_acc1.png",
    "qualitative.html",
)


def _config_dict(config) -> dict:
    """The config as plain JSON-able data."""
    return json.loads(report.to_json(config.to_dict()))


# Fields that decide where things go or how a run is driven, never what it
# computes: a resumed run may change them.
_RESUMABLE_FIELDS = frozenset(
    {
        "overwrite",
        "resume",
        "compilation_cache_dir",
        "cache_dir",
        "output_dir",
        "image_workers",
        "qualitative_samples",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
    }
)


def _flatten(config_dict: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in config_dict.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(previous: Mapping, current: Mapping) -> list[str]:
    """The fields that differ between two configs and could change results.

    Args:
      previous: a run's stored config.json.
      current: this run's config, as plain data.

    Returns:
      "field: old -> new" for each differing field, sorted; fields in
      `_RESUMABLE_FIELDS` are left out.
    """
    old, new = _flatten(previous), _flatten(current)
    missing = object()
    differences = []
    for field in sorted(set(old) | set(new)):
        if field in _RESUMABLE_FIELDS:
            continue
        before, after = old.get(field, missing), new.get(field, missing)
        if before != after:
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            differences.append(f"{field}: {show(before)} -> {show(after)}")
    return differences


def prepare_run_dir(config) -> pathlib.Path:
    """Creates the run directory; an existing one is never silently reused.

    Without `run_name` the directory is `<dataset>-<UTC time>` under
    `output_dir`, with a numeric suffix if that exists. A named directory
    that exists is refused unless `overwrite` (its outputs are replaced) or
    `resume` (allowed only with the same config) is set.

    Returns:
      The run directory, with `config.json` written.
    """
    output_dir = pathlib.Path(config.output_dir).expanduser()
    current = _config_dict(config)
    if config.run_name:
        run_dir = output_dir / config.run_name
        if run_dir.exists() and any(run_dir.iterdir()):
            if config.overwrite:
                logging.warning("Overwriting the outputs in %s", run_dir)
                for name in _OUTPUT_FILES:
                    (run_dir / name).unlink(missing_ok=True)
            elif config.resume:
                previous_file = run_dir / "config.json"
                previous = (
                    json.loads(previous_file.read_text("utf-8"))
                    if previous_file.exists()
                    else None
                )
                if previous is None:
                    raise RunDirectoryExistsError(
                        f"cannot resume {run_dir}: it has no config.json to "
                        "compare with; choose another --config.run_name or pass "
                        "--config.overwrite=True"
                    )
                differences = config_differences(previous, current)
                if differences:
                    listed = "; ".join(differences[:10])
                    more = len(differences) - 10
                    raise RunDirectoryExistsError(
                        f"cannot resume {run_dir}: its config.json differs from "
                        f"this run's config in {len(differences)} field(s) "
                        f"(was -> now): {listed}"
                        + (f"; and {more} more" if more > 0 else "")
                        + "; pass the same values, choose another "
                        "--config.run_name or pass --config.overwrite=True"
                    )
                logging.info("Resuming in %s", run_dir)
            else:
                raise RunDirectoryExistsError(
                    f"run directory {run_dir} exists; choose another "
                    "--config.run_name, or pass --config.resume=True to finish "
                    "an interrupted run or --config.overwrite=True to replace it"
                )
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = f"{config.dataset.name or 'run'}-{stamp}"
        run_dir, suffix = output_dir / base, 1
        while run_dir.exists():
            suffix += 1
            run_dir = output_dir / f"{base}-{suffix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(run_dir / "config.json", current)
    return run_dir


# ---------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass
class RunResult:
    """What `evaluate` produced.

    Attributes:
      run_dir: where the outputs are (None on processes other than 0).
      results: the content of results.json.
      cache: {stage: {"computed": n, "reused": m}}.
    """

    run_dir: pathlib.Path | None
    results: dict
    cache: dict


def _finite(value):
    value = float(value)
    return value if np.isfinite(value) else None


def _metrics_of(logits: np.ndarray, labels: np.ndarray) -> dict:
    from core_jax import metrics

    if not len(labels):
        return {"acc1": None, "acc5": None, "balanced_acc1": None}
    return {
        "acc1": _finite(metrics.top_k_accuracy(logits, labels, 1)),
        "acc5": _finite(
            metrics.top_k_accuracy(logits, labels, min(5, logits.shape[1]))
        ),
        "balanced_acc1": _finite(metrics.balanced_accuracy(logits, labels, 1)),
    }


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _logits(mesh, images, classes, *, alpha, beta, tau_i2t, tau_t2t, weighting):
    from core_jax import sharding

    num_classes = np.shape(classes.emb)[0]
    if not len(images.emb):
        return np.zeros((0, num_classes), np.float32)
    if mesh is None:
        return _logits_on_one_device(
            images,
            classes,
            alpha=alpha,
            beta=beta,
            tau_i2t=tau_i2t,
            tau_t2t=tau_t2t,
            weighting=weighting,
        )
    return np.asarray(
        sharding.core_logits_on_mesh(
            mesh,
            images.emb,
            images.nbrs,
            images.sims,
            images.mask,
            classes.emb,
            classes.nbrs,
            classes.sims,
            classes.mask,
            alpha=alpha,
            beta=beta,
            tau_i2t=tau_i2t,
            tau_t2t=tau_t2t,
            weighting=weighting,
            chunk_size=4096,
        ),
        np.float32,
    )


@functools.lru_cache(maxsize=4)
def _jitted_core_logits(weighting: str):
    import jax

    from core_jax import fusion

    return jax.jit(functools.partial(fusion.core_logits, weighting=weighting))


def _logits_on_one_device(images, classes, *, weighting, chunk=4096, **scalars):
    """`fusion.core_logits` on the default device, `chunk` images at a time."""
    compute = _jitted_core_logits(weighting)
    scalars = {k: np.float32(v) for k, v in scalars.items()}
    parts = []
    for start in range(0, len(images.emb), chunk):
        rows = slice(start, start + chunk)
        parts.append(
            np.asarray(
                compute(
                    np.asarray(images.emb[rows], np.float32),
                    np.asarray(images.nbrs[rows], np.float32),
                    np.asarray(images.sims[rows], np.float32),
                    np.asarray(images.mask[rows], bool),
                    np.asarray(classes.emb, np.float32),
                    np.asarray(classes.nbrs, np.float32),
                    np.asarray(classes.sims, np.float32),
                    np.asarray(classes.mask, bool),
                    **scalars,
                ),
                np.float32,
            )
        )
    return np.concatenate(parts)


def _maybe_initialize_distributed(config) -> None:
    import jax

    if config.distributed and not getattr(_maybe_initialize_distributed, "done", 0):
        # CPU devices of several processes talk through gloo; accelerators
        # use their own collectives and ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        arguments = {}
        if config.get("coordinator_address"):
            arguments = {
                "coordinator_address": config.coordinator_address,
                "num_processes": int(config.num_processes),
                "process_id": int(config.process_id),
            }
        jax.distributed.initialize(**arguments)
        _maybe_initialize_distributed.done = 1
        logging.info(
            "Process %d of %d, %d local of %d devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )


def _enable_compilation_cache(config) -> None:
    """Keeps compiled XLA programs under the cache folder across runs.

    Compiling the towers, the index search and the sweep is most of a rerun's
    time on two cores (and minutes for So400m on an accelerator); programs
    are keyed by XLA on their own content, so a stale one is never used.
    """
    import jax

    folder = config.get("compilation_cache_dir", "")
    if folder is None or folder == "none":
        return
    folder = folder or os.path.join(config.cache_dir, "xla")
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def evaluate(config) -> RunResult:
    """Runs every stage for a config and writes the run directory.

    Args:
      config: a ConfigDict as made by `configs/common.py`.

    Returns:
      The run directory, results and cache statistics.
    """
    import jax

    validate_config(config)
    _maybe_initialize_distributed(config)
    _enable_compilation_cache(config)
    timer = Timer()
    main = _is_main_process()
    if config.get("demo") is not None:
        from core_jax import demo

        with timer("demo_setup"):
            if main:
                demo.prepare(config)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("demo inputs written")
    cache = StageCache(pathlib.Path(config.cache_dir).expanduser())
    with timer("load_dataset"):
        classes, train, test = load_dataset(config)
    # Inputs are checked before the run directory exists, so a mistyped path
    # leaves nothing behind.
    resources = Resources(config, cache.root)
    # Before any cached stage is reused (a cached retrieval stage would hide a
    # mismatch) and before the run directory exists.
    with timer("database_check"):
        resources.check_database()
    run_dir = prepare_run_dir(config) if main else None
    with timer("fingerprints"):
        logging.info(
            "Checkpoint %s (sha256 %s), tokenizer %s, database %s",
            resources.checkpoint_path,
            resources.checkpoint_fingerprint[:12],
            resources.tokenizer_path,
            resources.database_path,
        )
        resources.database_fingerprint  # noqa: B018  (fail early on a bad dir)

    with timer("class_prototypes"):
        prototypes = class_prototypes_stage(config, classes, resources, cache)
    with timer("class_neighbours"):
        class_neighbours = class_neighbours_stage(config, classes, resources, cache)
    embedded, neighbours = {}, {}
    for split in (train, test):
        with timer(f"image_embeddings_{split.name}"):
            embedded[split.name] = image_embeddings_stage(
                config, split, resources, cache
            )
        with timer(f"image_neighbours_{split.name}"):
            neighbours[split.name] = image_neighbours_stage(
                config, split, embedded[split.name], resources, cache
            )

    mesh = resources.fusion_mesh
    class_set = _class_set(prototypes, class_neighbours)
    train_images = _image_set(
        neighbours[train.name], embedded[train.name], train.labels
    )
    test_images = _image_set(neighbours[test.name], embedded[test.name], test.labels)
    swept = None
    if config.sweep:
        with timer("sweep"):
            sweep_entry = sweep_stage(
                config,
                train,
                embedded[train.name],
                neighbours[train.name],
                prototypes,
                class_neighbours,
                cache,
                mesh,
            )
        swept = sweep_result(config, sweep_entry)
        best = swept.best()
        chosen = dataclasses.asdict(best.point)
        source = f"sweep on {train.name} by Acc@1"
    else:
        chosen = {
            "alpha": float(config.alpha),
            "beta": float(config.beta),
            "tau_i2t": float(config.tau_i2t),
            "tau_t2t": float(config.tau_t2t),
        }
        source = "config"
    logging.info("Hyper-parameters (%s): %s", source, chosen)

    with timer("test"):
        fuse = functools.partial(_logits, mesh, weighting=config.weighting)
        test_core = fuse(test_images, class_set, **chosen)
        zero = dict(chosen, alpha=0.0, beta=0.0)
        test_zero_shot = fuse(test_images, class_set, **zero)
        train_core = fuse(train_images, class_set, **chosen)
        train_zero_shot = fuse(train_images, class_set, **zero)

    results = {
        "notice": config.get("notice", None),
        "dataset": {
            "name": config.dataset.name,
            "root": config.dataset.root,
            "classes": len(classes.names),
            "common_names": classes.common is not None,
            "templates": list(config.dataset.templates),
            **{
                f"{split.name}_{what}": count
                for split in (train, test)
                for what, count in _image_counts(split, embedded[split.name]).items()
            },
        },
        "skipped_images": {
            split.name: skipped_entries(split, embedded[split.name])
            for split in (train, test)
        },
        "test": {
            "zero_shot": _metrics_of(test_zero_shot, test_images.labels),
            "core": _metrics_of(test_core, test_images.labels),
        },
        "train": {
            "zero_shot": _metrics_of(train_zero_shot, train_images.labels),
            "core": _metrics_of(train_core, train_images.labels),
        },
        "hyperparameters": dict(
            chosen, weighting=config.weighting, k=int(config.k), source=source
        ),
    }
    for method in ("zero_shot", "core"):
        logging.info(
            "Test, %d images, %-9s Acc@1 %s  Acc@5 %s  balanced Acc@1 %s",
            len(test_images.labels),
            "zero-shot" if method == "zero_shot" else "CoRE",
            *(
                _percent(results["test"][method][metric])
                for metric in ("acc1", "acc5", "balanced_acc1")
            ),
        )
    if not main:
        return RunResult(None, results, cache.stats())

    with timer("report"):
        results.update(
            _write_tables(
                run_dir, classes, test, embedded[test.name], test_zero_shot, test_core
            )
        )
        results["sweep"] = _sweep_summary(swept)
    results["timings_s"] = {k: round(v, 3) for k, v in timer.seconds.items()}
    results["cache"] = cache.stats()
    # Where each stage's arrays are: <cache_dir>/<stage>/<key>/arrays.npz.
    results["stage_keys"] = {
        "class_prototypes": prototypes.key,
        "class_neighbours": class_neighbours.key,
        **{
            f"image_embeddings_{name}": split_embedded.keys
            for name, split_embedded in embedded.items()
        },
        **{
            f"image_neighbours_{name}": split_neighbours.key
            for name, split_neighbours in neighbours.items()
        },
    }
    if config.sweep:
        results["stage_keys"]["sweep"] = sweep_entry.key
    results["versions"] = report.package_versions()
    results["devices"] = {
        "platform": jax.default_backend(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
    }
    results["config"] = _config_dict(config)
    # The numbers are on disk before the figures are drawn: a failing figure
    # costs the figure, never the results.
    report.write_json(run_dir / "results.json", results)
    failures: dict[str, str] = {}
    with timer("figures"):
        results["outputs"].update(
            _write_figures(
                config,
                run_dir,
                classes,
                test,
                embedded[test.name],
                neighbours[test.name],
                test_zero_shot,
                test_core,
                swept,
                chosen,
                resources,
                failures,
            )
        )
    if failures:
        results["report_errors"] = failures
    results["timings_s"] = {k: round(v, 3) for k, v in timer.seconds.items()}
    report.write_json(run_dir / "results.json", results)
    logging.info(
        "Results written to %s: %s",
        run_dir,
        ", ".join(["results.json", *results["outputs"].values()]),
    )
    if config.get("notice"):
        logging.warning("%s", config.notice)
    return RunResult(run_dir, results, cache.stats())


def _pick_samples(zero_shot: np.ndarray, core: np.ndarray, count: int, seed: int):
    """Up to `count` rows: half where CoRE changed the top-1, the rest random."""
    rng = np.random.default_rng(seed)
    changed = np.flatnonzero(zero_shot.argmax(1) != core.argmax(1))
    first = rng.permutation(changed)[: count // 2] if len(changed) else changed
    rest = np.setdiff1d(np.arange(len(core)), first)
    second = rng.permutation(rest)[: count - len(first)]
    return np.sort(np.concatenate([first, second]).astype(np.int64))


def qualitative_samples(
    config,
    classes: Classes,
    split: Split,
    embedded: Embedded,
    neighbours: Entry,
    zero_shot: np.ndarray,
    core: np.ndarray,
    chosen: dict,
    db,
    *,
    rows: Sequence[int],
    labelled: bool = True,
) -> list[report.QualitativeSample]:
    """The qualitative page's entries for some kept images."""
    from core_jax import fusion, images

    samples = []
    if not len(rows):
        return samples
    rows = np.asarray(rows, np.int64)
    weights = np.asarray(
        fusion.retrieval_weights(
            neighbours.arrays["sims"][rows],
            chosen["tau_i2t"],
            mask=neighbours.arrays["mask"][rows],
            weighting=config.weighting,
        )
    )
    zs_ids, zs_scores = report.top_k(zero_shot[rows], 5)
    core_ids, core_scores = report.top_k(core[rows], 5)
    for n, row in enumerate(rows):
        index = int(embedded.kept[row])
        path = split.paths[index]
        try:
            pixels = images.load(path)
        except (images.ImageError, OSError):
            pixels = None
        mask = neighbours.arrays["mask"][row]
        ids = neighbours.arrays["ids"][row][mask]
        texts = db.texts(ids) if len(ids) else []
        samples.append(
            report.QualitativeSample(
                path=path,
                image=pixels,
                label=classes.names[int(split.labels[index])] if labelled else None,
                zero_shot=[
                    (classes.names[c], float(s))
                    for c, s in zip(zs_ids[n], zs_scores[n], strict=True)
                ],
                core=[
                    (classes.names[c], float(s))
                    for c, s in zip(core_ids[n], core_scores[n], strict=True)
                ],
                captions=[
                    (str(t), float(w))
                    for t, w in zip(texts, weights[n][mask], strict=True)
                ],
            )
        )
    return samples


def _image_counts(split: Split, embedded: Embedded) -> dict[str, int]:
    """How many images were listed, evaluated and skipped in a split."""
    listed = len(split.paths) + len(split.missing)
    evaluated = len(embedded.kept)
    return {"images": evaluated, "images_listed": listed, "skipped": listed - evaluated}


def skipped_entries(split: Split, embedded: Embedded) -> list[dict]:
    """Every image of a split left out: {"path", "reason"} and "line" if known.

    Listed files that do not exist come first (with their CSV line), then
    files that could not be read.
    """
    entries = [
        {"path": path, "reason": reason, "line": line}
        for path, reason, line in split.missing
    ]
    entries.extend({"path": p, "reason": r} for p, r in embedded.skipped)
    return entries


def _write_tables(
    run_dir: pathlib.Path,
    classes: Classes,
    test: Split,
    embedded: Embedded,
    zero_shot: np.ndarray,
    core: np.ndarray,
) -> dict:
    """Writes predictions.csv; returns the per-class table and the outputs."""
    from core_jax import metrics

    labels = test.labels[embedded.kept]
    paths = [test.paths[i] for i in embedded.kept]
    rows = list(report.prediction_rows(paths, labels, classes.names, zero_shot, core))
    report.write_csv(run_dir / "predictions.csv", rows)
    outputs = {"predictions": "predictions.csv"}

    per_class = []
    if len(labels):
        zs_per_class = np.asarray(metrics.per_class_accuracy(zero_shot, labels))
        core_per_class = np.asarray(metrics.per_class_accuracy(core, labels))
        counts = np.bincount(labels, minlength=len(classes.names))
        for c, name in enumerate(classes.names):
            per_class.append(
                {
                    "class_id": c,
                    "class": name,
                    "test_images": int(counts[c]),
                    "zero_shot_acc1": _finite(zs_per_class[c]),
                    "core_acc1": _finite(core_per_class[c]),
                }
            )
    return {"per_class": per_class, "outputs": outputs}


def _sweep_summary(swept) -> dict | None:
    if swept is None:
        return None
    best = swept.best()
    return {
        "grid": dataclasses.asdict(swept.grid),
        "train_images": swept.num_images,
        "best_train_acc1": best.acc1,
        "best_train_acc5": best.acc5,
        "zero_shot_train_acc1": swept.zero_shot_acc1,
        "zero_shot_train_acc5": swept.zero_shot_acc5,
    }


def _write_figures(
    config,
    run_dir: pathlib.Path,
    classes: Classes,
    test: Split,
    embedded: Embedded,
    neighbours: Entry,
    zero_shot: np.ndarray,
    core: np.ndarray,
    swept,
    chosen: dict,
    resources: Resources,
    failures: dict,
) -> dict:
    """Draws the heatmap and the qualitative page, each allowed to fail.

    A figure that fails is logged as a warning and recorded in `failures`
    ({output: error}); the run's results stand without it.

    Returns:
      {output name: file name} of the figures written.
    """
    outputs = {}
    if swept is not None:
        try:
            best = swept.best()
            _, _, i, t = best.index
            grid = swept.grid
            report.write_heatmap(
                run_dir / "heatmap_train_acc1.png",
                swept.acc1[:, :, i, t],
                grid.alphas,
                grid.betas,
                title=(
                    f"train Acc@1 ({swept.num_images} images) at tau_i2t="
                    f"{grid.taus_i2t[i]:g}, tau_t2t={grid.taus_t2t[t]:g}; "
                    f"zero-shot {100 * swept.zero_shot_acc1:.1f}%"
                ),
                best=(best.point.alpha, best.point.beta),
            )
            outputs["heatmap"] = "heatmap_train_acc1.png"
        except Exception as error:  # noqa: BLE001  (any failure costs only this)
            _figure_failed("heatmap", error, failures)

    try:
        picked = _pick_samples(zero_shot, core, config.qualitative_samples, config.seed)
        samples = qualitative_samples(
            config,
            classes,
            test,
            embedded,
            neighbours,
            zero_shot,
            core,
            chosen,
            resources.database,
            rows=picked,
        )
        notes = [config.notice] if config.get("notice") else []
        notes.append(
            "alpha={alpha:g}, beta={beta:g}, tau_i2t={tau_i2t:g}, "
            "tau_t2t={tau_t2t:g}; caption weights are the image side's".format(**chosen)
        )
        report.write_qualitative_page(
            run_dir / "qualitative.html",
            samples,
            title=f"CoRE on {config.dataset.name or 'dataset'}: test samples",
            notes=notes,
        )
        outputs["qualitative"] = "qualitative.html"
    except Exception as error:  # noqa: BLE001  (any failure costs only this)
        _figure_failed("qualitative", error, failures)
    return outputs


def _figure_failed(name: str, error: Exception, failures: dict) -> None:
    failures[name] = f"{type(error).__name__}: {error}"
    logging.warning(
        "Could not write the %s (%s); results.json and predictions.csv are "
        "complete without it",
        name,
        failures[name],
    )


# ---------------------------------------------------------------------------
# Classifying unlabelled images


@dataclasses.dataclass
class ClassList:
    """Classes to classify into, read from a class list file.

    Attributes:
      classes: names and optional common names.
      templates: templates given in the file (empty: use the config's).
    """

    classes: Classes
    templates: list[str]


def read_class_list(path: str | os.PathLike) -> ClassList:
    """Reads a class list: CSV with a `name` column or a text file.

    CSV: a header with `name` and optionally `common_name` (or `common`);
    other columns are ignored. Text: one class a line, `name` or
    `name ; common name`; `template: A photo of a {}.` lines add templates;
    blank lines and lines starting with `#` are ignored. Either all classes
    have a common name or none has.

    Raises:
      PipelineError: naming the file and line of a malformed entry.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise PipelineError(f"class list {str(path)!r} does not exist")
    from core_jax import datasets

    text = datasets.decode_utf8(path.read_bytes(), f"class list {path}", PipelineError)
    names, commons, templates = [], [], []
    if path.suffix.lower() == ".csv":
        import csv

        reader = csv.DictReader(text.splitlines())
        fields = reader.fieldnames or []
        if "name" not in fields:
            raise PipelineError(
                f"{path}: the header {fields} has no 'name' column; expected "
                "name[,common_name]"
            )
        common_field = next((f for f in ("common_name", "common") if f in fields), None)
        for line, row in enumerate(reader, start=2):
            name = (row.get("name") or "").strip()
            if not name:
                raise PipelineError(f"{path}, line {line}: empty class name")
            names.append(name)
            if common_field:
                commons.append((row.get(common_field) or "").strip())
    else:
        for line, raw in enumerate(text.splitlines(), start=1):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry.lower().startswith("template:"):
                template = entry.split(":", 1)[1].strip()
                if "{}" not in template:
                    raise PipelineError(
                        f"{path}, line {line}: template {template!r} has no '{{}}' "
                        "for the class name"
                    )
                templates.append(template)
                continue
            name, _, common = (part.strip() for part in entry.partition(";"))
            if not name:
                raise PipelineError(f"{path}, line {line}: empty class name")
            names.append(name)
            commons.append(common)
    if not names:
        raise PipelineError(f"{path}: no classes listed")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PipelineError(f"{path}: class names listed twice: {duplicates}")
    given = [bool(c) for c in commons]
    if any(given) and not all(given):
        missing = [n for n, g in zip(names, given, strict=True) if not g]
        raise PipelineError(
            f"{path}: some classes have a common name and these do not: "
            f"{missing[:5]}; give one for every class or for none"
        )
    return ClassList(Classes(names, commons if any(given) else None), templates)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files below `folder`, sorted, by extension."""
    from core_jax import datasets

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"image folder {str(folder)!r} is not a folder")
    suffixes = {s.lower() for s in datasets.IMAGE_EXTENSIONS}
    paths = sorted(
        os.fspath(p)
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes
    )
    if not paths:
        raise PipelineError(
            f"no images in {folder} (looked for {sorted(suffixes)} files)"
        )
    return paths


def hyperparameters_from_results(path: str | os.PathLike) -> dict:
    """alpha, beta, tau_i2t, tau_t2t (and weighting) chosen by an earlier run."""
    path = pathlib.Path(path)
    try:
        chosen = json.loads(path.read_text("utf-8"))["hyperparameters"]
        values = {k: float(chosen[k]) for k in ("alpha", "beta", "tau_i2t", "tau_t2t")}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PipelineError(
            f"{path}: cannot read hyperparameters alpha, beta, tau_i2t, tau_t2t "
            f"from an evaluate run's results.json ({error})"
        ) from None
    if "weighting" in chosen:
        values["weighting"] = str(chosen["weighting"])
    return values


def classify(
    config,
    images_dir: str | os.PathLike,
    class_list: str | os.PathLike,
    *,
    results_from: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Top-5 classes of unlabelled images, with the captions that moved them.

    Args:
      config: a ConfigDict as for `evaluate` (model, database, retrieval).
      images_dir: a folder of images (searched recursively).
      class_list: a class list file (see `read_class_list`).
      results_from: an evaluate run's results.json to take alpha, beta and
        the taus from; None uses the config's.
      output_dir: where classifications.csv/.json go; by default a new
        `classify-<UTC time>` folder under `config.output_dir`.

    Returns:
      The output folder.
    """
    import jax

    validate_config(config)
    _maybe_initialize_distributed(config)
    _enable_compilation_cache(config)
    listed = read_class_list(class_list)
    classes = listed.classes
    with config.unlocked():
        if listed.templates:
            config.dataset.templates = tuple(listed.templates)
        chosen = {
            "alpha": float(config.alpha),
            "beta": float(config.beta),
            "tau_i2t": float(config.tau_i2t),
            "tau_t2t": float(config.tau_t2t),
        }
        if results_from:
            previous = hyperparameters_from_results(results_from)
            config.weighting = previous.pop("weighting", config.weighting)
            chosen = previous
            # What an earlier run chose is checked like the config's own.
            config.update(chosen)
            try:
                validate_config(config)
            except PipelineError as error:
                raise PipelineError(f"{results_from}: {error}") from None
    logging.info(
        "Classifying into %d classes with templates %s, hyper-parameters %s (%s)",
        len(classes.names),
        list(config.dataset.templates),
        chosen,
        results_from or "config",
    )

    paths = list_images(images_dir)
    split = Split("unlabelled", paths, np.zeros(len(paths), np.int64))
    cache = StageCache(pathlib.Path(config.cache_dir).expanduser())
    resources = Resources(config, cache.root)
    resources.check_database()
    prototypes = class_prototypes_stage(config, classes, resources, cache)
    class_neighbours = class_neighbours_stage(config, classes, resources, cache)
    embedded = image_embeddings_stage(config, split, resources, cache)
    neighbours = image_neighbours_stage(config, split, embedded, resources, cache)

    class_set = _class_set(prototypes, class_neighbours)
    image_set = _image_set(neighbours, embedded, split.labels)
    fuse = functools.partial(_logits, resources.fusion_mesh, weighting=config.weighting)
    core = fuse(image_set, class_set, **chosen)
    zero_shot = fuse(image_set, class_set, **dict(chosen, alpha=0.0, beta=0.0))
    if jax.process_index() != 0:
        return pathlib.Path(output_dir or config.output_dir)

    if output_dir is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        output_dir = pathlib.Path(config.output_dir) / f"classify-{stamp}"
        suffix = 1
        while output_dir.exists():
            suffix += 1
            output_dir = pathlib.Path(config.output_dir) / f"classify-{stamp}-{suffix}"
    output_dir = pathlib.Path(output_dir)
    if (output_dir / "classifications.json").exists() and not config.overwrite:
        raise RunDirectoryExistsError(
            f"{output_dir} already holds classifications.json; choose another "
            "output folder or pass --config.overwrite=True"
        )
    output_dir.mkdir(parents=True, exist_ok=True)

    samples = qualitative_samples(
        config,
        classes,
        split,
        embedded,
        neighbours,
        zero_shot,
        core,
        chosen,
        resources.database,
        rows=range(len(embedded.kept)),
        labelled=False,
    )
    db = resources.database
    class_weights = np.asarray(
        _class_weights(class_neighbours, chosen["tau_t2t"]), np.float64
    )
    class_captions = []
    for c, name in enumerate(classes.names):
        mask = class_neighbours.arrays["mask"][c]
        ids = class_neighbours.arrays["ids"][c][mask]
        texts = db.texts(ids) if len(ids) else []
        class_captions.append(
            {
                "class": name,
                "captions": [
                    {"text": str(t), "weight": float(w)}
                    for t, w in zip(texts, class_weights[c][mask], strict=True)
                ],
            }
        )

    rows, records = [], []
    for sample in samples:
        row = {"path": sample.path}
        for rank, (name, score) in enumerate(sample.core, start=1):
            row[f"class_{rank}"] = name
            row[f"score_{rank}"] = f"{score:.6g}"
        row["zero_shot_class_1"] = sample.zero_shot[0][0]
        row["captions"] = " | ".join(f"{w:.3f} {t}" for t, w in sample.captions)
        rows.append(row)
        records.append(
            {
                "path": sample.path,
                "top5": [{"class": n, "score": s} for n, s in sample.core],
                "zero_shot_top5": [
                    {"class": n, "score": s} for n, s in sample.zero_shot
                ],
                "captions": [{"text": t, "weight": w} for t, w in sample.captions],
            }
        )
    report.write_csv(output_dir / "classifications.csv", rows)
    report.write_json(
        output_dir / "classifications.json",
        {
            "notice": config.get("notice", None),
            "hyperparameters": dict(chosen, weighting=config.weighting, k=config.k),
            "hyperparameters_from": os.fspath(results_from) if results_from else None,
            "templates": list(config.dataset.templates),
            "images": records,
            "skipped_images": [{"path": p, "reason": r} for p, r in embedded.skipped],
            "class_captions": class_captions,
            "versions": report.package_versions(),
        },
    )
    logging.info(
        "Classified %d images (%d skipped) into %d classes; wrote %s",
        len(records),
        len(embedded.skipped),
        len(classes.names),
        output_dir,
    )
    return output_dir


def _class_weights(class_neighbours: Entry, tau_t2t: float) -> np.ndarray:
    from core_jax import fusion

    return fusion.retrieval_weights(
        class_neighbours.arrays["sims"],
        tau_t2t,
        mask=class_neighbours.arrays["mask"],
        weighting="softmax",
    )
