"""The built-in demo: every input of a CoRE run, made on this machine.

`prepare(workdir)` writes, once, into `workdir`:

- `dataset/`: twelve classes of pictures from scikit-image's bundled sample
  images (an astronaut, a cat, coins, the moon, ...), several random crops and
  flips of each, split into `train.csv` / `test.csv` in the reference CSV
  layout with `class_mapping.csv` and `class_mapping_common.csv`;
- `captions.txt`: a few hundred captions written here, describing those
  classes, plus generic ones that describe none of them;
- `tokenizer.model`: a SentencePiece model trained on those captions;
- `siglip_tiny.npz`: a small SigLIP in big_vision's .npz layout with RANDOM
  weights (nothing can be downloaded here);
- `database/`: the caption database built from `captions.txt`.

Because the weights are random, accuracies are near chance and say nothing
about CoRE: the demo shows that every stage runs and what a run writes.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import time

import numpy as np
from absl import logging

# Bump when anything below changes what `prepare` writes, so that an old work
# directory is rebuilt rather than silently reused.
DEMO_VERSION = 1

# (class name, common name, file shipped inside scikit-image's wheel).
DEMO_CLASSES = (
    ("astronaut", "space traveller", "astronaut.png"),
    ("cameraman", "photographer", "camera.png"),
    ("coffee cup", "cup of coffee", "coffee.png"),
    ("cat", "domestic cat", "chelsea.png"),
    ("rocket", "space rocket", "rocket.jpg"),
    ("coins", "pile of coins", "coins.png"),
    ("moon", "full moon", "moon.png"),
    ("brick wall", "brickwork", "brick.png"),
    ("grass", "lawn", "grass.png"),
    ("gravel", "pebbles", "gravel.png"),
    ("motorcycle", "motorbike", "motorcycle_left.png"),
    ("galaxy field", "deep sky", "hubble_deep_field.jpg"),
)

# What a web caption of each class might say. Combined with `_FRAMES` below.
_CLASS_PHRASES = {
    "astronaut": (
        "an astronaut in a white spacesuit",
        "a smiling astronaut holding a helmet",
        "official portrait of an astronaut in front of a flag",
        "astronaut training for a space mission",
        "a woman astronaut in an orange flight suit",
        "crew member of the space shuttle posing for a portrait",
        "an astronaut with mission patches on the suit",
        "astronaut portrait with a model of the space station",
    ),
    "cameraman": (
        "a man with a camera on a tripod",
        "a photographer in a dark coat taking a picture",
        "black and white photo of a cameraman in a park",
        "a cameraman looking through the viewfinder",
        "a vintage film camera on a tripod in a field",
        "photographer standing on the grass with his camera",
        "a man operating an old camera outdoors",
        "street photographer at work",
    ),
    "coffee cup": (
        "a cup of coffee on a saucer",
        "a red cup of espresso seen from above",
        "latte art in a coffee cup",
        "a hot cup of coffee with a spoon",
        "coffee cup on a wooden table",
        "a cappuccino with foam in a ceramic cup",
        "morning coffee in a red mug",
        "top view of a coffee cup and saucer",
    ),
    "cat": (
        "a tabby cat looking at the camera",
        "close up of a ginger cat's face",
        "a domestic cat with green eyes",
        "a cat lying on the sofa",
        "portrait of a striped cat",
        "a curious kitten staring",
        "a cat with long whiskers",
        "an orange tabby cat sitting indoors",
    ),
    "rocket": (
        "a rocket on the launch pad",
        "a rocket lifting off into the sky",
        "space shuttle launch with a cloud of smoke",
        "a tall rocket ready for launch",
        "rocket launch at sunrise",
        "a rocket standing next to the launch tower",
        "a space rocket on the pad before a mission",
        "rocket engines firing during liftoff",
    ),
    "coins": (
        "a collection of old coins",
        "silver coins on a dark background",
        "a pile of ancient coins",
        "greek coins from a museum collection",
        "a numismatic collection of round coins",
        "metal coins arranged in rows",
        "close up of old bronze coins",
        "coins of different sizes on a table",
    ),
    "moon": (
        "the moon surface with craters",
        "a close up photograph of the lunar surface",
        "craters on the moon seen through a telescope",
        "the full moon in the night sky",
        "grey lunar landscape with many craters",
        "the surface of the moon in black and white",
        "a detailed view of moon craters",
        "telescope image of the moon",
    ),
    "brick wall": (
        "an old brick wall",
        "texture of a red brick wall",
        "a wall made of weathered bricks",
        "close up of brickwork with mortar",
        "a brick wall background",
        "rows of bricks in a building wall",
        "an old wall of stacked bricks",
        "brick pattern texture",
    ),
    "grass": (
        "green grass in a meadow",
        "close up of blades of grass",
        "a lawn of fresh grass",
        "grass texture background",
        "tall grass in a field",
        "a patch of green grass in summer",
        "dense grass seen from above",
        "wild grass growing in a garden",
    ),
    "gravel": (
        "a path of grey gravel",
        "small stones and gravel on the ground",
        "gravel texture background",
        "close up of pebbles and gravel",
        "a driveway covered in gravel",
        "crushed stone gravel",
        "a pile of small pebbles",
        "gravel road surface",
    ),
    "motorcycle": (
        "a motorcycle parked in a garage",
        "a red motorbike in a workshop",
        "a sports motorcycle on its stand",
        "side view of a motorcycle",
        "a motorbike parked indoors next to tools",
        "a shiny motorcycle with chrome parts",
        "a racing motorcycle in a garage",
        "a motorbike with a black seat",
    ),
    "galaxy field": (
        "a deep field image of distant galaxies",
        "thousands of galaxies seen by a space telescope",
        "a field of galaxies in deep space",
        "hubble telescope image of faint galaxies",
        "colourful galaxies scattered across the dark sky",
        "the deep universe full of galaxies",
        "spiral and elliptical galaxies in a telescope image",
        "a space telescope view of the early universe",
    ),
}

_FRAMES = (
    "{}",
    "a photo of {}",
    "stock image of {}",
    "{} in high resolution",
)

# Captions about none of the demo's classes, as a web corpus would have.
_GENERIC_CAPTIONS = (
    "a family having a picnic in the park",
    "the view from the top of the mountain",
    "a bowl of fresh fruit on the kitchen table",
    "people walking along the beach at sunset",
    "a modern living room with a grey sofa",
    "a bride and groom dancing at their wedding",
    "a dog running through the snow",
    "an aerial view of the city at night",
    "a plate of pasta with tomato sauce",
    "children playing football in the street",
    "a red car parked on the side of the road",
    "a lighthouse on a rocky coast",
    "a stack of books on a desk",
    "a woman reading a newspaper in a cafe",
    "autumn leaves on a forest path",
    "a sailing boat on a calm lake",
    "the interior of an old church",
    "a birthday cake with candles",
    "a farmer driving a tractor in the field",
    "snow covered trees in winter",
    "a colourful market stall with vegetables",
    "an old man playing the guitar",
    "a train crossing a bridge over a river",
    "a bicycle leaning against a wall",
    "a glass of red wine on a table",
    "a crowd at an outdoor music festival",
    "a young girl blowing soap bubbles",
    "a wooden cabin in the woods",
    "the skyline of a big city",
    "a bowl of soup with bread",
    "a horse grazing in a field",
    "a yellow taxi in a busy street",
    "students sitting in a lecture hall",
    "a waterfall in the jungle",
    "a chef cooking in a restaurant kitchen",
    "an illustration of a cartoon character",
    "vector icon of a house",
    "a pair of running shoes",
    "a close up of a flower with a bee",
    "a map of the world",
)


def captions() -> list[str]:
    """The demo's caption corpus: class captions, then generic ones.

    Returns:
      A list of unique captions in a fixed order (a few hundred).
    """
    texts = []
    for phrases in _CLASS_PHRASES.values():
        for frame in _FRAMES:
            texts.extend(frame.format(phrase) for phrase in phrases)
    texts.extend(_GENERIC_CAPTIONS)
    return list(dict.fromkeys(texts))


def _source_image(filename: str) -> np.ndarray:
    """Reads one of scikit-image's bundled images as (H, W, 3) uint8 RGB."""
    import skimage
    from PIL import Image

    path = pathlib.Path(skimage.__file__).parent / "data" / filename
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def augmented_views(
    image: np.ndarray, count: int, rng: np.random.Generator, size: int
) -> list[np.ndarray]:
    """Random crops (half the area or more), flips and brightness changes.

    Args:
      image: (H, W, 3) uint8.
      count: how many views to make.
      rng: the random generator (seeded by the caller, for reproducibility).
      size: side of the square views.

    Returns:
      `count` arrays (size, size, 3) uint8.
    """
    from PIL import Image

    height, width = image.shape[:2]
    views = []
    for _ in range(count):
        scale = np.sqrt(rng.uniform(0.5, 1.0))
        crop_h, crop_w = int(height * scale), int(width * scale)
        top = rng.integers(0, height - crop_h + 1)
        left = rng.integers(0, width - crop_w + 1)
        crop = image[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        picture = Image.fromarray(np.ascontiguousarray(crop))
        picture = picture.resize((size, size), Image.Resampling.BILINEAR)
        gain = rng.uniform(0.8, 1.2)
        view = np.clip(np.asarray(picture, np.float32) * gain, 0, 255)
        views.append(view.astype(np.uint8))
    return views


def write_dataset(
    root: str | os.PathLike,
    *,
    train_per_class: int = 4,
    test_per_class: int = 8,
    size: int = 160,
    seed: int = 0,
) -> pathlib.Path:
    """Writes the demo's labelled images in the reference CSV layout.

    Layout: `class_mapping.csv` (id,name), `class_mapping_common.csv`
    (id,name), `train.csv` and `test.csv` (filename,class_id) with filenames
    relative to `root`, and the JPEGs under `images/<class id>/`.

    Args:
      root: the dataset folder to create.
      train_per_class: few-shot images per class for the sweep.
      test_per_class: test images per class.
      size: side of the square images.
      seed: seed of the crops and flips.

    Returns:
      `root` as a Path.
    """
    from PIL import Image

    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    rows = {"train": [], "test": []}
    for class_id, (_, _, filename) in enumerate(DEMO_CLASSES):
        folder = root / "images" / f"{class_id:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        views = augmented_views(
            _source_image(filename), train_per_class + test_per_class, rng, size
        )
        for i, view in enumerate(views):
            relative = f"images/{class_id:02d}/{i:03d}.jpg"
            Image.fromarray(view).save(root / relative, quality=90)
            split = "train" if i < train_per_class else "test"
            rows[split].append((relative, class_id))

    _write_csv(
        root / "class_mapping.csv",
        ("id", "name"),
        [(i, name) for i, (name, _, _) in enumerate(DEMO_CLASSES)],
    )
    _write_csv(
        root / "class_mapping_common.csv",
        ("id", "name"),
        [(i, common) for i, (_, common, _) in enumerate(DEMO_CLASSES)],
    )
    for split, split_rows in rows.items():
        _write_csv(root / f"{split}.csv", ("filename", "class_id"), split_rows)
    return root


