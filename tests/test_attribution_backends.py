"""Attribution on the Triton backend without a GPU (TRITON_INTERPRET=1, set
by tests/conftest.py) and, with the `gpu` marker, on every GPU backend in
fp32 and bf16: scores against the same model's in float64 on the CPU."""
import pytest
import torch

from attribution_vs_float64 import check_attribution_against_float64
from tiny_models import ARCHITECTURES, WIDE

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite runs these on the device")
@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs"])
def test_triton_attribution_matches_float64(method, monkeypatch):
    check_attribution_against_float64(WIDE, method, "triton", "cpu", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "eap-ig-activations"])
@pytest.mark.parametrize("arch", ARCHITECTURES + [WIDE])
def test_gpu_attribution_matches_float64(arch, method, backend, dtype, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False   # the model's own matmuls stay fp32
    torch.backends.cudnn.allow_tf32 = False
    check_attribution_against_float64(arch, method, backend, "cuda", monkeypatch, dtype=dtype)
