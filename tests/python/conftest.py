import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shared_dir():
    """../shared beside the repository, or $PFC_SHARED_DIR (as the Rust tests find it)."""
    path = os.environ.get("PFC_SHARED_DIR") or os.path.join(REPO, "..", "shared")
    if not os.path.isdir(os.path.join(path, "golden")):
        raise RuntimeError(f"{path}/golden (the reference vectors) not found beside the repository")
    return path


@pytest.fixture
def golden_dir():
    return os.path.join(shared_dir(), "golden")
