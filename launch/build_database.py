r"""Builds a caption database: texts, SigLIP text embeddings, t2t column, indexes.

    python -m launch.build_database --config=configs/database.py \
        --config.corpus=/data/cc12m.tsv --config.column=caption \
        --config.model.checkpoint=/ckpt/webli_en_so400m_384_58765454.npz \
        --config.model.tokenizer=/ckpt/c4_en.model \
        --config.database_dir=/data/cc12m_db

Interrupted builds resume: run the same command again and finished shards
are checked and kept, a half-written one is redone. Run on a complete
database, the command checks its files against the manifest and rebuilds
any damaged or missing shard (and the indexes). A corpus file whose size or
modification time changed since the build is refused: build it into a new
--config.database_dir.
"""

import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from core_jax import database, encoders, tokenizers
from core_jax.models import siglip
from launch import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Database config file, e.g. configs/database.py."
)
flags.mark_flags_as_required(["config"])


def build_from_config(config):
    """Loads the encoders named by `config` and builds the database.

    Returns:
      The database directory.
    """
    # Before the minutes spent loading the model.
    database.check_corpus(config.corpus, config.format or None)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.model.dtype)
    if dtype is None:
        raise ValueError(
            f"model.dtype={config.model.dtype!r}; expected 'float32' or 'bfloat16'"
        )
    model, params = siglip.load(
        config.model.checkpoint, variant=config.model.variant or None, dtype=dtype
    )
    logging.info(
        "Loaded SigLIP %s (embed dim %d)", config.model.checkpoint, model.embed_dim
    )
    tokenizer = tokenizers.SiglipTokenizer(
        config.model.tokenizer, length=model.text_length
    )
    encoder = encoders.SiglipTextEncoder(
        model, params, tokenizer, batch_size=config.text_batch_size
    )
    t2t_encoder = None
    if config.t2t_encoder_path:
        from core_jax.models import text_embedder  # noqa: PLC0415

        t2t_encoder = text_embedder.Encoder(
            config.t2t_encoder_path, batch_size=config.text_batch_size
        )
    options = database.BuildOptions(
        column=config.column or None,
        format=config.format or None,
        shard_size=config.shard_size,
        encode_batch=config.encode_batch,
        backend=config.backend,
        scann=dict(config.scann),
    )
    return database.build(
        config.corpus,
        config.database_dir,
        encoder,
        t2t_encoder=t2t_encoder,
        options=options,
        progress=config.progress,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    directory = common.run_or_exit(lambda: build_from_config(_CONFIG.value))
    print(f"Database: {directory}")


if __name__ == "__main__":
    app.run(main)
