"""The caption database: ids, texts, stored embeddings and their indexes.

A database is a directory:

    manifest.json                 written last; its presence means complete
    build.json                    the build's settings, checked on resume
    shards/00000.texts.parquet    columns id (int64), text, source_row (int64)
    shards/00000.siglip.npy       float16 (rows, D) SigLIP text embeddings
    shards/00000.t2t.npy          float16 (rows, D') text-to-text embeddings
    shards/00000.done.json        the shard's row count and sha256 checksums
    index/siglip/, index/t2t/     saved `core_jax.index` indexes

Ids are the row numbers of the kept captions in corpus order (0, 1, 2, ...
after skipping nulls, empty strings and the like); `source_row` keeps each
caption's line number (text and JSONL files) or data row number (CSV, TSV,
Parquet), 0-based, so a caption can be traced back to its source. Messages
and the manifest's stats speak of "line N" (text, JSONL) or "data row N"
(CSV, TSV after the header, Parquet), 1-based, as in `core_jax.datasets`.

When the text-to-text encoder is SigLIP's text tower itself (the default),
the "t2t" column is the "siglip" column: it is recorded as an alias in the
manifest and shares its files and index rather than storing them twice.

Building streams the corpus in shards of `shard_size` kept captions and
writes each shard's files under temporary names, fsyncs them and renames
them into place; a shard counts as finished once its `done.json` exists. A
build killed at any point (even SIGKILL) and started again checks the
finished shards' checksums, redoes any half-written one, and ends with the
same bytes as an uninterrupted build. One caveat: ScaNN's partitioned tree
(databases above 20,000 rows) trains its k-means with its own random seeds,
so an index that has to be rebuilt after an interruption is equivalent, not
byte-identical; shards, texts, embeddings and brute-force indexes are.

Running `build` again on a complete database first checks every file against
the manifest's sha256 checksums. If all match, the database is left alone. A
missing or damaged shard file makes the shard's files and done marker go,
along with the manifest; the build then resumes as above, redoes that shard
and every index (the indexes are built from the shards' embeddings), and
writes the manifest last, so the result is again the bytes of a clean build.

The corpus is identified by its path, size and modification time, recorded
in build.json. A corpus that changed since the directory was first built
(a caption appended, the file rewritten) is refused rather than mixed with
the stored shards; build into a new directory.

Reading memory-maps the embedding shards (`allow_pickle=False`); each shard
file is checked against its sha256 the first time this process reads it
(or all at once with `open(..., verify="full")`), and rows holding NaN are
refused by id. The index is built from all embeddings at once, so it needs
N * D * 4 bytes of host memory; above ~100M captions per host shard the
database across hosts.
"""

from __future__ import annotations

import builtins
import codecs
import collections
import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import unicodedata
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from absl import logging

from core_jax import dedup as dedup_lib
from core_jax import index as index_lib

FORMAT_VERSION = 1
EMBEDDING_DTYPE = np.float16
SIGLIP = "siglip"
T2T = "t2t"
_SHARDS = "shards"
_INDEX = "index"
_BUILD_FILE = "build.json"
_MANIFEST = "manifest.json"


class DatabaseError(ValueError):
    """A database directory, corpus or request that cannot be used."""


class ChecksumError(DatabaseError):
    """A stored file whose bytes differ from its recorded sha256."""


class IncompleteError(DatabaseError):
    """A half-written shard or an unfinished build."""


class EncoderMismatchError(DatabaseError):
    """A database built by another encoder, or with other dimensions."""


class CorruptRowsError(DatabaseError):
    """Stored embedding rows that hold NaN."""


# ---------------------------------------------------------------------------
# Reading corpora.


@dataclasses.dataclass
class CorpusStats:
    """Counts of what reading a corpus kept, skipped and repaired.

    Attributes:
      rows: source rows (lines, records) seen.
      kept: captions kept.
      skipped: reason -> rows skipped.
      repaired: repair -> rows repaired (kept).
      examples: reason -> first few 0-based source rows, for the log.
      unit: "line" (text, JSONL) or "data row" (CSV, TSV, Parquet): how the
        log and manifest name a source row, 1-based.
    """

    rows: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    repaired: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    examples: dict = dataclasses.field(default_factory=dict)
    unit: str = "line"

    def where(self, rows: Sequence[int]) -> str:
        """0-based source rows -> "lines 3, 8" (1-based), for messages."""
        plural = "s" if len(rows) != 1 else ""
        # pyarrow cannot always say which CSV row was malformed (None).
        numbers = [str(r + 1) if isinstance(r, int) else "?" for r in rows]
        return f"{self.unit}{plural} " + ", ".join(numbers)

    def skip(self, reason: str, row: int) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row)

    def repair(self, reason: str, row: int) -> None:
        self.repaired[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row)

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "repaired": dict(sorted(self.repaired.items())),
            "first_examples": {
                reason: self.where(rows)
                for reason, rows in sorted(self.examples.items())
            },
        }

    def log(self, source: str) -> None:
        logging.info("Read %s: %d rows, %d captions kept", source, self.rows, self.kept)
        for kind, counts in (("skipped", self.skipped), ("repaired", self.repaired)):
            for reason, count in sorted(counts.items()):
                # Binary rows are dropped data the user should look at.
                log = logging.warning if reason == BINARY_SKIP else logging.info
                log(
                    "%s: %s %d rows: %s (first at %s)",
                    source,
                    kind,
                    count,
                    reason,
                    self.where(self.examples.get(reason, [])),
                )


