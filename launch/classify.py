r"""Classifies unlabelled images with CoRE: top-5 classes and the captions used.

    python -m launch.classify --config=configs/common.py \
        --config.model.checkpoint=/ckpt/webli_en_so400m_384_58765454.npz \
        --config.model.tokenizer=/ckpt/c4_en.model \
        --config.database_dir=/data/captions_db \
        --images=/data/new_images --classes=classes.txt \
        --results_from=runs/ham10000-20250101-120000/results.json

The class list is a CSV with `name[,common_name]` columns, or a text file
with one class a line (`name` or `name ; common name`) and optional
`template: A photo of a {}.` lines. alpha, beta and the taus come from an
evaluate run's results.json (`--results_from`) or from the config. Writes
classifications.csv and classifications.json to `--output` (default: a new
folder under `--config.output_dir`).
"""

from absl import app, flags
from ml_collections import config_flags

from core_jax import pipeline
from launch import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file giving the model, database and retrieval settings."
)
_IMAGES = flags.DEFINE_string("images", None, "Folder of images to classify.")
_CLASSES = flags.DEFINE_string("classes", None, "Class list file (.csv or .txt).")
_RESULTS_FROM = flags.DEFINE_string(
    "results_from", None, "An evaluate run's results.json to take alpha/beta/tau from."
)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (default: a new one).")
flags.mark_flags_as_required(["config", "images", "classes"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    output = common.run_or_exit(
        lambda: pipeline.classify(
            _CONFIG.value,
            _IMAGES.value,
            _CLASSES.value,
            results_from=_RESULTS_FROM.value,
            output_dir=_OUTPUT.value,
        )
    )
    print(f"Classifications: {output / 'classifications.csv'}")


if __name__ == "__main__":
    app.run(main)
