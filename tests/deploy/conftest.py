import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from util import trellis_bin  # noqa: E402


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("tests/deploy needs root: it makes network namespaces, chroots and a systemd container")


@pytest.fixture(scope="session")
def trellis() -> Path:
    return trellis_bin()
