"""Test-wide settings: no network, a throwaway Hugging Face cache, a fixed seed, and a clean
accelerate state for the tests that run a script in this process."""

import os
import tempfile

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate():
    """accelerate's process-wide state reset before and after the test."""
    # Imported here: the Hugging Face libraries read the environment set above when imported.
    from script_runs import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module: tiny models gain nothing from a second, and on a busy
    CPU two threads wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
