"""A small `TracrForCausalLM` with hand-placed weight supports, for testing
`fastedge.tracr.spaces` where Tracr's own programs are too regular: nonzero
biases everywhere, a query direction no key direction meets, a score read
only against dimensions nobody upstream writes, a key read that only the
query bias brings, a value direction the output projection kills, a dead
MLP unit. Values are small nonzero integers (seeded) at the placed
positions, so products of weights are exact and what the construction says
is read is read.

Residual dimensions (D = 12): tok_embeds writes 0-2, pos_embeds 3-4;
a0.h0 writes 5, 6; a0.h1 writes 7; m0 writes 8; a1.h0 writes 9, a1.h1 10;
m1 writes 11. Head coordinates (d = 4) are c0..c3.
"""
from __future__ import annotations

import torch

from fastedge.tracr.convert import TracrModel
from fastedge.tracr.modeling import TracrConfig, TracrForCausalLM

D, H, d, HIDDEN = 12, 2, 4, 6
VOCAB = ["BOS", "a", "b", "c", "d"]

# layer 0, head 0: the hand-derived read sets (see `build`)
EXPECTED_A0H0 = {"q": [0, 2], "k": [0, 2, 4, 9], "v": [0, 4]}
EXPECTED_M0 = [0, 5, 6, 7]


def _values(gen, n):
    v = torch.randint(1, 3, (n,), generator=gen).double()
    return v * (torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1)   # +-1, +-2


def _place(gen, shape, entries):
    """A zero matrix with random nonzero integers at `entries` [(row, col)]."""
    m = torch.zeros(shape, dtype=torch.float64)
    vals = _values(gen, len(entries))
    for (i, j), v in zip(entries, vals):
        m[i, j] = v
    return m


def _dense(rows, cols):
    return [(r, c) for r in rows for c in cols]


def build(seed: int = 0) -> TracrModel:
    gen = torch.Generator().manual_seed(seed)
    cfg = TracrConfig(vocab_size=len(VOCAB), n_positions=4, hidden_size=D, num_hidden_layers=2,
                      num_attention_heads=H, head_dim=d, intermediate_size=HIDDEN, output_size=3,
                      input_vocab=VOCAB, output_vocab=[0, 1, 2], bos_token="BOS", max_seq_len=3,
                      program_name="synthetic")
    model = TracrForCausalLM(cfg).double()
    sd = {}
    sd["transformer.wte.weight"] = _place(gen, (len(VOCAB), D), _dense(range(len(VOCAB)), [0, 1, 2]))
    sd["transformer.wpe.weight"] = _place(gen, (4, D), _dense(range(4), [3, 4]))

    # per head: W_Q, W_K, W_V as [D, d] (x @ W), W_O as [d, D]
    heads = {
        (0, 0): dict(
            # q: dim 0 -> c1; dim 1 -> c3 (no key has c3: invisible); dim 3 -> c2 (only key dim 9
            # has c2, and nothing before layer 0 writes 9); dim 2 -> c1, c2
            q=[(0, 1), (1, 3), (3, 2), (2, 1), (2, 2)],
            # k: dim 0 -> c1; dim 4 -> c0 (no query has c0: read only through b_Q[c0]);
            # dim 9 -> c2; dim 2 -> c1
            k=[(0, 1), (4, 0), (9, 2), (2, 1)],
            # v: dim 0 -> c0, dim 3 -> c3 (W_O's c3 row is zero: killed), dim 4 -> c1
            v=[(0, 0), (3, 3), (4, 1)],
            o=[(0, 5), (1, 6), (2, 5), (2, 6)],
            bq=[0, 3]),
        (0, 1): dict(q=_dense([0, 3], range(d)), k=_dense([1, 4], range(d)),
                     v=_dense([2], range(d)), o=_dense(range(d), [7]), bq=list(range(d))),
        (1, 0): dict(q=_dense([5, 8], range(d)), k=_dense([6, 7, 11], range(d)),
                     v=_dense([8], range(d)), o=_dense(range(d), [9]), bq=[1]),
        (1, 1): dict(q=_dense([1], range(d)), k=_dense([2], range(d)),
                     v=_dense([0, 1], range(d)), o=_dense(range(d), [10]), bq=[]),
    }
    for layer in range(2):
        p = f"transformer.h.{layer}."
        wq, wk, wv, wo, bq = [], [], [], [], []
        for h in range(H):
            spec = heads[(layer, h)]
            wq.append(_place(gen, (D, d), spec["q"]))
            wk.append(_place(gen, (D, d), spec["k"]))
            wv.append(_place(gen, (D, d), spec["v"]))
            wo.append(_place(gen, (d, D), spec["o"]))
            bq.append(_place(gen, (1, d), [(0, c) for c in spec["bq"]])[0])
        # PyTorch layouts: q_proj.weight [H*d, D] (head-major), o_proj.weight [D, H*d]
        sd[p + "self_attn.q_proj.weight"] = torch.cat([w.t() for w in wq])
        sd[p + "self_attn.k_proj.weight"] = torch.cat([w.t() for w in wk])
        sd[p + "self_attn.v_proj.weight"] = torch.cat([w.t() for w in wv])
        sd[p + "self_attn.o_proj.weight"] = torch.cat(wo).t()
        sd[p + "self_attn.q_proj.bias"] = torch.cat(bq)
        # key and value biases read nothing (a query-only score term; a constant output)
        sd[p + "self_attn.k_proj.bias"] = _values(gen, H * d)
        sd[p + "self_attn.v_proj.bias"] = _values(gen, H * d)
        # the output bias on a dimension the layer's heads write anyway
        sd[p + "self_attn.o_proj.bias"] = _place(gen, (1, D), [(0, 5 if layer == 0 else 9)])[0]

    # m0: unit 0 reads 0, 5; unit 1 reads 6, 7; unit 2 reads 3 but nothing reads it out (dead);
    # unit 3 has only a bias. m0 writes 8.
    sd["transformer.h.0.mlp.fc1.weight"] = _place(gen, (HIDDEN, D), [(0, 0), (0, 5), (1, 6), (1, 7), (2, 3)])
    sd["transformer.h.0.mlp.fc1.bias"] = _place(gen, (1, HIDDEN), [(0, 0), (0, 2), (0, 3)])[0]
    sd["transformer.h.0.mlp.fc2.weight"] = _place(gen, (D, HIDDEN), [(8, 0), (8, 1), (8, 3)])
    sd["transformer.h.0.mlp.fc2.bias"] = torch.zeros(D, dtype=torch.float64)
    # m1: unit 0 reads 9, 10; unit 1 reads 8; writes 11
    sd["transformer.h.1.mlp.fc1.weight"] = _place(gen, (HIDDEN, D), [(0, 9), (0, 10), (1, 8)])
    sd["transformer.h.1.mlp.fc1.bias"] = _values(gen, HIDDEN)
    sd["transformer.h.1.mlp.fc2.weight"] = _place(gen, (D, HIDDEN), [(11, 0), (11, 1)])
    sd["transformer.h.1.mlp.fc2.bias"] = _place(gen, (1, D), [(0, 11)])[0]
    sd["lm_head.weight"] = _place(gen, (3, D), _dense(range(3), [9, 11]))
    model.load_state_dict(sd, strict=True)
    model.eval()
    return TracrModel(model=model, name="synthetic")
