"""Benchmark splits: the reference release's CSV folders, and TFDS datasets.

A CSV dataset folder (`root`) holds:
- `class_mapping.csv`: columns `id,name` (more columns, such as HAM10000's
  `shortname`, are ignored); ids are exactly 0..C-1, in any order; names are
  unique.
- `class_mapping_common.csv` (optional): `id,name` with common names for the
  same ids (iNaturalist).
- `train.csv`, `test.csv` (any `{split}.csv`): columns `filename,class_id`,
  optionally `id`; other columns, such as a leading unnamed index column,
  are ignored.

The three benchmark layouts differ and each loads as it is: Circuits lists
`id,filename,class_id` with extensions; HAM10000's train split lists names
without extension and its test split with one; iNaturalist has an unnamed
index column and nested relative paths.

Conventions:
- File names are relative to `images_dir` (default: `root`). A name that
  does not exist as written and has no image extension is looked up with
  the extensions of `IMAGE_EXTENSIONS`, in that order; when two of them
  exist the row is ambiguous and refused.
- A file name that is absolute, or whose `..` parts leave the image folder,
  is refused (`DatasetError`) before anything is read. The check is on the
  path as written; symbolic links inside the image folder are followed.
- CSV files are read as UTF-8 (a byte-order mark is allowed, CRLF line ends
  are fine). Bytes that are not UTF-8 stop the load with an error naming the
  file, line, byte offset and byte, rather than being guessed at: a class
  name decoded wrongly would silently change its prompt.
- A listed image that does not exist stops the load (`on_missing="raise"`,
  the default) or is left out, logged and counted in `Split.skipped`
  (`on_missing="skip"`).
- A class with no image in the split is allowed, logged as a warning, and
  visible in `Split.class_counts`.

TFDS datasets are read with `tensorflow_datasets` (imported only when used,
with TensorFlow kept off every GPU). Their encoded images are written once to
files, so that a TFDS split is a `Split` of paths like a CSV one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import posixpath

import numpy as np
from absl import logging
from tqdm import tqdm

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".JPG",
    ".JPEG",
    ".PNG",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)
_KNOWN_SUFFIXES = {extension.lower() for extension in IMAGE_EXTENSIONS}


class DatasetError(ValueError):
    """A dataset file is missing, malformed, or lists something it must not."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a classification dataset.

    Attributes:
      paths: N image files (absolute when the dataset root was).
      labels: int32 (N,), class indices into `class_names`.
      class_names: C class names (scientific names where there are two).
      common_names: C common names, or None.
      ids: N identifiers, the CSV's `id` column where it has one, else the
        file name as listed.
      skipped: (line, file name, reason) for each listed row left out.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    common_names: list[str] | None
    ids: list[str]
    skipped: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> np.ndarray:
        """int64 (C,): number of images of each class in this split."""
        return np.bincount(self.labels, minlength=self.num_classes)


def decode_utf8(data: bytes, where: str, error: type[ValueError] | None = None) -> str:
    """Decodes a UTF-8 text file's bytes (a byte-order mark is dropped).

    Args:
      data: the file's bytes.
      where: how the file is named in the error, e.g. its path.
      error: the ValueError subclass to raise; `DatasetError` by default.

    Raises:
      error: naming the line, the byte and its offset of the first byte that
        is not UTF-8; nothing is guessed.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as problem:
        line = data[: problem.start].count(b"\n") + 1
        raise (error or DatasetError)(
            f"{where}: line {line}: byte 0x{data[problem.start]:02x} at offset "
            f"{problem.start} is not UTF-8 ({problem.reason}); re-encode the file "
            "as UTF-8"
        ) from None


def _read_csv(path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Reads a CSV file strictly as UTF-8.

    Returns:
      The header's column names, and (line number, row) for each data row.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror})") from None

    text = decode_utf8(data, str(path))

    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DatasetError(f"{path}: empty file, expected a CSV header")
        header = [column.strip() for column in header]
        rows = []
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue
            if len(fields) != len(header):
                raise DatasetError(
                    f"{path}: line {reader.line_num}: {len(fields)} fields, the "
                    f"header has {len(header)} ({header})"
                )
            rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    except csv.Error as error:
        raise DatasetError(
            f"{path}: line {reader.line_num}: malformed CSV ({error})"
        ) from None
    return header, rows


def _require_columns(path: str, header: list[str], required: tuple[str, ...]):
    missing = [column for column in required if column not in header]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing}; found columns {header}, "
            f"expected at least {list(required)}"
        )


def _parse_int(path: str, line: int, column: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DatasetError(
            f"{path}: line {line}: column {column!r} is {value!r}, expected an integer"
        ) from None


def _read_names(path: str, *, unique: bool) -> list[str]:
    """Reads an `id,name` class file into a list indexed by id."""
    header, rows = _read_csv(path)
    _require_columns(path, header, ("id", "name"))
    if not rows:
        raise DatasetError(f"{path}: no classes listed")

    by_id: dict[int, str] = {}
    line_of_name: dict[str, int] = {}
    for line, row in rows:
        class_id = _parse_int(path, line, "id", row["id"])
        name = row["name"].strip()
        if not name:
            raise DatasetError(f"{path}: line {line}: class {class_id} has no name")
        if class_id in by_id:
            raise DatasetError(f"{path}: line {line}: class id {class_id} repeated")
        if unique and name in line_of_name:
            raise DatasetError(
                f"{path}: line {line}: class name {name!r} repeats line "
                f"{line_of_name[name]}; class names must be unique"
            )
        by_id[class_id] = name
        line_of_name[name] = line

    expected = set(range(len(by_id)))
    if set(by_id) != expected:
        wrong = sorted(set(by_id) - expected)
        raise DatasetError(
            f"{path}: class ids must be 0..{len(by_id) - 1}, found {wrong} "
            "outside that range"
        )
    return [by_id[i] for i in range(len(by_id))]


def load_classes(root: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Class names of a CSV dataset folder.

    Returns:
      C class names from `class_mapping.csv`, and C common names from
      `class_mapping_common.csv` or None when that file is absent.
    """
    root = os.fspath(root)
    class_names = _read_names(os.path.join(root, "class_mapping.csv"), unique=True)
    common_path = os.path.join(root, "class_mapping_common.csv")
    if not os.path.exists(common_path):
        return class_names, None

    common_names = _read_names(common_path, unique=False)
    if len(common_names) != len(class_names):
        raise DatasetError(
            f"{common_path}: {len(common_names)} common names for "
            f"{len(class_names)} classes in class_mapping.csv"
        )
    return class_names, common_names


