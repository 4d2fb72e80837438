"""Grid-search speed: the compiled, vmapped sweep against a per-point loop.

Synthetic unit embeddings at the paper's scale (SigLIP So400m: D = 1152,
k = 10 neighbours) and the reference grid (alpha, beta in {0.1, ..., 1.0},
tau_i2t, tau_t2t in {0.01, 0.1, 1, 10, 100}: 2,500 points).

Three ways to get Acc@1 and Acc@5 at every grid point:
- `core_jax.sweep.sweep`: one compiled call (per chunk of images) using the
  bilinear decomposition;
- the reference-style loop: what the reference release does, one pass per
  grid point, fusing each image on its own in NumPy (weights, weighted sum
  of its neighbours, mix with its embedding, normalise), then batched
  logits and top-k;
- a vectorised NumPy loop: one pass per grid point, but every step batched
  over all images (retrieval embeddings computed once per temperature).

The two loops take minutes to hours over all 2,500 points, so they are
timed on a subset of points and extrapolated linearly (each point costs the
same); the output says so and how many points were timed.

    python benchmarks/sweep_speed.py
    python benchmarks/sweep_speed.py --num_images=2000 --reference_points=4
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax
import numpy as np
import psutil
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core_jax import sweep  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 10_000, "N, images in the split.")
flags.DEFINE_integer("num_classes", 100, "C, classes.")
flags.DEFINE_integer("k", 10, "Neighbours per image and per class.")
flags.DEFINE_integer("dim", 1152, "Embedding width D.")
flags.DEFINE_integer("reference_points", 6, "Grid points to time for each loop.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
flags.DEFINE_integer("repeats", 2, "Timed runs of the compiled sweep (best kept).")


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled)."""

    def __init__(self, interval: float = 0.005):
        self._interval = interval
        self._process = psutil.Process()
        self.peak = 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self):
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_data(n, c, k, d, seed):
    """Images near their class prototype, neighbours near their query."""
    rng = np.random.default_rng(seed)
    class_emb = unit(rng.standard_normal((c, d), np.float32))
    labels = rng.integers(0, c, size=n)
    # Noise of norm 15 leaves each image a cosine of ~0.07 with its class,
    # comparable to chance cosines with 100 others: accuracies well below 1.
    image_emb = unit(
        class_emb[labels] + 15.0 * unit(rng.standard_normal((n, d), np.float32))
    )
    image_nbrs = np.empty((n, k, d), np.float32)
    for start in range(0, n, 1000):  # keeps the float temporaries small
        stop = min(start + 1000, n)
        noise = unit(rng.standard_normal((stop - start, k, d), np.float32))
        image_nbrs[start:stop] = unit(image_emb[start:stop, None] + 1.5 * noise)
    class_nbrs = unit(
        class_emb[:, None] + 1.5 * unit(rng.standard_normal((c, k, d), np.float32))
    )
    images = sweep.ImageSet(
        emb=image_emb.astype(np.float32),
        nbrs=image_nbrs,
        sims=np.einsum("nd,nkd->nk", image_emb, image_nbrs).astype(np.float32),
        mask=np.ones((n, k), bool),
        labels=labels,
    )
    classes = sweep.ClassSet(
        emb=class_emb.astype(np.float32),
        nbrs=class_nbrs.astype(np.float32),
        sims=np.einsum("cd,ckd->ck", class_emb, class_nbrs).astype(np.float32),
        mask=np.ones((c, k), bool),
    )
    return images, classes


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def hits_at(logits, labels, ks=(1, 5)):
    top = np.argsort(-logits, axis=1, kind="stable")[:, : max(ks)]
    found = top == labels[:, None]
    return [int(found[:, :k].any(axis=1).sum()) for k in ks]


def reference_style_point(images, classes, point, batch_size=128):
    """One grid point the way the reference release runs it."""
    # Class side: batched, as the release builds its prototypes.
    big_r = unit(
        np.einsum(
            "ck,ckd->cd",
            softmax(classes.sims / point.tau_t2t),
            classes.nbrs,
        )
    )
    prototypes = unit((1 - point.alpha) * classes.emb + point.alpha * big_r)

    # Image side: one image at a time, as its dataset's __getitem__ does.
    hits = np.zeros(2, np.int64)
    batch = []
    for i in range(len(images.emb)):
        weights = softmax(images.sims[i] / point.tau_i2t)
        retrieved = weights @ images.nbrs[i]
        retrieved /= np.linalg.norm(retrieved)
        fused = (1 - point.beta) * images.emb[i] + point.beta * retrieved
        batch.append(fused / np.linalg.norm(fused))
        if len(batch) == batch_size or i == len(images.emb) - 1:
            logits = np.stack(batch) @ prototypes.T
            labels = images.labels[i + 1 - len(batch) : i + 1]
            hits += hits_at(logits, labels)
            batch = []
    return hits


def vectorised_point(images, classes, point, image_retrieved, class_retrieved):
    """One grid point with every step batched; r and R cached per temperature."""
    r = image_retrieved[point.tau_i2t]
    big_r = class_retrieved[point.tau_t2t]
    fused = unit((1 - point.beta) * images.emb + point.beta * r)
    prototypes = unit((1 - point.alpha) * classes.emb + point.alpha * big_r)
    return hits_at(fused @ prototypes.T, images.labels)


