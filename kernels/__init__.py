"""Kernels of fastedge, installed as `fastedge.kernels`.

* `reference`: the plain-PyTorch reference of every op (one einsum per reader);
  tests, benchmarks and the `reference` backend start from it.
* `masked_sum`, `hard_concrete`, `philox`: the Triton kernels and launchers.

Importing this package does not import Triton; the Triton modules do.
"""
