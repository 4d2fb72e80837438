"""Circuit diagrams, 32 classes (the reference release's split).

Set `--config.dataset.root` to the folder holding `class_mapping.csv`,
`train.csv`, `test.csv` and the images, in the reference release's layout.
"""

from configs import common


def get_config(arg=None):
    """Circuits config; `arg` is unused."""
    config = common.get_config(arg)
    config.dataset.name = "circuits"
    config.dataset.root = "/path/to/circuits"
    config.dataset.templates = ("A circuit diagram of a {}.",)
    return config
