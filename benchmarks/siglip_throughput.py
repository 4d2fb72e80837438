r"""Image and caption throughput of the Flax SigLIP towers against PyTorch's.

    python -m benchmarks.siglip_throughput --variant=B/16 --image_size=224 \
        --batch=8 --iters=5

Both sides get the same architecture (transformers' SiglipModel built from
the same sizes), random weights, the same batch, on the same machine. Timed
iterations alternate between the two so that a load change on a shared
machine hits both alike; each figure is the median over the iterations.
Prints items/s (wall clock) for each tower, the Flax / PyTorch ratio, and
the process CPU seconds per item (all threads; less sensitive than wall time
to other jobs on a shared machine) as a Markdown table.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags, logging

_VARIANT = flags.DEFINE_string("variant", "B/16", "SigLIP variant.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image side in pixels.")
_BATCH = flags.DEFINE_integer("batch", 8, "Items per batch.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed batches per tower and framework.")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Flax matmul dtype."
)
_THREADS = flags.DEFINE_integer(
    "threads", 0, "PyTorch intra-op threads (0: one per available core)."
)


def _hf_model(config):
    import torch
    import transformers

    hf_config = transformers.SiglipConfig(
        text_config=dict(
            vocab_size=config.vocab_size,
            hidden_size=config.text_width,
            intermediate_size=config.text_mlp_dim,
            num_hidden_layers=config.text_depth,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.text_length,
            projection_size=config.embed_dim,
            pad_token_id=1,
            bos_token_id=1,
            eos_token_id=1,
        ),
        vision_config=dict(
            hidden_size=config.image_width,
            intermediate_size=config.image_mlp_dim,
            num_hidden_layers=config.image_depth,
            num_attention_heads=config.image_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
        ),
    )
    torch.manual_seed(0)
    return transformers.SiglipModel(hf_config).eval()


def _time(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from core_jax.models import siglip

    threads = _THREADS.value or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[_DTYPE.value]
    model = siglip.SigLIP.from_variant(
        _VARIANT.value, image_size=_IMAGE_SIZE.value, dtype=dtype
    )
    config = model.config
    batch = _BATCH.value

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, config.image_size, config.image_size, 3))
    images = images.astype(np.float32)
    tokens = rng.integers(2, config.vocab_size, (batch, config.text_length))
    tokens = tokens.astype(np.int32)

    logging.info("initialising %s@%d", _VARIANT.value, config.image_size)
    params = siglip.init_random(model, seed=0)
    hf = _hf_model(config)

    image_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, None)[0])
    text_fn = jax.jit(lambda p, t: model.apply({"params": p}, None, t)[1])
    images_jax, tokens_jax = jnp.asarray(images), jnp.asarray(tokens)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    ids = torch.from_numpy(tokens).long()

    def flax_images():
        image_fn(params, images_jax).block_until_ready()

    def flax_texts():
        text_fn(params, tokens_jax).block_until_ready()

    def torch_images():
        with torch.inference_mode():
            hf.get_image_features(pixel_values=pixels)

    def torch_texts():
        with torch.inference_mode():
            hf.get_text_features(input_ids=ids)

    runs = {
        "images": (flax_images, torch_images),
        "captions": (flax_texts, torch_texts),
    }
    rows = []
    for what, (flax_fn, torch_fn) in runs.items():
        compile_s, _ = _time(flax_fn)  # compile + first run
        torch_fn()  # warm-up
        flax_fn()
        flax_s, torch_s = [], []
        for _ in range(_ITERS.value):
            flax_s.append(_time(flax_fn))
            torch_s.append(_time(torch_fn))
        flax_rate = batch / statistics.median(w for w, _ in flax_s)
        torch_rate = batch / statistics.median(w for w, _ in torch_s)
        flax_cpu = statistics.median(c for _, c in flax_s) / batch
        torch_cpu = statistics.median(c for _, c in torch_s) / batch
        logging.info(
            "%s: flax %.1f/s (compile %.1f s), torch %.1f/s",
            what,
            flax_rate,
            compile_s,
            torch_rate,
        )
        rows.append((what, flax_rate, torch_rate, flax_cpu, torch_cpu))

    print(
        f"\nSigLIP {_VARIANT.value}@{config.image_size}, batch {batch}, "
        f"{_ITERS.value} timed batches (median), Flax {_DTYPE.value} on "
        f"{jax.devices()[0].platform}, PyTorch float32 with {threads} threads\n"
    )
    print(
        "| tower | Flax items/s | PyTorch items/s | Flax / PyTorch | "
        "Flax CPU s/item | PyTorch CPU s/item |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for what, flax_rate, torch_rate, flax_cpu, torch_cpu in rows:
        print(
            f"| {what} | {flax_rate:.2f} | {torch_rate:.2f} | "
            f"{flax_rate / torch_rate:.2f} | {flax_cpu:.3f} | {torch_cpu:.3f} |"
        )


if __name__ == "__main__":
    app.run(main)
