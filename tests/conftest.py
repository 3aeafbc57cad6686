import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@functools.lru_cache(maxsize=1)
def has_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def pytest_collection_modifyitems(config, items):
    if has_sm90():
        return
    skip = pytest.mark.skip(reason="needs an SM90 GPU (H100/H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    """A fresh seed per test run, printed on failure, so every run draws new inputs."""
    import random

    value = random.randrange(2**31)
    torch.manual_seed(value)
    return value


REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Run ``python -c code`` on this checkout, with this process's environment (and its cache)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    popen.setdefault("capture_output", True)
    popen.setdefault("cwd", REPO)
    return subprocess.run([sys.executable, "-c", code, *args], text=True, env=env, timeout=timeout, **popen)
