"""What a run leaves for people to read and look at.

Everything here writes files: `results.json`, `predictions.csv`, the
alpha x beta heatmap and the qualitative HTML page. Each file is written to a
temporary name and renamed into place, so a run killed half-way never leaves a
truncated result behind.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import importlib.metadata
import io
import json
import math
import os
import pathlib
import platform
import uuid
from collections.abc import Iterator, Sequence

import numpy as np

# Distributions whose versions decide the numbers a run produces.
VERSIONED_PACKAGES = (
    "core_jax",
    "jax",
    "jaxlib",
    "flax",
    "numpy",
    "ml_collections",
    "sentencepiece",
    "pillow",
    "scikit-image",
    "pyarrow",
    "scann",
    "tensorflow-cpu",
    "tensorflow",
    "transformers",
)


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape results, plus Python's.

    Returns:
      {distribution name: version}; absent packages are left out.
    """
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """Opens a temporary file beside `path`; `_commit` renames it into place."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600); results are shared.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    return open(tmp, mode.replace("w", "x"), **kwargs), tmp


def _commit(handle, tmp: pathlib.Path, path: str | os.PathLike) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Writes `data` to `path` atomically (temporary file, then rename)."""
    handle, tmp = _atomic_open(path, "wb")
    try:
        handle.write(data)
        _commit(handle, tmp, path)
    except BaseException:
        handle.close()
        tmp.unlink(missing_ok=True)
        raise
    return pathlib.Path(path)


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes `text` as UTF-8 to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def to_json(obj) -> str:
    """JSON text of `obj`; NumPy scalars and arrays become plain numbers."""
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=False)


def write_json(path: str | os.PathLike, obj) -> pathlib.Path:
    """Writes `obj` as indented JSON to `path` atomically."""
    return write_text(path, to_json(obj) + "\n")


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest scores per row, best first.

    Ties are broken by the lower class index, so output is deterministic.

    Args:
      scores: (N, C) scores.
      k: how many to keep; clipped to C.

    Returns:
      (indices (N, k) int64, values (N, k)).
    """
    scores = np.asarray(scores)
    k = min(k, scores.shape[-1])
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=-1)


def prediction_rows(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    class_names: Sequence[str],
    zero_shot_logits: np.ndarray,
    core_logits: np.ndarray,
    *,
    k: int = 5,
) -> Iterator[dict]:
    """One dict per image: its label and both methods' top-k classes.

    Args:
      paths: N image paths.
      labels: N class ids, or None for unlabelled images.
      class_names: C class names.
      zero_shot_logits: (N, C) plain SigLIP logits.
      core_logits: (N, C) CoRE logits.
      k: how many classes to list.

    Yields:
      Dicts with the columns of predictions.csv.
    """
    zs_ids, zs_scores = top_k(zero_shot_logits, k)
    core_ids, core_scores = top_k(core_logits, k)
    for i, path in enumerate(paths):
        row = {"path": str(path)}
        if labels is not None:
            label = int(labels[i])
            row["label_id"] = label
            row["label"] = class_names[label]
        row["zero_shot_pred_id"] = int(zs_ids[i, 0])
        row["zero_shot_pred"] = class_names[zs_ids[i, 0]]
        row["core_pred_id"] = int(core_ids[i, 0])
        row["core_pred"] = class_names[core_ids[i, 0]]
        row["zero_shot_top5_ids"] = " ".join(str(int(c)) for c in zs_ids[i])
        row["zero_shot_top5_scores"] = " ".join(f"{s:.6g}" for s in zs_scores[i])
        row["core_top5_ids"] = " ".join(str(int(c)) for c in core_ids[i])
        row["core_top5_scores"] = " ".join(f"{s:.6g}" for s in core_scores[i])
        yield row


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> pathlib.Path:
    """Writes dicts sharing the same keys as a CSV with a header, atomically."""
    rows = list(rows)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def _matplotlib():
    import matplotlib

    # No display on TPU VMs and CI machines; Agg draws to files only.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_heatmap(
    path: str | os.PathLike,
    accuracy: np.ndarray,
    alphas: Sequence[float],
    betas: Sequence[float],
    *,
    title: str,
    best: tuple[float, float] | None = None,
) -> pathlib.Path:
    """Draws an alpha x beta accuracy grid as a PNG.

    Args:
      path: the .png to write.
      accuracy: (len(alphas), len(betas)) accuracies in [0, 1].
      alphas: class-side mixing weights (rows).
      betas: image-side mixing weights (columns).
      title: the figure title (say which split and which taus).
      best: (alpha, beta) to outline, or None.

    Returns:
      The path written.
    """
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if accuracy.shape != (len(alphas), len(betas)):
        raise ValueError(
            f"accuracy grid has shape {accuracy.shape} but alphas x betas is "
            f"({len(alphas)}, {len(betas)})"
        )
    plt = _matplotlib()
    size = max(4.0, 0.55 * len(betas) + 2.0), max(3.5, 0.45 * len(alphas) + 1.8)
    fig, ax = plt.subplots(figsize=size, dpi=120)
    image = ax.imshow(100 * accuracy, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("beta (image side)")
    ax.set_ylabel("alpha (class side)")
    ax.set_title(title, fontsize=9)
    if len(alphas) * len(betas) <= 144:
        for i in range(len(alphas)):
            for j in range(len(betas)):
                ax.text(
                    j,
                    i,
                    f"{100 * accuracy[i, j]:.1f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if accuracy[i, j] < accuracy.max() * 0.8 else "k",
                )
    if best is not None:
        i = int(np.argmin(np.abs(np.asarray(alphas) - best[0])))
        j = int(np.argmin(np.abs(np.asarray(betas) - best[1])))
        ax.add_patch(
            plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, color="red", lw=2)
        )
    fig.colorbar(image, ax=ax, label="Acc@1 (%)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())


def thumbnail_png(image: np.ndarray, size: int = 160) -> bytes:
    """A PNG of `image` scaled so that its longer side is at most `size`.

    Args:
      image: (H, W, 3) uint8.
      size: the longer side in pixels.

    Returns:
      PNG bytes.
    """
    from PIL import Image

    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass
class QualitativeSample:
    """One image on the qualitative page.

    Attributes:
      path: where the image came from.
      image: (H, W, 3) uint8 pixels, or None when it could not be read.
      label: the true class name, or None for unlabelled images.
      zero_shot: [(class name, score)] best first.
      core: [(class name, score)] best first.
      captions: [(caption text, weight)] of the retrieved neighbours, in rank
        order; weights sum to one over the kept neighbours.
    """

    path: str
    image: np.ndarray | None
    label: str | None
    zero_shot: list[tuple[str, float]]
    core: list[tuple[str, float]]
    captions: list[tuple[str, float]]


_PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.note { background: #fff3cd; border: 1px solid #e0c060; padding: .6em; }
.sample { display: flex; gap: 1.2em; border-top: 1px solid #ccc;
          padding: .8em 0; }
.sample img { width: 160px; height: auto; image-rendering: auto; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { padding: 1px 6px; text-align: left; vertical-align: top; }
.hit { color: #0a0; font-weight: bold; } .miss { color: #b00; }
.bar { background: #69c; height: .7em; display: inline-block; }
"""