def sample_points(grid: sweep.Grid, count: int, seed: int):
    rng = np.random.default_rng(seed)
    flat = rng.choice(grid.size, size=min(count, grid.size), replace=False)
    return [np.unravel_index(int(i), grid.shape) for i in flat]


def time_loop(run_point, grid, indices):
    start = time.perf_counter()
    for index in indices:
        run_point(grid.point(index))
    per_point = (time.perf_counter() - start) / len(indices)
    return per_point, per_point * grid.size


def main(argv):
    del argv
    n, c, k, d = FLAGS.num_images, FLAGS.num_classes, FLAGS.k, FLAGS.dim
    grid = sweep.Grid()
    logging.info("devices: %s", jax.devices())
    print(
        f"N={n} images, C={c} classes, k={k}, D={d}, "
        f"grid {grid.shape} = {grid.size} points"
    )
    print(
        f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} "
        f"device(s), {psutil.cpu_count()} CPU core(s)"
    )

    t0 = time.perf_counter()
    images, classes = make_data(n, c, k, d, FLAGS.seed)
    print(
        f"synthetic data: {time.perf_counter() - t0:.1f} s, "
        f"RSS {psutil.Process().memory_info().rss / 2**30:.2f} GiB"
    )

    with PeakRss() as first_rss:
        t0 = time.perf_counter()
        result = sweep.sweep(images, classes, grid=grid)
        first = time.perf_counter() - t0
    timings = []
    with PeakRss() as sweep_rss:
        for _ in range(FLAGS.repeats):
            t0 = time.perf_counter()
            result = sweep.sweep(images, classes, grid=grid)
            timings.append(time.perf_counter() - t0)
    steady = min(timings)
    chunk = sweep.default_chunk_size(grid, c, k, d)
    print(
        f"compiled sweep: first call (with compilation) {first:.2f} s, "
        f"then {steady:.2f} s (best of {FLAGS.repeats}); "
        f"chunks of up to {min(chunk, n)} images; "
        f"peak RSS {max(first_rss.peak, sweep_rss.peak) / 2**30:.2f} GiB"
    )
    best = result.best()
    print(
        f"best point {best.point} Acc@1 {best.acc1:.4f} Acc@5 {best.acc5:.4f}; "
        f"zero-shot Acc@1 {result.zero_shot_acc1:.4f}"
    )

    indices = sample_points(grid, FLAGS.reference_points, FLAGS.seed)

    # Spot-check that the loops and the sweep agree before timing them.
    check = indices[0]
    reference_hits = reference_style_point(images, classes, grid.point(check))
    sweep_hits = (int(result.correct1[check]), int(result.correct5[check]))
    reference_hits = tuple(int(h) for h in reference_hits)
    print(
        f"check at {grid.point(check)}: reference loop hits "
        f"{reference_hits}, "
        f"sweep hits {sweep_hits}"
    )

    with PeakRss() as reference_rss:
        per_point, reference_total = time_loop(
            lambda p: reference_style_point(images, classes, p), grid, indices
        )
    print(
        f"reference-style loop: {per_point:.3f} s per point, timed on "
        f"{len(indices)} points, EXTRAPOLATED to {grid.size} points: "
        f"{reference_total:.0f} s; peak RSS {reference_rss.peak / 2**30:.2f} GiB"
    )

    image_retrieved = {
        tau: unit(np.einsum("nk,nkd->nd", softmax(images.sims / tau), images.nbrs))
        for tau in grid.taus_i2t
    }
    class_retrieved = {
        tau: unit(np.einsum("ck,ckd->cd", softmax(classes.sims / tau), classes.nbrs))
        for tau in grid.taus_t2t
    }
    vector_points = max(FLAGS.reference_points, 20)
    with PeakRss() as vector_rss:
        vector_per_point, vector_total = time_loop(
            lambda p: vectorised_point(
                images, classes, p, image_retrieved, class_retrieved
            ),
            grid,
            sample_points(grid, vector_points, FLAGS.seed + 1),
        )
    print(
        f"vectorised NumPy loop: {vector_per_point:.3f} s per point, timed on "
        f"{vector_points} points, EXTRAPOLATED to {grid.size} points: "
        f"{vector_total:.0f} s; peak RSS {vector_rss.peak / 2**30:.2f} GiB"
    )

    print()
    print("| method | time for 2,500 points | speed-up of the sweep |")
    print("|---|---|---|")
    print(
        f"| reference-style loop (per-image NumPy fusion), extrapolated from "
        f"{len(indices)} points | {reference_total:.0f} s "
        f"| {reference_total / steady:.0f}x |"
    )
    print(
        f"| vectorised NumPy loop, extrapolated from {max(FLAGS.reference_points, 20)} "
        f"points | {vector_total:.0f} s | {vector_total / steady:.0f}x |"
    )
    print(f"| `core_jax.sweep` (compiled, steady state) | {steady:.1f} s | 1x |")
    print(f"| `core_jax.sweep` first call, compilation included | {first:.1f} s | |")


if __name__ == "__main__":
    app.run(main)