def _safe_relative(csv_path: str, line: int, name: str) -> str:
    """The normalised relative path of `name`, refusing ones that leave root."""
    if not name:
        raise DatasetError(f"{csv_path}: line {line}: empty filename")
    if "\x00" in name:
        raise DatasetError(f"{csv_path}: line {line}: filename {name!r} has a NUL")
    portable = name.replace("\\", "/")
    normal = posixpath.normpath(portable)
    if (
        posixpath.isabs(portable)
        or os.path.isabs(name)
        or (len(portable) > 1 and portable[1] == ":")
        or normal == ".."
        or normal.startswith("../")
    ):
        raise DatasetError(
            f"{csv_path}: line {line}: filename {name!r} leaves the image folder; "
            "expected a path relative to it"
        )
    return normal


def _resolve(base: str, relative: str) -> tuple[str | None, str]:
    """Finds the file for a listed name; returns (path or None, reason)."""
    path = os.path.join(base, relative)
    if os.path.isfile(path):
        return path, ""
    if os.path.splitext(relative)[1].lower() in _KNOWN_SUFFIXES:
        return None, f"{path} does not exist"

    found = [path + ext for ext in IMAGE_EXTENSIONS if os.path.isfile(path + ext)]
    # On a case-insensitive file system ".jpg" and ".JPG" name one file.
    if any(not os.path.samefile(found[0], other) for other in found[1:]):
        return None, f"ambiguous: {found} all exist"
    if not found:
        return None, f"{path} does not exist, with or without an image extension"
    return found[0], ""


def from_csv(
    root: str | os.PathLike,
    split: str,
    *,
    images_dir: str | os.PathLike | None = None,
    on_missing: str = "raise",
) -> Split:
    """Loads one split of a CSV dataset folder (the module docstring's layout).

    Args:
      root: the folder with `class_mapping.csv` and `{split}.csv`.
      split: "train", "test", or any `{split}.csv` present.
      images_dir: where listed file names are relative to (default `root`).
      on_missing: "raise" or "skip", for listed images that do not exist.

    Returns:
      The split, with every listed image that exists.

    Raises:
      DatasetError: a missing or malformed file, column, class id, file name.
    """
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
    root = os.fspath(root)
    base = os.fspath(images_dir) if images_dir is not None else root
    class_names, common_names = load_classes(root)

    csv_path = os.path.join(root, f"{split}.csv")
    if not os.path.exists(csv_path):
        present = sorted(f for f in os.listdir(root) if f.endswith(".csv"))
        raise DatasetError(f"{csv_path}: split {split!r} not found; found {present}")
    header, rows = _read_csv(csv_path)
    _require_columns(csv_path, header, ("filename", "class_id"))
    if not rows:
        raise DatasetError(f"{csv_path}: no rows")

    paths, labels, ids, skipped = [], [], [], []
    for line, row in rows:
        label = _parse_int(csv_path, line, "class_id", row["class_id"])
        if not 0 <= label < len(class_names):
            raise DatasetError(
                f"{csv_path}: line {line}: class_id {label} out of range, expected "
                f"0..{len(class_names) - 1} (class_mapping.csv)"
            )
        name = row["filename"].strip()
        path, reason = _resolve(base, _safe_relative(csv_path, line, name))
        if path is None:
            if on_missing == "raise":
                raise DatasetError(
                    f"{csv_path}: line {line}: filename {name!r}: {reason} "
                    "(on_missing='skip' leaves such rows out)"
                )
            skipped.append((line, name, reason))
            continue
        paths.append(path)
        labels.append(label)
        ids.append(row["id"].strip() if "id" in row else name)

    if skipped:
        logging.warning(
            "%s: %d of %d listed images missing and skipped, first: line %d %s",
            csv_path,
            len(skipped),
            len(rows),
            skipped[0][0],
            skipped[0][2],
        )
    result = Split(
        paths=paths,
        labels=np.asarray(labels, dtype=np.int32),
        class_names=class_names,
        common_names=common_names,
        ids=ids,
        skipped=skipped,
    )
    _log_split(csv_path, result)
    return result


