r"""Peak memory (RSS) of a caption database build, for growing corpus sizes.

    python -m benchmarks.index_build_memory --sizes=15833,158330

Each size is built in its own subprocess (so peaks do not mix) from the real
CC3M validation captions, repeated with a numbered suffix to reach the size,
with the tiny SigLIP ("Tiny/16", random weights) and a SentencePiece model
trained on the captions. Streaming keeps one shard of captions in memory, so
the peak should not grow with the corpus; what does grow is the final index
build, which holds N x D float32 embeddings (N x 64 x 4 bytes here).
"""

from __future__ import annotations

import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["15833", "158330"], "Corpus sizes to build.")
_SHARD = flags.DEFINE_integer("shard_size", 8192, "Captions per shard.")
_CAPTIONS = flags.DEFINE_string(
    "captions",
    str(
        pathlib.Path(__file__).resolve().parents[2]
        / "shared/data/captions/cc3m_validation_captions.txt"
    ),
    "Caption file to repeat.",
)
_CHILD = flags.DEFINE_integer("child", 0, "Internal: build this many captions.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Internal: working directory.")


def child(size: int, workdir: pathlib.Path) -> None:
    from core_jax import database, encoders, tokenizers  # noqa: PLC0415
    from core_jax.models import siglip  # noqa: PLC0415

    captions = pathlib.Path(_CAPTIONS.value).read_text(encoding="utf-8").splitlines()
    corpus = workdir / "corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(size):
            repeat, row = divmod(i, len(captions))
            suffix = f" ({repeat})" if repeat else ""
            f.write(captions[row] + suffix + "\n")
    model = siglip.SigLIP.from_variant("Tiny/16", image_size=32)
    params = siglip.init_random(model, seed=0)
    model_file = tokenizers.train_sentencepiece(captions, workdir / "spm", 1000)
    tokenizer = tokenizers.SiglipTokenizer(model_file, length=model.text_length)
    encoder = encoders.SiglipTextEncoder(model, params, tokenizer, batch_size=512)
    start = time.perf_counter()
    database.build(
        corpus,
        workdir / "db",
        encoder,
        options=database.BuildOptions(shard_size=_SHARD.value, encode_batch=2048),
        progress=False,
    )
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT {size} {peak_mb:.0f} {seconds:.1f}")


def main(argv):
    del argv
    if _CHILD.value:
        child(_CHILD.value, pathlib.Path(_WORKDIR.value))
        return
    print("| captions | shards | peak RSS (MB) | build s | captions/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size in map(int, _SIZES.value):
        with tempfile.TemporaryDirectory() as workdir:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.index_build_memory",
                    f"--child={size}",
                    f"--workdir={workdir}",
                    f"--shard_size={_SHARD.value}",
                    f"--captions={_CAPTIONS.value}",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
        line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT"))
        _, n, peak, seconds = line.split()
        shards = -(-size // _SHARD.value)
        print(
            f"| {int(n):,} | {shards} | {float(peak):,.0f} | {float(seconds):.0f} | "
            f"{size / float(seconds):,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
