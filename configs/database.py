r"""Config for launch/build_database.py: a caption corpus -> caption database.

    python -m launch.build_database --config=configs/database.py \
        --config.corpus=/data/cc12m.tsv --config.column=caption \
        --config.model.checkpoint=/ckpt/webli_en_so400m_384_58765454.npz \
        --config.model.tokenizer=/ckpt/c4_en.model \
        --config.database_dir=/data/cc12m_db

`--config=configs/database.py:cc3m_val` reads the CC3M validation captions
that ship beside the project (one caption a line).
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """Database build settings.

    Args:
      arg: "" for the defaults, or "cc3m_val" for the bundled CC3M
        validation captions.

    Returns:
      A ConfigDict whose fields are documented inline.
    """
    config = ml_collections.ConfigDict()

    # The corpus: a text file (one caption a line), CSV, TSV, JSONL or Parquet.
    # `format` "" takes it from the suffix; `column` names the caption column
    # (ignored for text files).
    config.corpus = "captions.txt"
    config.format = ""
    config.column = "caption"
    config.database_dir = "databases/captions"

    # The SigLIP checkpoint and its SentencePiece model; the text tower fills
    # the "siglip" column.
    config.model = ml_collections.ConfigDict()
    config.model.checkpoint = "checkpoints/webli_en_so400m_384_58765454.npz"
    config.model.tokenizer = "checkpoints/c4_en.model"
    config.model.variant = ""  # empty: read the architecture from the checkpoint
    config.model.dtype = "float32"

    # Text-to-text column: "" uses the SigLIP text tower (the column is then
    # an alias of "siglip"); a Hugging Face Mistral/Llama folder uses the LLM
    # embedder, as the paper does.
    config.t2t_encoder_path = ""

    # Streaming: kept captions per shard (one shard in memory at a time) and
    # captions per device call.
    config.shard_size = 65_536
    config.encode_batch = 4096
    config.text_batch_size = 512

    # Saved indexes: "scann" (brute force below 20k rows, tree + asymmetric
    # hashing above) or "exact". `scann` overrides core_jax.index.ScannParams
    # fields, e.g. {"leaves_to_search": 100}.
    config.backend = "scann"
    config.scann = ml_collections.ConfigDict()

    config.progress = True

    if arg == "cc3m_val":
        config.corpus = "../shared/data/captions/cc3m_validation_captions.txt"
        config.format = "text"
        config.database_dir = "databases/cc3m_val"
    elif arg:
        raise ValueError(f"unknown database config {arg!r}; expected '' or 'cc3m_val'")
    return config
