r"""Evaluates zero-shot SigLIP and CoRE on a labelled dataset.

    python -m launch.evaluate --config=configs/ham10000.py \
        --config.model.checkpoint=/ckpt/webli_en_so400m_384_58765454.npz \
        --config.model.tokenizer=/ckpt/c4_en.model \
        --config.database_dir=/data/captions_db \
        --config.dataset.root=/data/ham10000

Stages are cached under `--config.cache_dir`, so a rerun (or a run resumed
after an interruption) recomputes only what changed. Results go to a new
folder under `--config.output_dir` (see `core_jax.pipeline.prepare_run_dir`).
"""

from absl import app, flags
from ml_collections import config_flags

from core_jax import pipeline
from launch import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file, e.g. configs/ham10000.py."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    run = common.run_or_exit(lambda: pipeline.evaluate(_CONFIG.value))
    if run.run_dir is not None:
        print(f"Results: {run.run_dir / 'results.json'}")


if __name__ == "__main__":
    app.run(main)