def _scores_table(title: str, entries, label: str | None) -> str:
    rows = []
    for name, score in entries:
        mark = "" if label is None else (" class='hit'" if name == label else "")
        rows.append(f"<tr><td{mark}>{html.escape(name)}</td><td>{score:.4f}</td></tr>")
    return f"<table><tr><th colspan=2>{title}</th></tr>{''.join(rows)}</table>"


def _captions_table(captions) -> str:
    rows = []
    for text, weight in captions:
        width = max(1, int(round(80 * weight))) if math.isfinite(weight) else 1
        rows.append(
            f"<tr><td>{weight:.3f}</td><td><span class='bar' "
            f"style='width:{width}px'></span></td><td>{html.escape(text)}</td></tr>"
        )
    header = "<tr><th>weight</th><th></th><th>retrieved caption</th></tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def qualitative_html(
    samples: Sequence[QualitativeSample], *, title: str, notes: Sequence[str] = ()
) -> str:
    """A self-contained HTML page (thumbnails embedded as data URIs).

    Args:
      samples: the images to show.
      title: the page heading.
      notes: paragraphs shown prominently above the samples.

    Returns:
      The page's HTML text.
    """
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    for sample in samples:
        if sample.image is not None:
            data = base64.b64encode(thumbnail_png(sample.image)).decode("ascii")
            picture = f"<img src='data:image/png;base64,{data}' alt=''>"
        else:
            picture = "<div>(image unreadable)</div>"
        verdicts = ""
        if sample.label is not None:
            zs_ok = bool(sample.zero_shot) and sample.zero_shot[0][0] == sample.label
            core_ok = bool(sample.core) and sample.core[0][0] == sample.label
            verdicts = (
                f"<div>true class: <b>{html.escape(sample.label)}</b> &middot; "
                f"zero-shot <span class='{'hit' if zs_ok else 'miss'}'>"
                f"{'right' if zs_ok else 'wrong'}</span> &middot; CoRE "
                f"<span class='{'hit' if core_ok else 'miss'}'>"
                f"{'right' if core_ok else 'wrong'}</span></div>"
            )
        parts.append(
            "<div class='sample'>"
            f"<div>{picture}<div><small>{html.escape(sample.path)}</small></div></div>"
            f"<div>{verdicts}<div style='display:flex;gap:1em'>"
            f"{_scores_table('zero-shot', sample.zero_shot, sample.label)}"
            f"{_scores_table('CoRE', sample.core, sample.label)}</div>"
            f"{_captions_table(sample.captions)}</div></div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_qualitative_page(
    path: str | os.PathLike,
    samples: Sequence[QualitativeSample],
    *,
    title: str,
    notes: Sequence[str] = (),
) -> pathlib.Path:
    """Writes `qualitative_html(...)` to `path` atomically."""
    return write_text(path, qualitative_html(samples, title=title, notes=notes))
