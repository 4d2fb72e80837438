"""HAM10000 dermatoscopic images, seven lesion classes.

Set `--config.dataset.root` to the folder holding `class_mapping.csv`,
`train.csv`, `test.csv` and the images, in the reference release's layout.
Classes are heavily imbalanced, so read balanced accuracy beside Acc@1.
"""

from configs import common


def get_config(arg=None):
    """HAM10000 config; `arg` is unused."""
    config = common.get_config(arg)
    config.dataset.name = "ham10000"
    config.dataset.root = "/path/to/ham10000"
    config.dataset.templates = ("A skin lesion of a {}.",)
    return config