_UTF8_BOM = codecs.BOM_UTF8


BINARY_SKIP = "binary data (NUL or mostly control/undecodable bytes)"
# Byte sets as `bytes`, for counting with the C-speed `bytes.translate`:
# C0 controls other than tab, LF and CR, and DEL; those plus the five bytes
# cp1252 leaves undefined; printable ASCII and tab.
_CONTROL_BYTES = bytes(sorted(set(range(0x20)) - {0x09, 0x0A, 0x0D} | {0x7F}))
_CONTROL_OR_UNDEFINED = _CONTROL_BYTES + bytes((0x81, 0x8D, 0x8F, 0x90, 0x9D))
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F)) + b"\t"


def _count_in(raw: bytes, members: bytes) -> int:
    return len(raw) - len(raw.translate(None, members))


def looks_binary(raw: bytes, utf8: bool) -> bool:
    """Whether a line (or byte value) is binary data rather than text.

    The rule: a NUL byte anywhere; or more than 10% of the bytes being
    control bytes (C0 other than tab, LF, CR; DEL), counting the five bytes
    undefined in cp1252 too when the bytes are not valid UTF-8; or, for bytes
    that are not valid UTF-8, fewer than half of them being printable ASCII.
    Text with a few cp1252 accents passes (it is mostly ASCII); random bytes
    hold ~14% control/undefined bytes and ~37% printable ASCII, so a random
    line longer than a few dozen bytes fails.

    Args:
      raw: the bytes, line ending removed.
      utf8: whether `raw` is valid UTF-8.

    Returns:
      True when the bytes should be skipped as binary.
    """
    if not raw:
        return False
    if b"\0" in raw:
        return True
    bad = _CONTROL_BYTES if utf8 else _CONTROL_OR_UNDEFINED
    if _count_in(raw, bad) > 0.1 * len(raw):
        return True
    return not utf8 and _count_in(raw, _PRINTABLE_ASCII) < 0.5 * len(raw)


def _decode(raw: bytes, stats: CorpusStats, row: int) -> str | None:
    """UTF-8, else cp1252 (the usual culprit in web text); None for binary.

    Bytes that `looks_binary` are skipped (counted under BINARY_SKIP) rather
    than turned into a garbage caption.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if looks_binary(raw, utf8=text is not None):
        stats.skip(BINARY_SKIP, row)
        return None
    if text is None:
        stats.repair("invalid UTF-8 decoded as cp1252", row)
        # Five bytes are undefined in cp1252; they become U+FFFD.
        text = raw.decode("cp1252", errors="replace")
    return text


def clean_caption(value, stats: CorpusStats, row: int) -> str | None:
    """One raw caption value -> cleaned text, or None (skipped, counted).

    Strings are kept with control characters turned into spaces, lone
    surrogates into U+FFFD, and surrounding whitespace stripped; bytes are
    decoded as in `_decode`; None, lists, numbers and strings that end up
    empty are skipped.
    """
    if value is None:
        stats.skip("null caption", row)
        return None
    if isinstance(value, bytes | bytearray):
        value = _decode(bytes(value), stats, row)
        if value is None:
            return None
    if not isinstance(value, str):
        stats.skip(f"not a string ({type(value).__name__})", row)
        return None
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        fixed = []
        control = surrogate = False
        for c in value:
            category = unicodedata.category(c)
            if category == "Cc":
                control |= c not in "\t\n\r"
                fixed.append(" ")
            elif category == "Cs":
                surrogate = True
                fixed.append("\ufffd")
            else:
                fixed.append(c)
        value = "".join(fixed)
        if control:
            stats.repair("control characters replaced by spaces", row)
        if surrogate:
            stats.repair("lone surrogates replaced by U+FFFD", row)
    text = value.strip()
    if not text:
        stats.skip("empty or whitespace-only caption", row)
        return None
    return text


def _text_lines(path: pathlib.Path, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    with builtins.open(path, "rb") as f:
        for row, raw in enumerate(f):
            stats.rows += 1
            if row == 0 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
                stats.repair("UTF-8 byte order mark removed", row)
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            elif raw:
                stats.repair("final line has no newline", row)
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            text = _decode(raw, stats, row)
            if text is not None:
                yield row, text


def _jsonl_records(
    path: pathlib.Path, column: str, stats: CorpusStats
) -> Iterator[tuple[int, object]]:
    checked = False
    for row, line in _text_lines(path, stats):
        if not line.strip():
            stats.skip("blank line", row)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            stats.skip(f"invalid JSON ({error.msg})", row)
            continue
        if not isinstance(record, dict):
            stats.skip("JSON line is not an object", row)
            continue
        if column not in record:
            if not checked:
                raise DatabaseError(
                    f"{path}: line {row + 1} has no caption column {column!r}; "
                    f"columns found: {sorted(record)}"
                )
            stats.skip(f"record lacks {column!r}", row)
            continue
        checked = True
        yield row, record[column]


def _csv_header(path: pathlib.Path, delimiter: str) -> list[str]:
    with builtins.open(path, "rb") as f:
        first = f.readline()
    text = first.decode("utf-8-sig", errors="replace")
    return next(csv.reader(io.StringIO(text), delimiter=delimiter), [])


def _csv_records(
    path: pathlib.Path, column: str, delimiter: str, stats: CorpusStats
) -> Iterator[tuple[int, object]]:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.csv as pacsv  # noqa: PLC0415

    header = _csv_header(path, delimiter)
    if column not in header:
        raise DatabaseError(
            f"{path}: no caption column {column!r}; columns found: {header}"
        )
    bad_rows = []

    def on_invalid(row):
        bad_rows.append(row.number)
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=1 << 22),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter,
            newlines_in_values=True,
            invalid_row_handler=on_invalid,
        ),
        convert_options=pacsv.ConvertOptions(
            include_columns=[column],
            column_types={column: pa.binary()},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    row = 0
    for batch in reader:
        for value in batch.column(0).to_pylist():
            stats.rows += 1
            yield row, value
            row += 1
    for number in bad_rows:
        stats.rows += 1
        stats.skip("CSV row with the wrong number of fields", number)


def _parquet_records(
    path: pathlib.Path, column: str, stats: CorpusStats
) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001
        raise DatabaseError(f"{path}: not a readable Parquet file ({error})") from error
    names = parquet.schema_arrow.names
    if column not in names:
        raise DatabaseError(
            f"{path}: no caption column {column!r}; columns found: {names}"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=65_536, columns=[column]):
        for value in batch.column(0).to_pylist():
            stats.rows += 1
            yield row, value
            row += 1


FORMATS = ("text", "csv", "tsv", "jsonl", "parquet")
_SUFFIXES = {
    ".txt": "text",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}


def corpus_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The corpus format: `format` if given, else from the file suffix."""
    if format:
        if format not in FORMATS:
            raise DatabaseError(
                f"corpus format {format!r} (--config.format) is not one of {FORMATS}"
            )
        return format
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise DatabaseError(
            f"{path}: cannot tell the corpus format from suffix {suffix!r}; "
            f"set --config.format (format=) to one of {FORMATS}"
        )
    return _SUFFIXES[suffix]


