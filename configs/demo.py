"""The built-in demo: `./run.sh demo`, i.e.

    python -m launch.evaluate --config=configs/demo.py

On first run it writes a small labelled image set (scikit-image's sample
images, cropped and flipped), a caption corpus, a SentencePiece model, a
small SigLIP checkpoint with RANDOM weights and a caption database into
`demo.workdir`, then runs the whole evaluation there. With random weights
the accuracies are near chance and mean nothing: the demo shows the job, not
the method's accuracy. Move everything elsewhere with `--config.demo.workdir=/tmp/demo`.
"""

from ml_collections import config_dict

from configs import common

NOTICE = (
    "DEMO WITH RANDOM WEIGHTS: the SigLIP checkpoint was initialised at random "
    "(no pretrained weights can be downloaded here), so the accuracies say "
    "nothing about how well CoRE works: chance is 1 in 12 (8.3%), and random "
    "features land near it, sometimes somewhat above. The demo shows that "
    "every stage runs and what a run writes."
)


def get_config(arg=None):
    """Demo config; `arg` is unused."""
    config = common.get_config(arg)

    config.demo = config_dict.ConfigDict()
    workdir = config_dict.FieldReference("demo_workdir")
    config.demo.workdir = workdir
    config.demo.variant = "Tiny/16"
    config.demo.image_size = 128
    config.demo.train_per_class = 4
    config.demo.test_per_class = 8
    config.demo.vocab_size = 600
    config.notice = NOTICE

    config.model.checkpoint = workdir + "/siglip_tiny_random.npz"
    config.model.tokenizer = workdir + "/tokenizer.model"
    config.database_dir = workdir + "/database"
    config.cache_dir = workdir + "/cache"
    config.output_dir = workdir + "/runs"

    config.dataset.name = "demo"
    config.dataset.root = workdir + "/dataset"
    config.dataset.templates = ("A photo of a {}.",)
    config.dataset.use_common_names = True

    config.image_batch_size = 32
    config.image_workers = 2
    config.qualitative_samples = 8
    return config
