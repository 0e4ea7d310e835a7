"""Shared fixtures: seeded RNG and the dense references every kernel is checked against."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)
