"""One pruning step, shared by bench/step.py (time) and bench/memory.py (peak memory).

A step is what `fastedge.prune` does per optimizer update, with the
multipliers held fixed: the corrupted pass, the masked forward, the loss
(KL of the masked model's next-token distribution at the last position from
the full model's, plus the Lagrangian sparsity penalty), the backward into
the masks and the AdamW update. With ``micro_batch`` smaller than the batch,
the batch runs in micro-batches whose gradients accumulate before the update.

`floor_step` is the lower bound a pruning step cannot beat (docs/CONCEPTS.md section 5):
one forward on the corrupted input (no grad) and one forward and backward of
the unpatched model on the clean input. The backward runs to the input
embeddings only: a pruning step computes no weight gradients either.

Model shapes: `gpt2_small` and `codellama_13b` build random-weight models from
their configurations (nothing is downloaded). Vocabulary, sizes and rotary
base follow the published configurations.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGET_SPARSITY = 0.5
LAMBDAS = (0.3, 0.1)   # fixed multipliers: the penalty's value does not change the work
LR = 0.1


def gpt2_small_config():
    from transformers import GPT2Config
    cfg = GPT2Config()  # 12 layers, 12 heads, 768 wide, 50257 tokens
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    cfg._attn_implementation = "sdpa"
    return cfg


def codellama_13b_config(n_layers: Optional[int] = None):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=32016, hidden_size=5120, intermediate_size=13824,
                      num_hidden_layers=n_layers or 40, num_attention_heads=40, num_key_value_heads=40,
                      max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


CONFIGS = {"gpt2-small": gpt2_small_config, "codellama-13b": codellama_13b_config}


def build_model(name: str, dtype: torch.dtype, device, seed: int = 0) -> nn.Module:
    """A random-weight causal LM of the named shape, built on `device`."""
    from transformers import AutoModelForCausalLM
    cfg = CONFIGS[name]()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def random_batch(vocab: int, batch: int, seq: int, device, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    corrupted = torch.randint(0, vocab, (batch, seq), generator=g)
    return ids.to(device), corrupted.to(device)


@torch.no_grad()
def full_log_probs(model: nn.Module, ids: Tensor) -> Tensor:
    """The unpruned model's log-probabilities at the last position (fp32): the KL target."""
    return F.log_softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)


def _loss(out, full: Tensor) -> Tensor:
    lp = F.log_softmax(out.logits[:, -1].float(), dim=-1)
    kl = (full.exp() * (full - lp)).sum(-1).mean()
    gap = out.edge_sparsity - TARGET_SPARSITY
    return kl + LAMBDAS[0] * gap + LAMBDAS[1] * gap ** 2


def make_optimizer(masked_model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(masked_model.parameters()), lr=LR, weight_decay=0.0)


def pruning_step(masked_model: nn.Module, optimizer: torch.optim.Optimizer, ids: Tensor,
                 corrupted: Tensor, full: Tensor, micro_batch: Optional[int] = None) -> float:
    """One step of `masked_model` (an `EdgeModel` or a `NaiveEdgeModel`, in
    train mode); returns the loss (without a host sync: a 0-dim tensor)."""
    B = ids.shape[0]
    micro = micro_batch or B
    total = torch.zeros((), device=ids.device)
    for lo in range(0, B, micro):
        hi = min(B, lo + micro)
        out = masked_model(ids[lo:hi], corrupted[lo:hi])
        loss = _loss(out, full[lo:hi]) * ((hi - lo) / B)
        loss.backward()
        total = total + loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def floor_step(model: nn.Module, ids: Tensor, corrupted: Tensor, full: Tensor,
               micro_batch: Optional[int] = None) -> Tensor:
    """The floor: a corrupted forward plus a clean forward and backward (to the
    input embeddings) of the unpatched model, in the same micro-batches."""
    B = ids.shape[0]
    micro = micro_batch or B
    embed = model.get_input_embeddings()
    total = torch.zeros((), device=ids.device)
    for lo in range(0, B, micro):
        hi = min(B, lo + micro)
        with torch.no_grad():
            model(input_ids=corrupted[lo:hi])
        x = embed(ids[lo:hi]).detach().requires_grad_(True)
        logits = model(inputs_embeds=x).logits[:, -1].float()
        lp = F.log_softmax(logits, dim=-1)
        kl = (full[lo:hi].exp() * (full[lo:hi] - lp)).sum(-1).mean() * ((hi - lo) / B)
        kl.backward()
        total = total + kl.detach()
    return total


def step_fn(kind: str, model: nn.Module, ids: Tensor, corrupted: Tensor, full: Tensor,
            micro_batch: Optional[int] = None, recompute_readers: bool = True) -> tuple[Callable, nn.Module]:
    """A closure running one step of `kind` ("fastedge", "naive" or "floor")
    and the masked model it trains (None for the floor). fastedge and naive
    start from the same masks."""
    import fastedge
    from naive_model import NaiveEdgeModel

    if kind == "floor":
        return (lambda: floor_step(model, ids, corrupted, full, micro_batch)), None
    em = fastedge.patch(model, node_masks=False, recompute_readers=recompute_readers)
    if kind == "fastedge":
        masked = em
    elif kind == "naive":
        masked = NaiveEdgeModel(model)
        masked.copy_masks_from(em)
        em.unpatch()
    else:
        raise ValueError(f"unknown step kind {kind!r}: use fastedge, naive or floor")
    masked.train()
    opt = make_optimizer(masked)
    return (lambda: pruning_step(masked, opt, ids, corrupted, full, micro_batch)), masked
