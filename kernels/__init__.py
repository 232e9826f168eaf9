"""Kernels of fastedge, installed as `fastedge.kernels`.

* `reference`: the plain-PyTorch reference of every op (one einsum per reader);
  tests, benchmarks and the `reference` backend start from it.
* `masked_sum`, `hard_concrete`, `philox`: the Triton kernels and launchers.
* `costs`: the cost contract of each launcher (bytes, L2 re-reads, FLOPs by
  kind, launches), from the launchers' own tile choices; bench/roofline.py
  models step times from it.

Importing this package does not import Triton; the Triton modules do.
"""
