"""The patched model on the Triton backend without a GPU (TRITON_INTERPRET=1,
set by tests/conftest.py): fp32 on the CPU against the same model in float64
(`model_vs_float64`), for the 25-reader Llama (the kernels' dot path, split
mask halves) and GPT-2 (the vector path), in training and evaluation. Many
writers are node-pruned in training, so the live-column skipping runs inside
a real model's forward and backward."""
import pytest
import torch

from model_vs_float64 import check_against_float64
from tiny_models import WIDE

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite runs these on the device")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arch", [WIDE, "gpt2"])
def test_triton_model_matches_float64(arch, training, monkeypatch):
    check_against_float64(arch, training, "triton", "cpu", monkeypatch)