def _check_corpus_exists(path: pathlib.Path) -> None:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DatabaseError(f"corpus file {path} (--config.corpus) {what}")


def check_corpus(path: str | os.PathLike, format: str | None = None) -> str:
    """Checks that the corpus file exists and its format is known.

    Args:
      path: the corpus file.
      format: one of FORMATS, or None to use the file suffix.

    Returns:
      The corpus format.
    """
    format = corpus_format(path, format)
    _check_corpus_exists(pathlib.Path(path))
    return format


def corpus_identity(path: str | os.PathLike) -> dict:
    """The corpus file's path, size and modification time (ns).

    Cheap to compute on any corpus size; an edited, appended or replaced
    file changes at least one of them.
    """
    path = pathlib.Path(path)
    info = path.stat()
    return {"path": str(path), "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def read_corpus(
    path: str | os.PathLike,
    *,
    column: str | None = None,
    format: str | None = None,
    stats: CorpusStats | None = None,
) -> Iterator[tuple[int, str]]:
    """Streams (source_row, caption) pairs of the kept captions.

    Args:
      path: a text file (one caption a line), CSV, TSV, JSONL or Parquet.
      column: the caption column (required for all but text files).
      format: one of FORMATS, or None to use the file suffix.
      stats: filled with the counts of rows kept, skipped and repaired.

    Yields:
      (source_row, text): the 0-based line or data row, and the caption.
    """
    path = pathlib.Path(path)
    stats = stats if stats is not None else CorpusStats()
    format = corpus_format(path, format)
    _check_corpus_exists(path)
    stats.unit = "line" if format in ("text", "jsonl") else "data row"
    if format != "text" and not column:
        raise DatabaseError(f"{path}: a {format} corpus needs column=<caption column>")
    if format == "text":
        records: Iterable = _text_lines(path, stats)
    elif format == "jsonl":
        records = _jsonl_records(path, column, stats)
    elif format in ("csv", "tsv"):
        delimiter = "," if format == "csv" else "\t"
        records = _csv_records(path, column, delimiter, stats)
    else:
        records = _parquet_records(path, column, stats)
    for row, value in records:
        text = clean_caption(value, stats, row)
        if text is not None:
            stats.kept += 1
            yield row, text


def count_rows(path: str | os.PathLike, format: str) -> int | None:
    """Rows in the corpus, for the progress bar (None when unknown)."""
    path = pathlib.Path(path)
    if format == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001
            return None
    lines = 0
    with builtins.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            lines += block.count(b"\n")
    return lines


