"""An independent check of `fastedge.tracr.spaces`: read and write spaces found
by perturbation instead of from weight supports.

Everything runs the model's own modules (`nn.Embedding`, the projections,
`softmax`, the MLP) in float64 on random inputs: a writer writes dimension
``i`` when its output is ever nonzero there; a reader reads dimension ``i``
(or a writer's dimensions) when adding a random vector there changes what
the reader computes: the attention *probabilities* for q and k readers (so
whatever the softmax ignores is not counted), the head's output for a v
reader, the MLP's output, the logits. A change counts when it exceeds
`RELATIVE` times the size of the outputs: rounding moves them by ~1e-16, a
real read by O(0.1).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

RELATIVE = 1e-9
_TRIALS = 3
_ROWS = 8


class Probe:
    def __init__(self, model, seed: int = 0):
        self.model = copy.deepcopy(model).to(torch.float64).eval()
        cfg = self.model.config
        self.D, self.H, self.d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.gen = torch.Generator().manual_seed(seed)

    # random data ---------------------------------------------------------------
    def _randn(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale

    def _on(self, dims, rows, scale=1.0):
        """[rows, D] random, zero outside `dims`."""
        x = torch.zeros(rows, self.D, dtype=torch.float64)
        dims = torch.as_tensor(np.asarray(dims), dtype=torch.long)
        x[:, dims] = self._randn(rows, len(dims), scale=scale)
        return x

    # pieces of the model, run through its modules ------------------------------------
    def _head_out(self, layer, h, weights, xv):
        """Head h's output ``weights @ v_h`` through o_proj, other heads zeroed."""
        att = self.model.transformer.h[layer].self_attn
        v = att.v_proj(xv).view(-1, self.H, self.d)[:, h]
        inner = torch.zeros(weights.shape[0], self.H, self.d, dtype=torch.float64)
        inner[:, h] = weights @ v
        return att.o_proj(inner.reshape(weights.shape[0], -1))

    def _probs(self, layer, h, xq, xk):
        att = self.model.transformer.h[layer].self_attn
        q = att.q_proj(xq).view(-1, self.H, self.d)[:, h]
        k = att.k_proj(xk).view(-1, self.H, self.d)[:, h]
        return (q @ k.t() / self.d ** 0.5).softmax(-1)

    @staticmethod
    def _changed(a, b) -> bool:
        size = a.abs().max() + b.abs().max()
        return bool((a - b).abs().max() > RELATIVE * size)

    # writes ------------------------------------------------------------------
    def write_dims(self) -> dict:
        t = self.model.transformer
        ids = torch.arange(t.wte.num_embeddings)
        pos = torch.arange(t.wpe.num_embeddings)
        out = {"tok_embeds": t.wte(ids), "pos_embeds": t.wpe(pos)}
        with torch.no_grad():
            for layer, block in enumerate(t.h):
                for h in range(self.H):
                    ys = []
                    for _ in range(_TRIALS):
                        w = self._randn(_ROWS, _ROWS).softmax(-1)
                        ys.append(self._head_out(layer, h, w, self._randn(_ROWS, self.D)))
                    out[f"a{layer}.h{h}"] = torch.cat(ys)
                # large inputs: each ReLU unit is on for about half the rows
                out[f"m{layer}"] = block.mlp(self._randn(64 * _TRIALS, self.D, scale=1e3))
        return {k: np.flatnonzero((v.detach() != 0).any(0).numpy()) for k, v in out.items()}

    # reads ---------------------------------------------------------------------
    @torch.no_grad()
    def reads(self, layer, reader: str, dims, upstream) -> bool:
        """Whether adding random values on `dims` changes what `reader`
        computes, other inputs random (the other side of an attention score
        on the `upstream` dimensions, the dimensions writers before the
        layer write)."""
        dims = np.asarray(dims)
        if dims.size == 0:
            return False
        for _ in range(_TRIALS):
            if reader == "resid_post":
                x = self._randn(_ROWS, self.D)
                f = self.model.lm_head
                if self._changed(f(x), f(x + self._on(dims, _ROWS))):
                    return True
            elif reader.startswith("m"):
                x = self._randn(_ROWS * 8, self.D, scale=1e3)
                f = self.model.transformer.h[layer].mlp
                if self._changed(f(x), f(x + self._on(dims, _ROWS * 8, scale=1e3))):
                    return True
            else:
                h, side = int(reader.split(".")[1][1:]), reader.rsplit(".", 1)[1]
                if side == "v":
                    w = self._randn(_ROWS, _ROWS).softmax(-1)
                    x = self._randn(_ROWS, self.D)
                    delta = self._on(dims, _ROWS)
                    if self._changed(self._head_out(layer, h, w, x), self._head_out(layer, h, w, x + delta)):
                        return True
                    continue
                xq, xk = self._on(upstream, _ROWS), self._on(upstream, _ROWS)
                # scale so that scores are O(1): a saturated softmax hides changes
                scale = self._probe_scale(layer, h, xq, xk)
                xq, xk = xq * scale, xk * scale
                delta = self._on(dims, _ROWS, scale=scale)
                before = self._probs(layer, h, xq, xk)
                after = (self._probs(layer, h, xq + delta, xk) if side == "q"
                         else self._probs(layer, h, xq, xk + delta))
                if self._changed(before, after):
                    return True
        return False

    def _probe_scale(self, layer, h, xq, xk) -> float:
        att = self.model.transformer.h[layer].self_attn
        q = att.q_proj(xq).view(-1, self.H, self.d)[:, h]
        k = att.k_proj(xk).view(-1, self.H, self.d)[:, h]
        s = float((q @ k.t()).abs().max())
        return 1.0 if s == 0 else min(1.0, s ** -0.5)

    def read_dims(self, graph, writes: dict) -> dict:
        """Per reader, the dimensions that one at a time change it."""
        out = {}
        for reader in graph.readers:
            layer = None if reader == "resid_post" else int(reader.split(".")[0][1:])
            upstream = self._upstream(graph, reader, writes)
            out[reader] = np.array([i for i in range(self.D) if self.reads(layer, reader, [i], upstream)],
                                   dtype=np.int64)
        return out

    def edges(self, graph, writes: dict) -> set:
        """The graph edges along which a random vector on the writer's
        dimensions changes the reader."""
        found = set()
        for w, r in graph.edges():
            layer = None if r == "resid_post" else int(r.split(".")[0][1:])
            if self.reads(layer, r, writes[w], self._upstream(graph, r, writes)):
                found.add((w, r))
        return found

    @staticmethod
    def _upstream(graph, reader, writes):
        """The dimensions written by the writers before the reader's layer."""
        if reader == "resid_post":
            return np.arange(0)   # unused
        layer = int(reader.split(".")[0][1:])
        prefix = graph.groups[2 * layer].n_writers    # the attention readers' prefix
        dims = [writes[w] for w in graph.writers[:prefix]]
        return np.unique(np.concatenate(dims)) if dims else np.arange(0)
