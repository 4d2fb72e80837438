"""Host memory while loading a sharded LLM-embedder checkpoint.

Writes a random Mistral-shaped checkpoint of about --size_mb megabytes
(float32, --shards safetensors shards plus index), then loads it with
`text_embedder.load` in a fresh process while a thread samples the process's
resident memory (/proc/self/status: VmRSS, RssAnon, RssFile) every 2 ms.

On a CPU the "device" is host memory, so after loading the process holds
one copy of the parameters by construction; what the loader controls is the
transient on top of that. The figure to read is the peak growth over the
baseline divided by the size of the loaded parameters: near 1.0 means one
copy plus about one tensor in flight.

`--no_unmap` repeats the load with the checkpoint's file maps kept open for
the whole load (what happens without the per-tensor close), to show the
file-backed pages that would otherwise pile up beside the parameters.

    python benchmarks/embedder_memory.py --size_mb=300
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("size_mb", 300, "approximate checkpoint size (float32)")
flags.DEFINE_integer("shards", 3, "number of safetensors shards")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "load dtype")
flags.DEFINE_bool("no_unmap", False, "also measure with file maps kept open")
flags.DEFINE_enum("mode", "all", ["all", "write", "measure"], "internal")
flags.DEFINE_string("folder", None, "internal: checkpoint folder")
flags.DEFINE_bool("keep_maps", False, "internal: keep file maps open")

HIDDEN = 1024
HEADS = 8
KV_HEADS = 2
INTERMEDIATE = 2816
VOCAB = 8192


def _layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    head_dim = HIDDEN // HEADS
    prefix = f"layers.{i}."
    return {
        prefix + "input_layernorm.weight": (HIDDEN,),
        prefix + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        prefix + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        prefix + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
        prefix + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        prefix + "post_attention_layernorm.weight": (HIDDEN,),
        prefix + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        prefix + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        prefix + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    }


def write_checkpoint(folder: str, size_mb: int, shards: int) -> None:
    """A random float32 Mistral checkpoint of about size_mb, in `shards` files."""
    import numpy as np
    from safetensors.numpy import save_file

    per_layer = sum(int(np.prod(s)) for s in _layer_shapes(0).values()) * 4
    layers = max(1, round((size_mb * 2**20 - VOCAB * HIDDEN * 4) / per_layer))
    shapes = {"embed_tokens.weight": (VOCAB, HIDDEN), "norm.weight": (HIDDEN,)}
    for i in range(layers):
        shapes.update(_layer_shapes(i))

    names = list(shapes)
    groups = np.array_split(np.arange(len(names)), shards)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for s, group in enumerate(groups):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for j in group:
            shape = shapes[names[j]]
            scale = 1.0 if len(shape) == 1 else 0.02
            tensors[names[j]] = (scale * rng.standard_normal(shape)).astype(np.float32)
            weight_map[names[j]] = file
            total += tensors[names[j]].nbytes
        save_file(tensors, os.path.join(folder, file))
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {
        "model_type": "mistral",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "hidden_act": "silu",
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def _memory() -> dict[str, int]:
    """Resident memory of this process in bytes: total, anonymous, file-backed."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _memory()
        self.running = True

    def run(self):
        while self.running:
            now = _memory()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            time.sleep(0.002)


def measure(folder: str, dtype: str, keep_maps: bool) -> dict:
    """Loads `folder` and reports memory growth; run in a fresh process."""
    import jax
    import numpy as np

    from core_jax.models import text_embedder

    if keep_maps:
        text_embedder.SafetensorsCheckpoint.close = lambda self: None
    jax.devices()
    jax.block_until_ready(jax.device_put(np.zeros(4)) + 1)
    baseline = _memory()

    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    _, params = text_embedder.load(folder, dtype=dtype, progress=False)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    after = _memory()

    leaves = jax.tree.leaves(params)
    checkpoint_bytes = sum(
        os.path.getsize(os.path.join(folder, f))
        for f in os.listdir(folder)
        if f.endswith(".safetensors")
    )
    return {
        "dtype": dtype,
        "keep_maps": keep_maps,
        "checkpoint_bytes": checkpoint_bytes,
        "params_bytes": sum(x.nbytes for x in leaves),
        "largest_tensor_bytes": max(x.nbytes for x in leaves),
        "baseline": baseline,
        "peak": sampler.peak,
        "after": after,
        "seconds": seconds,
    }


def _run_self(*args: str) -> str:
    command = [sys.executable, os.path.abspath(__file__), *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def _markdown(rows: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| load | checkpoint MiB | params MiB | baseline RSS MiB | peak growth MiB "
        "(anon / file) | after-load growth MiB | peak growth / params | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        growth = r["peak"]["VmRSS"] - r["baseline"]["VmRSS"]
        anon = r["peak"]["RssAnon"] - r["baseline"]["RssAnon"]
        file = r["peak"]["RssFile"] - r["baseline"]["RssFile"]
        kept = r["after"]["VmRSS"] - r["baseline"]["VmRSS"]
        label = f"{r['dtype']}" + (", maps kept open" if r["keep_maps"] else "")
        lines.append(
            f"| {label} | {r['checkpoint_bytes'] / mib:.0f} | "
            f"{r['params_bytes'] / mib:.0f} | {r['baseline']['VmRSS'] / mib:.0f} | "
            f"{growth / mib:.0f} ({anon / mib:.0f} / {file / mib:.0f}) | "
            f"{kept / mib:.0f} | {growth / r['params_bytes']:.2f} | "
            f"{r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.mode == "write":
        write_checkpoint(FLAGS.folder, FLAGS.size_mb, FLAGS.shards)
        return
    if FLAGS.mode == "measure":
        print(json.dumps(measure(FLAGS.folder, FLAGS.dtype, FLAGS.keep_maps)))
        return

    with tempfile.TemporaryDirectory(prefix="embedder_memory_") as folder:
        _run_self(
            "--mode=write",
            f"--folder={folder}",
            f"--size_mb={FLAGS.size_mb}",
            f"--shards={FLAGS.shards}",
        )
        rows = []
        for keep_maps in [False, True] if FLAGS.no_unmap else [False]:
            output = _run_self(
                "--mode=measure",
                f"--folder={folder}",
                f"--dtype={FLAGS.dtype}",
                f"--keep_maps={keep_maps}",
            )
            rows.append(json.loads(output.strip().splitlines()[-1]))
    print(json.dumps(rows))
    print(_markdown(rows))


if __name__ == "__main__":
    app.run(main)