def _shards_of(
    records: Iterator[tuple[int, str]], size: int
) -> Iterator[list[tuple[int, str]]]:
    shard = []
    for record in records:
        shard.append(record)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


# ---------------------------------------------------------------------------
# Files: atomic writes and checksums.


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with builtins.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: pathlib.Path, write) -> None:
    """Writes through `write(file)` to a temporary name, fsyncs, renames."""
    temporary = path.with_name(path.name + ".partial")
    with builtins.open(temporary, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _write_json(path: pathlib.Path, value) -> None:
    data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data))


def _write_npy(path: pathlib.Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _write_texts(path: pathlib.Path, ids, texts, source_rows) -> None:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "text": pa.array(texts, pa.string()),
            "source_row": pa.array(source_rows, pa.int64()),
        }
    )
    _atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))


def _directory_checksums(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------
# Building.


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a database is built; recorded in build.json and the manifest.

    Attributes:
      column: caption column (CSV, TSV, JSONL, Parquet).
      format: corpus format, or None for the file suffix.
      shard_size: kept captions per shard.
      encode_batch: captions handed to the encoders at once.
      backend: "scann" or "exact" for the saved indexes.
      scann: overrides of `core_jax.index.ScannParams` fields.
    """

    column: str | None = None
    format: str | None = None
    shard_size: int = 65_536
    encode_batch: int = 4096
    backend: str = "scann"
    scann: dict = dataclasses.field(default_factory=dict)


def _shard_stem(number: int) -> str:
    return f"{number:05d}"


def _texts_digest(records: Sequence[tuple[int, str]]) -> str:
    digest = hashlib.sha256()
    for row, text in records:
        digest.update(f"{row}\t{len(text)}\t".encode())
        digest.update(text.encode())
    return digest.hexdigest()


def _verified_done(shards: pathlib.Path, stem: str, expected: dict) -> dict | None:
    """The shard's done record when the shard is finished and intact."""
    done = shards / f"{stem}.done.json"
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for key, value in expected.items():
        if record.get(key) != value:
            raise DatabaseError(
                f"{done}: recorded {key}={record.get(key)!r} but this build has "
                f"{value!r}; the corpus or settings changed since the "
                "interrupted build (use a new --config.database_dir)"
            )
    for name, checksum in record["files"].items():
        path = shards / name
        if not path.is_file() or sha256_file(path) != checksum:
            logging.warning("Shard %s: %s is damaged; rebuilding the shard", stem, name)
            return None
    return record


def _remove_shard(shards: pathlib.Path, stem: str) -> None:
    for path in shards.glob(f"{stem}.*"):
        path.unlink()


def _encode(encoder, texts: list[str], batch: int, progress) -> np.ndarray:
    parts = []
    for start in range(0, len(texts), batch):
        part = np.asarray(encoder.encode(texts[start : start + batch]), np.float32)
        parts.append(part)
        if progress is not None:
            progress.update(len(part))
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)


