"""Test setup shared by every test file.

Without a GPU, Triton kernels run through the Triton interpreter, which is read
when a kernel is decorated: the variable must be set before `kernels` is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


@pytest.fixture
def device():
    return DEVICE
