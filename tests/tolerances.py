"""The one tolerance table of the op tests, and the comparison rule.

Rule (flash-attention's): the error of a backend against a float64 reference
must be at most twice the error of plain PyTorch computing the same thing in
the same dtype, plus a floor of a few ulps of the result's scale (so that a
lucky plain-PyTorch result cannot make the bound zero).
"""
import torch

# floor, as a multiple of max(1, max |reference|)
FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 4e-6,
    torch.bfloat16: 8e-3,   # one bf16 ulp (2**-7 at 1): interpreted stores truncate
    torch.float16: 1e-3,
}
RATIO = 2.0


def max_error(got: torch.Tensor, ref64: torch.Tensor) -> float:
    return (got.to(torch.float64) - ref64).abs().max().item()


def assert_matches_reference(got: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor,
                             dtype: torch.dtype, what: str = "") -> None:
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element was not written?)"
    scale = max(1.0, ref64.abs().max().item())
    err = max_error(got, ref64)
    err_plain = max_error(plain, ref64)
    bound = RATIO * err_plain + FLOOR[dtype] * scale
    assert err <= bound, (f"{what}: error {err:.3g} > bound {bound:.3g} "
                          f"(plain PyTorch {dtype} error {err_plain:.3g}, scale {scale:.3g})")
