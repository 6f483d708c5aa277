"""Image builder tests. The end-to-end test (build, boot in QEMU, testinfra, OpenAI SDK smoke)
is marked `image`: select it with `-m image`, skip it with `-m "not image"`."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "image"))


@pytest.fixture
def repo():
    return REPO
