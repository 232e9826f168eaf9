"""fastedge: fast, scalable Edge Pruning for finding circuits in language models.

The fused operations live in `fastedge.ops`; backends in `fastedge.backends`.
"""
from fastedge import ops
from fastedge.ops import (hard_concrete, hard_concrete_deterministic, hard_concrete_l0,
                          masked_writer_sum, sampled_masked_writer_sum)

__version__ = "0.1.0"
__all__ = ["ops", "masked_writer_sum", "sampled_masked_writer_sum", "hard_concrete",
           "hard_concrete_l0", "hard_concrete_deterministic", "__version__"]