def _check_finite(array: np.ndarray, first_id: int, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if len(bad):
        raise CorruptRowsError(
            f"{what}: embeddings of caption ids {(bad + first_id)[:10].tolist()} "
            f"({len(bad)} rows) are not finite"
        )


def build(
    corpus: str | os.PathLike,
    directory: str | os.PathLike,
    encoder,
    *,
    t2t_encoder=None,
    options: BuildOptions = BuildOptions(),
    progress: bool = True,
) -> pathlib.Path:
    """Builds (or resumes building) a caption database.

    Args:
      corpus: the caption file (see `read_corpus`).
      directory: the database directory; created, or resumed when it holds
        an interrupted build with the same settings.
      encoder: the SigLIP text `TextEncoder` filling the "siglip" column.
      t2t_encoder: the `TextEncoder` filling the "t2t" column; None or an
        encoder with the same fingerprint makes "t2t" an alias of "siglip".
      options: see `BuildOptions`.
      progress: show a tqdm bar with captions/s and the time left.

    Returns:
      The directory.
    """
    corpus = pathlib.Path(corpus)
    directory = pathlib.Path(directory)
    format = corpus_format(corpus, options.format)
    _check_corpus_exists(corpus)
    if options.shard_size < 1:
        raise DatabaseError(f"shard_size={options.shard_size} must be >= 1")
    t2t_alias = t2t_encoder is None or t2t_encoder.fingerprint == encoder.fingerprint
    columns = {SIGLIP: _column_record(encoder)}
    columns[T2T] = {"alias": SIGLIP} if t2t_alias else _column_record(t2t_encoder)
    settings = {
        "format_version": FORMAT_VERSION,
        "corpus": str(corpus),
        "corpus_format": format,
        "caption_column": options.column,
        "shard_size": options.shard_size,
        "backend": options.backend,
        "scann": dict(sorted(options.scann.items())),
        "columns": columns,
    }
    identity = corpus_identity(corpus)
    shards_dir = directory / _SHARDS
    shards_dir.mkdir(parents=True, exist_ok=True)
    build_file = directory / _BUILD_FILE
    if build_file.is_file():
        try:
            previous = json.loads(build_file.read_text())
        except json.JSONDecodeError as error:
            raise DatabaseError(
                f"{build_file} is not valid JSON ({error}); it records the build's "
                "settings, so use a new --config.database_dir"
            ) from error
        # Directories built before the corpus was identified lack the key.
        recorded = previous.pop("corpus_file", None)
        if previous != settings:
            changed = sorted(
                k
                for k in settings.keys() | previous.keys()
                if settings.get(k) != previous.get(k)
            )
            verb = "differs" if len(changed) == 1 else "differ"
            raise DatabaseError(
                f"{directory} holds a build with other settings "
                f"({', '.join(changed)} {verb}); use a new --config.database_dir"
            )
        if recorded is not None and recorded != identity:
            raise DatabaseError(
                f"corpus file {corpus} (--config.corpus) changed since the "
                f"database in {directory} was built: it was {recorded['size']} "
                f"bytes, modified at {recorded['mtime_ns']} ns, and is now "
                f"{identity['size']} bytes, modified at {identity['mtime_ns']} ns; "
                "use a new --config.database_dir to build a database of it"
            )
        if (directory / _MANIFEST).is_file():
            if _complete_and_intact(directory):
                logging.info(
                    "%s is already a complete database (every file matches "
                    "manifest.json)",
                    directory,
                )
                return directory
            logging.warning("Repairing the damaged database %s", directory)
        else:
            logging.info("Resuming the build in %s", directory)
    else:
        _write_json(build_file, {**settings, "corpus_file": identity})

    for stray in shards_dir.glob("*.partial"):
        stray.unlink()
    stats = CorpusStats()
    records = read_corpus(corpus, column=options.column, format=format, stats=stats)
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        total = count_rows(corpus, format)
        bar = tqdm(total=total, unit="caption", unit_scale=True, desc="embedding")
    shard_records = []
    next_id = 0
    rewritten = False
    encoders = {SIGLIP: encoder} if t2t_alias else {SIGLIP: encoder, T2T: t2t_encoder}
    try:
        for number, shard in enumerate(_shards_of(records, options.shard_size)):
            stem = _shard_stem(number)
            expected = {
                "first_id": next_id,
                "rows": len(shard),
                "texts_sha256": _texts_digest(shard),
            }
            record = _verified_done(shards_dir, stem, expected)
            if record is None:
                _remove_shard(shards_dir, stem)
                record = _write_shard(
                    shards_dir, stem, shard, next_id, expected, encoders, options, bar
                )
                rewritten = True
            elif bar is not None:
                bar.update(len(shard))
            shard_records.append({"name": stem, **record})
            next_id += len(shard)
    finally:
        if bar is not None:
            bar.close()
    stats.log(str(corpus))
    if next_id == 0:
        raise DatabaseError(f"{corpus}: no captions left after skipping bad rows")
    _remove_later_shards(shards_dir, len(shard_records))

    if rewritten:
        # An index left from before a shard was redone may not match it.
        for column in encoders:
            (directory / _INDEX / f"{column}.done.json").unlink(missing_ok=True)
    indexes = {}
    for column in encoders:
        indexes[column] = _build_index(directory, column, shard_records, options)
    manifest = {
        "format_version": FORMAT_VERSION,
        "count": next_id,
        "columns": columns,
        "text_columns": ["id", "text", "source_row"],
        "ids": "row number of the kept captions in corpus order",
        "shards": shard_records,
        "indexes": indexes,
        "source": {
            "corpus": str(corpus),
            "format": format,
            "caption_column": options.column,
            "stats": stats.as_dict(),
        },
    }
    _write_json(directory / _MANIFEST, manifest)
    logging.info(
        "Wrote caption database %s: %d captions in %d shards",
        directory,
        next_id,
        len(shard_records),
    )
    return directory


def _complete_and_intact(directory: pathlib.Path) -> bool:
    """Checks a complete database's files against its manifest.

    Damaged or missing files are logged by name and their shard (files and
    done marker) or index done marker removed, with the manifest, so that
    resuming the build redoes them; indexes go too when a shard does.

    Returns:
      True when every shard and index file matches its recorded sha256.
    """
    manifest_file = directory / _MANIFEST
    shards_dir = directory / _SHARDS
    try:
        manifest = json.loads(manifest_file.read_text())
        shards = manifest["shards"]
        indexes = manifest["indexes"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        logging.warning("%s is unreadable (%s); rewriting it", manifest_file, error)
        manifest_file.unlink()
        return False
    logging.info("Checking %s against %s", directory, manifest_file)
    damaged_shards = []
    for shard in shards:
        stem = shard["name"]
        done = shards_dir / f"{stem}.done.json"
        expected = {k: v for k, v in shard.items() if k != "name"}
        problems = []
        try:
            if json.loads(done.read_text()) != expected:
                problems.append(f"{done.name} differs from the manifest")
        except (OSError, json.JSONDecodeError):
            problems.append(f"{done.name} is missing or unreadable")
        for name, checksum in shard["files"].items():
            path = shards_dir / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif sha256_file(path) != checksum:
                problems.append(f"{name} does not match its sha256")
        if problems:
            logging.warning(
                "Shard %s of %s: %s; rebuilding the shard",
                stem,
                directory,
                "; ".join(problems),
            )
            _remove_shard(shards_dir, stem)
            damaged_shards.append(stem)
    damaged_indexes = []
    for column, record in indexes.items():
        target = directory / _INDEX / column
        done = directory / _INDEX / f"{column}.done.json"
        try:
            intact = (
                json.loads(done.read_text()) == record
                and _directory_checksums(target) == record["files"]
            )
        except (OSError, json.JSONDecodeError):
            intact = False
        if damaged_shards or not intact:
            if not intact:
                logging.warning(
                    "Index %s does not match the manifest; rebuilding it", target
                )
            done.unlink(missing_ok=True)
            damaged_indexes.append(column)
    if not damaged_shards and not damaged_indexes:
        return True
    manifest_file.unlink()
    return False


def _column_record(encoder) -> dict:
    return {
        "encoder": encoder.name,
        "fingerprint": encoder.fingerprint,
        "dim": int(encoder.dim),
        "dtype": np.dtype(EMBEDDING_DTYPE).name,
    }


def _write_shard(shards_dir, stem, shard, first_id, expected, encoders, options, bar):
    texts = [text for _, text in shard]
    ids = np.arange(first_id, first_id + len(shard), dtype=np.int64)
    files = {}
    for column, encoder in encoders.items():
        embeddings = _encode(
            encoder, texts, options.encode_batch, bar if column == SIGLIP else None
        )
        _check_finite(embeddings, first_id, f"shard {stem}, column {column}")
        name = f"{stem}.{column}.npy"
        _write_npy(shards_dir / name, embeddings.astype(EMBEDDING_DTYPE))
        files[name] = sha256_file(shards_dir / name)
    name = f"{stem}.texts.parquet"
    _write_texts(shards_dir / name, ids, texts, [row for row, _ in shard])
    files[name] = sha256_file(shards_dir / name)
    record = {**expected, "files": dict(sorted(files.items()))}
    _write_json(shards_dir / f"{stem}.done.json", record)
    return record


def _remove_later_shards(shards_dir: pathlib.Path, count: int) -> None:
    for path in shards_dir.iterdir():
        stem = path.name.split(".", 1)[0]
        if stem.isdigit() and int(stem) >= count:
            path.unlink()


def _build_index(directory, column, shard_records, options) -> dict:
    target = directory / _INDEX / column
    done = directory / _INDEX / f"{column}.done.json"
    if done.is_file() and target.is_dir():
        record = json.loads(done.read_text())
        if _directory_checksums(target) == record["files"]:
            return record
        logging.warning("Index %s is damaged; rebuilding it", target)
    done.unlink(missing_ok=True)
    embeddings = np.concatenate(
        [
            np.load(
                directory / _SHARDS / f"{s['name']}.{column}.npy",
                mmap_mode="r",
                allow_pickle=False,
            ).astype(np.float32)
            for s in shard_records
        ]
    )
    logging.info("Building the %s index over %d rows", column, len(embeddings))
    index = index_lib.build(embeddings, backend=options.backend, **options.scann)
    del embeddings
    partial = directory / _INDEX / f"{column}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    index.save(partial)
    for path in partial.iterdir():
        with builtins.open(path, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    _fsync_dir(target.parent)
    backend = "scann" if isinstance(index, index_lib.ScannIndex) else "exact"
    record = {"backend": backend, "files": _directory_checksums(target)}
    _write_json(done, record)
    return record


# ---------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass
class Neighbours:
    """Search results, best first; masked slots have id -1 and zeros.

    Attributes:
      ids: (Q, k) int64 caption ids.
      sims: (Q, k) float32 similarities in the searched column's space.
      mask: (Q, k) bool, False for slots left empty.
      embeddings: (Q, k, D) float32 stored SigLIP text embeddings of the ids.
    """

    ids: np.ndarray
    sims: np.ndarray
    mask: np.ndarray
    embeddings: np.ndarray


class StoredEmbeddings:
    """One embedding column, read from memory-mapped shards on demand.

    `rows[ids]` gathers float32 rows by caption id (any shape of ids; ids of
    -1 give zero rows); `np.asarray(rows)` reads the whole column.
    """

    def __init__(self, database: Database, column: str):
        self._db = database
        self.column = column
        self.dim = database._column_info(column)["dim"]
        self.shape = (database.count, self.dim)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        flat = ids.reshape(-1)
        out = np.zeros((len(flat), self.dim), np.float32)
        valid = flat >= 0
        shard_of = np.searchsorted(self._db._first_ids, flat, side="right") - 1
        for number in np.unique(shard_of[valid]):
            rows = np.flatnonzero(valid & (shard_of == number))
            local = flat[rows] - self._db._first_ids[number]
            out[rows] = self._db._shard_embeddings(int(number), self.column)[local]
        return out.reshape(*ids.shape, self.dim)

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(
            [
                np.asarray(self._db._shard_embeddings(n, self.column), np.float32)
                for n in range(len(self._db._shards))
            ]
        )
        return whole if dtype is None else whole.astype(dtype)


class Database:
    """An opened caption database; see `open`."""

    def __init__(self, directory: pathlib.Path, manifest: dict, verify: str, mesh):
        self.directory = directory
        self.manifest = manifest
        self.count = int(manifest["count"])
        self._shards = manifest["shards"]
        self._first_ids = np.array([s["first_id"] for s in self._shards], np.int64)
        self._verify = verify
        self._verified: set[str] = set()
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self._texts: dict[int, list[str]] = {}
        self._indexes: dict[str, index_lib.Index] = {}
        self._mesh = mesh

    def _column_info(self, column: str) -> dict:
        columns = self.manifest["columns"]
        if column not in columns:
            raise DatabaseError(
                f"{self.directory}: no embedding column {column!r}; "
                f"columns: {sorted(columns)}"
            )
        return columns[self._storage_column(column)]

    def _storage_column(self, column: str) -> str:
        return self.manifest["columns"][column].get("alias", column)

    def _checked_file(self, number: int, name: str) -> pathlib.Path:
        path = self.directory / _SHARDS / name
        shard = self._shards[number]
        if name in self._verified or self._verify == "none":
            return path
        if not path.is_file():
            raise IncompleteError(
                f"{self.directory}: shard {shard['name']} lacks {name}; the "
                "database is incomplete"
            )
        if sha256_file(path) != shard["files"][name]:
            raise ChecksumError(
                f"{self.directory}: shard file {name} does not match its "
                "checksum in manifest.json; the file is damaged"
            )
        self._verified.add(name)
        return path

    def _shard_embeddings(self, number: int, column: str) -> np.ndarray:
        storage = self._storage_column(column)
        key = (number, storage)
        if key not in self._arrays:
            shard = self._shards[number]
            name = f"{shard['name']}.{storage}.npy"
            path = self._checked_file(number, name)
            rows = _load_npy(path, shard, name, self._column_info(column)["dim"])
            _check_finite(
                rows, shard["first_id"], f"{self.directory}: shard file {name}"
            )
            self._arrays[key] = rows
        return self._arrays[key]

    def embeddings(self, column: str = SIGLIP) -> StoredEmbeddings:
        """The stored embeddings of `column` ("siglip" or "t2t"), (N, D)."""
        self._column_info(column)
        return StoredEmbeddings(self, column)

    def texts(self, ids) -> np.ndarray:
        """Caption texts by id: an object array of ids' shape ('' for -1)."""
        ids = np.asarray(ids, np.int64)
        out = np.full(ids.shape, "", dtype=object)
        flat_ids, flat_out = ids.reshape(-1), out.reshape(-1)
        if np.any(flat_ids >= self.count):
            bad = flat_ids[flat_ids >= self.count][:5].tolist()
            raise DatabaseError(
                f"caption ids {bad} are out of range; the database has "
                f"{self.count} captions"
            )
        shard_of = np.searchsorted(self._first_ids, flat_ids, side="right") - 1
        for number in np.unique(shard_of[flat_ids >= 0]):
            rows = np.flatnonzero((flat_ids >= 0) & (shard_of == number))
            texts = self._shard_texts(int(number))
            for row in rows:
                flat_out[row] = texts[flat_ids[row] - self._first_ids[number]]
        return out

    def _shard_texts(self, number: int) -> list[str]:
        if number not in self._texts:
            import pyarrow.parquet as pq  # noqa: PLC0415

            shard = self._shards[number]
            path = self._checked_file(number, f"{shard['name']}.texts.parquet")
            table = pq.read_table(path, columns=["text"])
            texts = table.column("text").to_pylist()
            if len(texts) != shard["rows"]:
                raise IncompleteError(
                    f"{path}: {len(texts)} texts but the manifest says {shard['rows']}"
                )
            self._texts[number] = texts
        return self._texts[number]

    def index(self, column: str = SIGLIP) -> index_lib.Index:
        """The search index of `column`, loaded (and checked) on first use."""
        storage = self._storage_column(column)
        if storage not in self._indexes:
            target = self.directory / _INDEX / storage
            record = self.manifest["indexes"].get(storage)
            if record is None or not target.is_dir():
                raise IncompleteError(f"{self.directory}: index {storage} is missing")
            if self._verify != "none":
                found = _directory_checksums(target)
                for name, checksum in record["files"].items():
                    if found.get(name) != checksum:
                        raise ChecksumError(
                            f"{self.directory}: index file {storage}/{name} is "
                            "missing or does not match its checksum"
                        )
            self._indexes[storage] = index_lib.load(target, mesh=self._mesh)
        return self._indexes[storage]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        column: str = SIGLIP,
        dedup: bool = True,
        dedup_threshold: float = dedup_lib.DEFAULT_THRESHOLD,
    ) -> Neighbours:
        """The k nearest captions of each query.

        Args:
          queries: (Q, D) unit-norm queries in `column`'s space (SigLIP image
            or text embeddings for "siglip", t2t embeddings for "t2t").
          k: neighbours per query, at most the database size.
          column: the embedding column searched.
          dedup: drop near-duplicates (see `core_jax.dedup`), judged by the
            captions' stored SigLIP text embeddings.
          dedup_threshold: cosine at or above which captions are linked.

        Returns:
          `Neighbours`, with the SigLIP text embeddings gathered by id.
        """
        info = self._column_info(column)
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != info["dim"]:
            raise EncoderMismatchError(
                f"queries have shape {queries.shape} but column {column!r} of "
                f"{self.directory} holds {info['dim']}-d embeddings"
            )
        if not isinstance(k, int | np.integer) or not 1 <= k <= self.count:
            raise DatabaseError(
                f"k={k!r} must be between 1 and the database size {self.count}"
            )
        k = int(k)
        index = self.index(column)
        siglip = self.embeddings(SIGLIP)
        if dedup:
            ids, sims, embeddings, mask = dedup_lib.search(
                index.search,
                siglip.__getitem__,
                queries,
                k,
                self.count,
                threshold=dedup_threshold,
            )
        else:
            ids, sims = index.search(queries, k)
            mask = ids >= 0
            embeddings = siglip[ids]
            sims = np.where(mask, sims, 0.0).astype(np.float32)
        return Neighbours(ids=ids, sims=sims, mask=mask, embeddings=embeddings)

    def verify(self) -> None:
        """Checks every shard and index file against the manifest now."""
        for number, shard in enumerate(self._shards):
            for name in shard["files"]:
                self._checked_file(number, name)
            for column in self.manifest["columns"]:
                self._shard_embeddings(number, column)
        for column in self.manifest["indexes"]:
            self.index(column)


def _load_npy(path: pathlib.Path, shard: dict, name: str, dim: int) -> np.ndarray:
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise IncompleteError(
            f"{path}: shard file {name} is half-written or unreadable ({error})"
        ) from error
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise EncoderMismatchError(
            f"{path}: shard file {name} holds rows of shape {rows.shape[1:]} but "
            f"the manifest says {dim}-d embeddings"
        )
    if rows.shape[0] != shard["rows"]:
        raise IncompleteError(
            f"{path}: shard file {name} has {rows.shape[0]} rows but the manifest "
            f"says {shard['rows']}; the shard is half-written"
        )
    return rows


def open(  # noqa: A001
    directory: str | os.PathLike,
    *,
    encoder=None,
    t2t_encoder=None,
    verify: str = "lazy",
    mesh=None,
) -> Database:
    """Opens a caption database and checks it against the given encoders.

    Args:
      directory: a directory written by `build`.
      encoder: optional SigLIP text `TextEncoder`; its name, fingerprint and
        width must match the "siglip" column's.
      t2t_encoder: optional `TextEncoder` checked against the "t2t" column.
      verify: "lazy" (each file's sha256 checked when first read), "full"
        (all files and NaN rows checked now), or "none".
      mesh: devices for exact indexes.

    Returns:
      A `Database`.
    """
    directory = pathlib.Path(directory)
    if verify not in ("lazy", "full", "none"):
        raise DatabaseError(f"verify={verify!r}; expected 'lazy', 'full' or 'none'")
    manifest_file = directory / _MANIFEST
    if not manifest_file.is_file():
        if (directory / _BUILD_FILE).is_file():
            raise IncompleteError(
                f"{directory}: the build did not finish (no manifest.json); run "
                "launch/build_database.py again with the same settings to resume"
            )
        raise DatabaseError(f"{directory} is not a caption database: no manifest.json")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as error:
        raise DatabaseError(f"{manifest_file} is not valid JSON ({error})") from error
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatabaseError(
            f"{manifest_file}: format_version {manifest.get('format_version')!r}; "
            f"this code reads version {FORMAT_VERSION}"
        )
    for column, candidate in ((SIGLIP, encoder), (T2T, t2t_encoder)):
        if candidate is not None:
            _check_encoder(manifest, column, candidate, manifest_file)
    db = Database(directory, manifest, verify, mesh)
    if verify == "full":
        db.verify()
    logging.info(
        "Opened caption database %s: %d captions, columns %s",
        directory,
        db.count,
        {c: db._column_info(c)["dim"] for c in manifest["columns"]},
    )
    return db


def _check_encoder(manifest, column, encoder, manifest_file) -> None:
    info = manifest["columns"][column]
    info = manifest["columns"][info["alias"]] if "alias" in info else info
    if int(encoder.dim) != info["dim"]:
        raise EncoderMismatchError(
            f"{manifest_file}: column {column!r} holds {info['dim']}-d embeddings "
            f"but encoder {encoder.name} gives {encoder.dim}-d ones"
        )
    if encoder.fingerprint != info["fingerprint"]:
        raise EncoderMismatchError(
            f"{manifest_file}: column {column!r} was built by {info['encoder']} "
            f"(fingerprint {info['fingerprint'][:12]}...), not by {encoder.name} "
            f"(fingerprint {encoder.fingerprint[:12]}...); rebuild the database "
            "with this encoder"
        )