def _log_split(source: str, split: Split):
    counts = split.class_counts
    empty = [split.class_names[c] for c in np.flatnonzero(counts == 0)]
    logging.info(
        "%s: %d images of %d classes (per class %d..%d)",
        source,
        len(split),
        split.num_classes,
        counts.min(),
        counts.max(),
    )
    if empty:
        logging.warning(
            "%s: %d class(es) have no image in this split: %s",
            source,
            len(empty),
            empty,
        )


def _extension_of(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if data.startswith(b"BM"):
        return ".bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".img"  # Decoders identify images by content, not by name.


def from_tfds(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_key: str = "image",
    label_key: str = "label",
    extract_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Split:
    """Loads a TFDS image classification split as files on disk.

    The encoded images are written unchanged (no re-encoding) once to
    `extract_dir/{index:08d}.{ext}`; files already there are reused, so a
    second call reads nothing from TFDS but the labels.

    Args:
      name: TFDS dataset name, e.g. "oxford_flowers102" or "name:version".
      split: TFDS split, e.g. "test" or "train[:10%]".
      data_dir: TFDS data folder (TFDS's default when None).
      image_key: the image feature.
      label_key: the `ClassLabel` feature giving labels and class names.
      extract_dir: where images are written; default
        `{data_dir}/core_jax_images/{name}/{split}`.
      download: let TFDS download and prepare the dataset if it is absent.

    Returns:
      The split; `ids` are the example indices as strings.
    """
    tfds = _import_tfds()

    try:
        builder = tfds.builder(
            name, data_dir=None if data_dir is None else str(data_dir)
        )
    except Exception as error:  # noqa: BLE001
        raise DatasetError(f"TFDS dataset {name!r}: {error}") from None
    if download:
        builder.download_and_prepare()
    elif not builder.is_prepared():
        raise DatasetError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; pass "
            "download=True or prepare it first"
        )

    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise DatasetError(
                f"TFDS dataset {name!r} has no feature {key!r}; features: "
                f"{sorted(features.keys())}"
            )
    label_feature = features[label_key]
    if not hasattr(label_feature, "names"):
        raise DatasetError(
            f"TFDS dataset {name!r}: feature {label_key!r} is not a ClassLabel"
        )
    class_names = list(label_feature.names)

    if extract_dir is None:
        root = str(data_dir) if data_dir is not None else builder.data_dir
        safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in split)
        extract_dir = os.path.join(root, "core_jax_images", builder.name, safe_split)
    extract_dir = os.fspath(extract_dir)
    os.makedirs(extract_dir, exist_ok=True)

    dataset = builder.as_dataset(
        split=split,
        decoders={image_key: tfds.decode.SkipDecoding()},
        shuffle_files=False,
    )
    paths, labels = [], []
    for index, example in enumerate(
        tqdm(dataset.as_numpy_iterator(), desc=f"{name} {split}", unit="image")
    ):
        data = bytes(example[image_key])
        path = os.path.join(extract_dir, f"{index:08d}{_extension_of(data)}")
        if not (os.path.exists(path) and os.path.getsize(path) == len(data)):
            partial = path + ".partial"
            with open(partial, "wb") as file:
                file.write(data)
            os.replace(partial, path)
        paths.append(path)
        labels.append(int(example[label_key]))

    if not paths:
        raise DatasetError(f"TFDS dataset {name!r} split {split!r} is empty")
    result = Split(
        paths=paths,
        labels=np.asarray(labels, dtype=np.int32),
        class_names=class_names,
        common_names=None,
        ids=[str(i) for i in range(len(paths))],
    )
    _log_split(f"tfds:{name}/{split}", result)
    return result


def _import_tfds():
    """Imports tensorflow_datasets with TensorFlow kept off every GPU."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except Exception as error:  # noqa: BLE001
        raise ImportError(
            "from_tfds needs tensorflow and tensorflow-datasets "
            f"(pip install 'core_jax[tfds]'): {error}"
        ) from error
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # TensorFlow already set up its devices; whoever did so first decided.
        if tf.config.get_visible_devices("GPU"):
            logging.warning("TensorFlow already holds a GPU; JAX may lack memory")
    return tfds
