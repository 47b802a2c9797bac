"""Test-wide settings: no network, a throwaway Hugging Face cache, and a fixed seed."""

import os
import tempfile

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