def _write_csv(path: pathlib.Path, header, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# What `prepare` writes, relative to the work directory; removed before a
# rebuild so that nothing stale survives.
_BUILT = (
    "dataset",
    "database",
    "captions.txt",
    "tokenizer.model",
    "tokenizer.vocab",
    "siglip_tiny_random.npz",
    "README.txt",
    "demo.json",
)


def _settings(config) -> dict:
    demo = config.demo
    return {
        "version": DEMO_VERSION,
        "variant": demo.variant,
        "image_size": int(demo.image_size),
        "train_per_class": int(demo.train_per_class),
        "test_per_class": int(demo.test_per_class),
        "vocab_size": int(demo.vocab_size),
        "seed": int(config.seed),
        "checkpoint": config.model.checkpoint,
        "tokenizer": config.model.tokenizer,
        "database_dir": config.database_dir,
        "dataset_root": config.dataset.root,
    }


def write_checkpoint(
    path: str | os.PathLike,
    *,
    variant: str,
    image_size: int,
    vocab_size: int,
    seed: int,
) -> pathlib.Path:
    """Writes a SigLIP with random weights as a big_vision .npz.

    Args:
      path: the .npz to write.
      variant: a `siglip` variant name, e.g. "Tiny/16".
      image_size: input resolution.
      vocab_size: rows of the token embedding (the tokenizer's size).
      seed: initialisation seed.

    Returns:
      `path`.
    """
    from core_jax import checkpoints
    from core_jax.models import siglip

    model = siglip.SigLIP.from_variant(variant, image_size, vocab_size=vocab_size)
    checkpoints.save_npz(random_params(siglip.param_shapes(model), seed), path)
    return pathlib.Path(path)


def random_params(shapes, seed: int) -> dict:
    """Random parameters for a tree of shapes, drawn with NumPy.

    Compiling the model's initialiser takes longer than the whole demo run
    on two cores; drawing the arrays directly takes a fraction of a second.
    LayerNorm scales are ones, biases zeros, the temperature and bias those
    of SigLIP's initialisation (t = log 10, b = -10), and every other array
    normal with standard deviation 1/sqrt(fan-in) (0.02 for position
    embeddings). Token embeddings (0.3) and attention queries and keys
    (3/sqrt(fan-in)) are drawn larger than usual: with the usual scales
    every text pools to nearly the same vector at the last (EOS) position,
    the median cosine between two demo captions is 0.95, and de-duplication
    at 0.94 would merge almost the whole corpus. With these, it is about 0.3.

    Args:
      shapes: nested dict of arrays or `jax.ShapeDtypeStruct`s.
      seed: NumPy seed.

    Returns:
      A nested dict of float32 NumPy arrays of the same structure.
    """
    rng = np.random.default_rng(seed)

    def draw(path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        name = path[-1]
        if path == ("t",):
            return np.full(shape, np.log(10.0), np.float32)
        if path == ("b",):
            return np.full(shape, -10.0, np.float32)
        if name == "scale":
            return np.ones(shape, np.float32)
        if name == "bias":
            return np.zeros(shape, np.float32)
        if path[-2:] == ("Embed_0", "embedding"):
            std = 0.3
        elif "embedding" in name or len(shape) < 2:
            std = 0.02
        elif len(path) > 1 and path[-2] in ("query", "key"):
            std = 3 * shape[0] ** -0.5
        elif len(path) > 1 and path[-2] == "value":
            std = shape[0] ** -0.5
        else:
            std = float(np.prod(shape[:-1])) ** -0.5
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def walk(tree, path):
        if isinstance(tree, dict):
            return {k: walk(v, (*path, k)) for k, v in sorted(tree.items())}
        return draw(path, tuple(tree.shape))

    return walk(dict(shapes), ())


def _readme(config) -> str:
    return (
        "core_jax demo work directory\n"
        "============================\n\n"
        f"{config.notice}\n\n"
        "Everything here was written by `python -m launch.evaluate "
        "--config=configs/demo.py`:\n"
        "  dataset/       scikit-image sample images, cropped and flipped\n"
        "                 (train.csv, test.csv, class_mapping*.csv)\n"
        "  captions.txt   the caption corpus (class captions and generic ones)\n"
        "  tokenizer.model  SentencePiece trained on captions.txt\n"
        "  siglip_tiny_random.npz  SigLIP Tiny/16, RANDOM weights\n"
        "  database/      the caption database built from captions.txt\n"
        "  cache/         cached stage results\n"
        "  runs/          one folder per run: results.json, predictions.csv,\n"
        "                 heatmap_train_acc1.png, qualitative.html\n\n"
        "Delete this folder to rebuild it from scratch.\n"
    )


def missing_inputs(config) -> list[str]:
    """The demo's input files that are not in the work directory.

    Args:
      config: the demo config (`configs/demo.py`).

    Returns:
      The missing paths, empty when the work directory is complete.
    """
    dataset = pathlib.Path(config.dataset.root)
    needed = [
        pathlib.Path(config.model.checkpoint),
        pathlib.Path(config.model.tokenizer),
        pathlib.Path(config.database_dir) / "manifest.json",
        dataset / "class_mapping.csv",
        dataset / f"{config.dataset.train_split}.csv",
        dataset / f"{config.dataset.test_split}.csv",
    ]
    return [os.fspath(path) for path in needed if not path.exists()]


def prepare(config) -> pathlib.Path:
    """Writes the demo's inputs into `config.demo.workdir`, once.

    A finished work directory is marked by `demo.json` holding the settings
    it was built with; with the same settings and every input file present
    nothing is redone. A missing, incomplete, unfinished or different one is
    rebuilt (cached stages and runs are kept;
    the cache keys see the new files).

    Args:
      config: the demo config (`configs/demo.py`).

    Returns:
      The work directory.
    """
    workdir = pathlib.Path(config.demo.workdir)
    stamp = workdir / "demo.json"
    settings = _settings(config)
    if stamp.exists() and json.loads(stamp.read_text("utf-8")) == settings:
        missing = missing_inputs(config)
        if not missing:
            logging.info("Demo inputs in %s are ready; reusing them", workdir)
            logging.warning("%s", config.notice)
            return workdir
        logging.warning(
            "Demo inputs in %s are incomplete (%s missing); writing them again",
            workdir,
            ", ".join(missing),
        )

    start = time.perf_counter()
    logging.info("Writing the demo's inputs into %s", workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in _BUILT:
        target = workdir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    dataset_root = pathlib.Path(config.dataset.root)
    write_dataset(
        dataset_root,
        train_per_class=settings["train_per_class"],
        test_per_class=settings["test_per_class"],
        size=max(settings["image_size"], 64),
        seed=settings["seed"],
    )
    corpus = captions()
    (workdir / "captions.txt").write_text("\n".join(corpus) + "\n", "utf-8")
    logging.info(
        "Demo dataset: %d classes in %s; %d captions",
        len(DEMO_CLASSES),
        dataset_root,
        len(corpus),
    )

    vocab_size = write_model_files(
        corpus,
        config.model.tokenizer,
        config.model.checkpoint,
        variant=settings["variant"],
        image_size=settings["image_size"],
        vocab_size=settings["vocab_size"],
        seed=settings["seed"],
    )
    logging.info(
        "Demo SigLIP %s at %d px with RANDOM weights written to %s (vocabulary %d)",
        settings["variant"],
        settings["image_size"],
        config.model.checkpoint,
        vocab_size,
    )

    build_caption_database(
        config.model.checkpoint,
        config.model.tokenizer,
        workdir / "captions.txt",
        config.database_dir,
    )
    (workdir / "README.txt").write_text(_readme(config), "utf-8")
    stamp.write_text(json.dumps(settings, indent=2), "utf-8")
    logging.info("Demo inputs ready in %.1f s", time.perf_counter() - start)
    logging.warning("%s", config.notice)
    return workdir


def write_model_files(
    corpus: list[str],
    tokenizer_path: str | os.PathLike,
    checkpoint_path: str | os.PathLike,
    *,
    variant: str,
    image_size: int,
    vocab_size: int,
    seed: int,
) -> int:
    """Trains a SentencePiece model on `corpus` and writes a matching SigLIP.

    Args:
      corpus: training texts.
      tokenizer_path: the `.model` file to write (a `.vocab` goes beside it).
      checkpoint_path: the .npz to write, with random weights.
      variant: a `siglip` variant name, e.g. "Tiny/16".
      image_size: the model's input resolution.
      vocab_size: requested vocabulary; the trainer may produce fewer pieces,
        and the model gets exactly as many as the tokenizer has.
      seed: initialisation seed.

    Returns:
      The vocabulary size used.
    """
    from core_jax import tokenizers

    prefix = str(pathlib.Path(tokenizer_path).with_suffix(""))
    model_file = tokenizers.train_sentencepiece(corpus, prefix, vocab_size)
    if pathlib.Path(model_file) != pathlib.Path(tokenizer_path):
        shutil.move(model_file, tokenizer_path)
    pieces = _piece_count(os.fspath(tokenizer_path))
    write_checkpoint(
        checkpoint_path,
        variant=variant,
        image_size=image_size,
        vocab_size=pieces,
        seed=seed,
    )
    return pieces


def build_caption_database(
    checkpoint: str | os.PathLike,
    tokenizer: str | os.PathLike,
    captions_file: str | os.PathLike,
    database_dir: str | os.PathLike,
    *,
    shard_size: int = 65_536,
) -> pathlib.Path:
    """Builds a caption database with a checkpoint's SigLIP text tower.

    The exact JAX index is used, so this needs no ScaNN.

    Args:
      checkpoint: the SigLIP checkpoint.
      tokenizer: its SentencePiece model.
      captions_file: the corpus, one caption a line.
      database_dir: the database directory to create.
      shard_size: captions per stored shard.

    Returns:
      The database directory.
    """
    from core_jax import database, encoders, tokenizers
    from core_jax.models import siglip

    model, params = siglip.load(checkpoint)
    encoder = encoders.SiglipTextEncoder(
        model,
        params,
        tokenizers.SiglipTokenizer(tokenizer, length=model.text_length),
    )
    return database.build(
        captions_file,
        database_dir,
        encoder,
        options=database.BuildOptions(backend="exact", shard_size=shard_size),
        progress=False,
    )


def _piece_count(model_file: str) -> int:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
    return processor.get_piece_size()
