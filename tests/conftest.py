"""Shared fixtures: small seeded models and a fresh run folder per test."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"
