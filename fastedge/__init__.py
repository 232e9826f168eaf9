"""fastedge: fast, scalable Edge Pruning for finding circuits in language models.

The fused operations live in `fastedge.ops`; backends in `fastedge.backends`.
"""
from fastedge import ops
from fastedge.graph import EdgeGraph
from fastedge.model import EdgeModel, EdgeModelOutput, patch
from fastedge.circuit import Circuit, compare_circuits, extract_circuit, extract_circuit_by_threshold
from fastedge.evaluate import evaluate
from fastedge.attribution import EdgeScores, attribute
from fastedge.prune import PruneConfig, PruneResult, prune  # the function shadows the module name
from fastedge import model  # noqa: F401  (fastedge.model.position_ids_from_attention_mask)
from fastedge import tracr  # noqa: F401  (registers model_type "tracr" with transformers' Auto classes)
from fastedge.ops import (hard_concrete, hard_concrete_deterministic, hard_concrete_l0,
                          masked_writer_sum, sampled_masked_writer_sum)

__version__ = "0.1.0"
__all__ = ["ops", "EdgeGraph", "EdgeModel", "EdgeModelOutput", "patch", "prune", "PruneConfig",
           "PruneResult", "Circuit", "extract_circuit", "extract_circuit_by_threshold", "compare_circuits", "evaluate", "attribute", "EdgeScores", "masked_writer_sum", "sampled_masked_writer_sum", "hard_concrete",
           "hard_concrete_l0", "hard_concrete_deterministic", "__version__"]
