"""iNaturalist LT100: 100 rare fern species, scientific and common names.

Set `--config.dataset.root` to the folder holding `class_mapping.csv`
(scientific names), `class_mapping_common.csv` (common names), `train.csv`,
`test.csv` and the images, in the reference release's layout. Class
prototypes average the scientific and the common name's embeddings; turn the
common names off with `--config.dataset.use_common_names=False`.
"""

from configs import common


def get_config(arg=None):
    """iNaturalist LT100 config; `arg` is unused."""
    config = common.get_config(arg)
    config.dataset.name = "inaturalist"
    config.dataset.root = "/path/to/inaturalist"
    config.dataset.templates = ("A photo of a {}.",)
    config.dataset.use_common_names = True
    return config
