"""Fixtures shared by the tests of ``training``: a clean accelerate state around each test that
builds an ``Accelerator`` (its state is a process-wide singleton)."""

import pytest
from accelerate.state import AcceleratorState, GradientState


def reset_accelerate_state() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def clean_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()
