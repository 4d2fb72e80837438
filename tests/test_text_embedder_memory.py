"""Host memory while loading a sharded embedder checkpoint.

Runs benchmarks/embedder_memory.py, which loads a ~120 MB float32 sharded
checkpoint in a fresh process (so resident memory starts clean) and samples
its resident set. On a CPU the loaded parameters are themselves host memory,
so one copy is the floor; the loader must add no more than about one tensor
in flight plus a fixed runtime overhead (64 MiB allowed: JAX's allocator and
the process's own pages; ~40 MiB observed).
"""

import json
import pathlib
import subprocess
import sys

SCRIPT = (
    pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "embedder_memory.py"
)
MIB = 2**20


def test_loading_holds_about_one_copy_of_the_checkpoint():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--size_mb=120", "--shards=3", "--no_unmap"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    unmapped, kept_open = json.loads(result.stdout.splitlines()[0])

    def growth(row):
        return row["peak"]["VmRSS"] - row["baseline"]["VmRSS"]

    params = unmapped["params_bytes"]
    assert params > 100 * MIB
    bound = params + 2 * unmapped["largest_tensor_bytes"] + 64 * MIB
    assert growth(unmapped) < bound
    # The measurement can see a second copy: with the file maps left open, the
    # checkpoint's pages stay resident beside the parameters.
    assert growth(kept_open) > bound
