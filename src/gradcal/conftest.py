"""Doctest set-up: one torch thread, a fixed seed, and ``torch`` in every namespace."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    torch.manual_seed(0)
    doctest_namespace["torch"] = torch
