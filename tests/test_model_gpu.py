"""The patched model on a GPU (marker `gpu`): the same EdgeModel, the same
masks and the same seed on the CPU (torch backend, float64) and on the device
with each GPU backend give the same logits, mask sums and log_alpha
gradients (`model_vs_float64`). fp32 on the device; tf32 is off so the
model's own matmuls stay fp32."""
import pytest
import torch

from model_vs_float64 import check_against_float64
from tiny_models import ARCHITECTURES, WIDE

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arch", ARCHITECTURES + [WIDE])  # WIDE: the kernels' dot path
def test_edge_model_on_gpu_matches_cpu_float64(arch, training, backend, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    check_against_float64(arch, training, backend, "cuda", monkeypatch)
