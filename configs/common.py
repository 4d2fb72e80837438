"""Defaults shared by every evaluation config.

Each dataset config starts from `get_config()` here and changes only what
differs. Every field can be overridden on the command line, e.g.

    python -m launch.evaluate --config=configs/ham10000.py \
        --config.model.checkpoint=/ckpt/webli_en_so400m_384_58765454.npz \
        --config.dataset.root=/data/ham10000 --config.sweep=False \
        --config.alpha=0.3 --config.beta=0.2

Paths left at their defaults point inside the current directory; a missing
file is reported with the flag that sets it.
"""

import ml_collections

# The reference release's grids: alpha, beta in {0.1, ..., 1.0}, tau over five
# decades.
MIX_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
TAU_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def get_config(arg=None):
    """Returns the shared defaults as a ConfigDict.

    Args:
      arg: unused; accepted so that `--config=configs/common.py:anything` works.

    Returns:
      A ConfigDict whose fields are documented inline.
    """
    del arg
    config = ml_collections.ConfigDict()

    # SigLIP checkpoint (big_vision .npz or a Hugging Face folder) and its
    # SentencePiece model. The defaults are the official So400m/14@384 English
    # release names; put the files there or pass their paths.
    config.model = ml_collections.ConfigDict()
    config.model.checkpoint = "checkpoints/webli_en_so400m_384_58765454.npz"
    config.model.tokenizer = "checkpoints/c4_en.model"
    config.model.variant = ""  # empty: read the architecture from the checkpoint
    config.model.image_size = 0  # 0: the checkpoint's own resolution
    config.model.dtype = "float32"

    # Caption database written by launch/build_database.py.
    config.database_dir = "databases/captions"
    # Text-to-text retrieval searches the database's "t2t" column. When the
    # database was built with an LLM embedder there (as in the paper), give
    # the same Hugging Face folder here to encode the class prompts; when its
    # "t2t" column is SigLIP's text tower, leave this empty.
    config.t2t_encoder_path = ""

    # Retrieval.
    config.k = 10
    config.dedup = True
    config.dedup_threshold = 0.94

    # Fusion. "softmax" is the paper's image-side weighting; "similarity" is the
    # reference release's (where tau_i2t has no effect).
    config.weighting = "softmax"

    # Hyper-parameters: chosen by Acc@1 on the train split over `grid` when
    # `sweep` is True, used as given when it is False.
    config.sweep = True
    config.alpha = 0.5
    config.beta = 0.5
    config.tau_i2t = 1.0
    config.tau_t2t = 0.01
    config.grid = ml_collections.ConfigDict()
    config.grid.alpha = MIX_GRID
    config.grid.beta = MIX_GRID
    config.grid.tau_i2t = TAU_GRID
    config.grid.tau_t2t = TAU_GRID

    # Batch sizes are global (summed over devices and hosts).
    config.image_batch_size = 64
    config.text_batch_size = 256
    config.image_workers = 4
    # Image embeddings are computed and cached in chunks of this many images, so
    # an interrupted run loses at most one chunk.
    config.image_chunk_size = 1024

    # Where stage results and run directories go.
    config.cache_dir = ".cache/core_jax"
    # Compiled XLA programs, reused by later runs: "" puts them in
    # <cache_dir>/xla, "none" turns this off.
    config.compilation_cache_dir = ""
    config.output_dir = "runs"
    config.run_name = ""  # empty: "<dataset name>-<UTC timestamp>"
    # A run directory that exists is never reused unless one of these is set:
    # `resume` reuses it (finished stages come from the cache anyway),
    # `overwrite` replaces its files.
    config.overwrite = False
    config.resume = False

    # "skip": missing or unreadable images are counted, logged and listed in
    # results.json; "raise": the first one stops the run with its file name.
    config.on_error = "skip"
    config.seed = 0

    # Report: how many test images the qualitative page shows.
    config.qualitative_samples = 12

    # Multi-host: call jax.distributed.initialize() before anything else. On
    # TPU VMs and SLURM it finds its peers by itself; elsewhere give the
    # coordinator's host:port, the number of processes and this one's id.
    # Each process embeds its share of the images; process 0 writes the run.
    config.distributed = False
    config.coordinator_address = ""
    config.num_processes = 0
    config.process_id = -1

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = ""
    config.dataset.source = "csv"  # "csv" (reference layout) or "tfds"
    config.dataset.root = ""
    # Where the CSVs' file names are relative to; empty: `root`.
    config.dataset.images_dir = ""
    config.dataset.train_split = "train"
    config.dataset.test_split = "test"
    config.dataset.templates = ("A photo of a {}.",)
    # Template of the text-to-text retrieval prompt; empty: the first template.
    config.dataset.retrieval_template = ""
    config.dataset.use_common_names = True
    # At most this many images per split (0: all); for quick trial runs.
    config.dataset.limit = 0

    return config
