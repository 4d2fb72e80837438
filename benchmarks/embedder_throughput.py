"""Text-embedder throughput: the Flax module beside transformers' PyTorch Mistral.

Builds one random Mistral-architecture model (PyTorch), saves it as an HF
folder with a BPE tokenizer trained on real captions, loads the same folder
with `text_embedder.load`, and times both on the same batch of real captions
(last-token embeddings). Also times `text_embedder.Encoder.encode` on a few
thousand captions, tokenization and batching included.

    python benchmarks/embedder_throughput.py --hidden=256 --layers=4

Figures are items (captions) per second after a warm-up call; the Flax call
is jitted (compile time excluded and reported separately).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app, flags, logging

# Runnable from a checkout without installing the package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_integer("hidden", 256, "hidden size")
flags.DEFINE_integer("layers", 4, "decoder layers")
flags.DEFINE_integer("heads", 8, "attention heads")
flags.DEFINE_integer("kv_heads", 2, "key/value heads")
flags.DEFINE_integer("intermediate", 688, "MLP width")
flags.DEFINE_integer("vocab", 2000, "tokenizer vocabulary size")
flags.DEFINE_integer("batch_size", 32, "captions per batch")
flags.DEFINE_integer("repeats", 10, "timed calls per framework")
flags.DEFINE_integer("encode_captions", 2048, "captions for the Encoder timing")
flags.DEFINE_string(
    "captions",
    os.path.join(
        os.path.dirname(REPO), "shared/data/captions/cc3m_validation_captions.txt"
    ),
    "one caption a line",
)


def build_folder(folder: str, captions: list[str]):
    """Saves a random Mistral and a caption-trained tokenizer; returns both."""
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import MistralConfig, MistralModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=FLAGS.vocab, special_tokens=["<unk>", "<s>", "</s>"]
    )
    tokenizer.train_from_iterator(captions, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )
    fast.save_pretrained(folder)

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(fast),
        hidden_size=FLAGS.hidden,
        intermediate_size=FLAGS.intermediate,
        num_hidden_layers=FLAGS.layers,
        num_attention_heads=FLAGS.heads,
        num_key_value_heads=FLAGS.kv_heads,
        sliding_window=4096,
    )
    model = MistralModel(config).eval()
    model.save_pretrained(folder)
    return model, fast


def time_calls(call, repeats: int) -> float:
    """Seconds per call, median of `repeats` after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from core_jax.models import text_embedder

    with open(FLAGS.captions, encoding="utf-8") as f:
        captions = f.read().splitlines()
    torch.set_num_threads(os.cpu_count() or 1)

    rows = []
    with tempfile.TemporaryDirectory(prefix="embedder_throughput_") as folder:
        torch_model, tokenizer = build_folder(folder, captions[:5000])
        batch = captions[: FLAGS.batch_size]
        encoded = tokenizer(batch)["input_ids"]
        rows_ids = [r + [tokenizer.eos_token_id] for r in encoded]
        length = max(len(r) for r in rows_ids)
        ids = np.zeros((len(batch), length), np.int32)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows_ids):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        last = mask.sum(1) - 1

        def torch_call(dtype):
            model = torch_model.to(dtype)
            tensors = [
                torch.as_tensor(a, dtype=torch.long) for a in (ids, mask, positions)
            ]

            def call():
                with torch.inference_mode():
                    hidden = model(
                        input_ids=tensors[0],
                        attention_mask=tensors[1],
                        position_ids=tensors[2],
                    ).last_hidden_state
                    pooled = hidden[torch.arange(len(batch)), torch.as_tensor(last)]
                    return torch.nn.functional.normalize(pooled.float(), dim=-1)

            return call

        ids_device, mask_device = jax.device_put(ids), jax.device_put(mask)
        for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
            model, params = text_embedder.load(folder, dtype=dtype, progress=False)
            apply = jax.jit(model.apply)
            start = time.perf_counter()
            jax.block_until_ready(apply({"params": params}, ids_device, mask_device))
            compile_s = time.perf_counter() - start
            flax_s = time_calls(
                lambda apply=apply, params=params: jax.block_until_ready(
                    apply({"params": params}, ids_device, mask_device)
                ),
                FLAGS.repeats,
            )
            torch_dtype = torch.float32 if name == "float32" else torch.bfloat16
            torch_s = time_calls(torch_call(torch_dtype), FLAGS.repeats)
            rows.append((name, flax_s, torch_s, compile_s))
        torch_model.float()

        encoder = text_embedder.Encoder(folder, batch_size=FLAGS.batch_size)
        texts = captions[: FLAGS.encode_captions]
        encoder.encode(texts)  # compiles each length bucket once
        start = time.perf_counter()
        encoder.encode(texts)
        encode_s = time.perf_counter() - start

    n = len(batch)
    params_m = (
        sum(int(np.prod(s)) for s in text_embedder.parameter_shapes(model).values())
        / 1e6
    )
    print(
        f"Mistral architecture, hidden {FLAGS.hidden}, {FLAGS.layers} layers, "
        f"{FLAGS.heads} heads ({FLAGS.kv_heads} key/value), MLP {FLAGS.intermediate}, "
        f"vocab {len(tokenizer)}, {params_m:.1f}M parameters; batch {n} real "
        f"captions padded to {length} tokens; {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}\n"
    )
    print(
        "| dtype | Flax items/s | PyTorch items/s | Flax / PyTorch | Flax compile s |"
    )
    print("|---|---|---|---|---|")
    for name, flax_s, torch_s, compile_s in rows:
        print(
            f"| {name} | {n / flax_s:.0f} | {n / torch_s:.0f} | "
            f"{torch_s / flax_s:.2f} | {compile_s:.1f} |"
        )
    print(
        f"\nEncoder.encode (tokenize, sort by length, batch {FLAGS.batch_size}, "
        f"float32): {len(texts)} captions in {encode_s:.2f} s = "
        f"{len(texts) / encode_s:.0f} captions/s"
    )
    logging.info("done")


if __name__ == "__main__":
    app.run(main)
