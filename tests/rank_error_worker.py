"""torchrun entry for the distributed bad-input tests: main.py whose data cannot be read on the rank given by
FAIL_ON_RANK alone (a node that does not see the data folder), a UserError that no other rank finds."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main  # noqa: E402
from util import data  # noqa: E402

image_folder = data.image_folder


def image_folder_seen_by_some(data_path, *args, **kwargs):
    if os.environ.get("RANK") == os.environ["FAIL_ON_RANK"]:
        raise data.DataError(f"--data_path {data_path} is not visible on this node: mount it on every node")
    return image_folder(data_path, *args, **kwargs)


data.image_folder = image_folder_seen_by_some
main.cli(sys.argv[1:])
