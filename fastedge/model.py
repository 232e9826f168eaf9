"""An edge-prunable view of a Hugging Face causal LM (docs/CONCEPTS.md sections 1, 2 and 5).

`patch(model)` returns an `EdgeModel` that reuses the model's parameters (no
copies, the model frozen) and runs it as a graph of writers and readers:

* every writer's output enters one preallocated stack as a *delta*
  ``y_w - y~_w`` (clean minus corrupted), written in place as layers run;
* every reader group reads its prefix of the stack through the fused ops:
  ``in_r = base_r + sum_w z_wr * s_w * (y_w - y~_w)`` where ``base_r`` is the
  corrupted run's residual stream at the reader's place;
* the corrupted run runs layer by layer beside the clean one, under no_grad:
  only the current layer's corrupted outputs and the corrupted residual live
  at a time.

Autograd and the in-place stack
-------------------------------
The stack is an ordinary tensor outside autograd. Writers put their rows in
with `_StackWrite`, whose backward hands each writer the gradient of its
rows from one gradient buffer; readers call the fused op with
``grad_stack=buffer`` so that their backward *accumulates* into that buffer
(and the op keeps its prefix without autograd's version check: rows beyond
the prefix are written later, rows inside it never change; see
`fastedge.ops.masked_sum`).

A writer's rows must have received the gradients of *every* reader that read
them before the writer's backward reads the buffer. That ordering is made
explicit with a token: a 0-dim tensor threaded through the writes in order
(each `_StackWrite` consumes the previous token and returns the next) and
mixed into each reader's ``log_alpha`` as ``torch.add(log_alpha, token,
alpha=0)`` (``log_alpha + 0 * token`` in one op; the token is always 0, so
the values are unchanged). The engine runs a node's backward only after
every consumer of its outputs has run, so write k's backward waits for all
readers that consumed token k or a later token, which are exactly the
readers that could read its rows.

Memory (measured by bench/memory.py on fake tensors)
----------------------------------------------------
A training step peaks early in the backward, in the last layer's attention
readers: the whole stack and the whole gradient buffer are alive then (the
final reader reads every writer and sends gradient to every row), so
releasing rows of the buffer as the backward passes writers, or the stack
earlier, would not lower the peak. Besides the weights, the peak holds those
two and one layer's reader region; at CodeLlama-13B shape (bf16) that is,
per token of a micro-batch, 16.8 MB of stack, 16.8 MB of buffer and about
5 MB of the layer, with ``recompute_readers=True`` (38 MB per token in all:
a micro-batch of 17 sequences of 72 tokens fits an 80 GB card with 1.5 GiB
+ 5% to spare; the paper's micro-batches of 8 take 49 GB, on an H200 too).
Without recomputation each layer's reader inputs ([R + 1, B, S, D]) stay
alive until its backward (91 MB per token in all). What keeps the layer's
part small:

* ``lean_norm=True`` (default): the norm a layer's readers apply (a copy per
  reader, [R, B, S, D]) runs a chunk of rows at a time (`NORM_CHUNK_ELEMENTS`)
  and keeps only its input for the backward, which recomputes it chunk by
  chunk (`_RowChunked`). Hugging Face's RMSNorm otherwise keeps a float32
  copy of its input and its backward makes four more float32 tensors of
  that size: 11 MB per token at 13B shape. Same values and gradients (each
  row by the same ops); the cost is one more norm forward per backward.
* ``fused_norm``: where the Triton kernels run (a CUDA device; by default,
  ``"auto"``) and the layer's norm is one the adapter recognises (its
  `NormSpec`: Hugging Face's RMSNorm, or `nn.LayerNorm`), the readers' norm
  is one fused kernel forward and one backward (`fastedge.ops.fused_norm`),
  also saving only x, with Hugging Face's roundings. In bf16 it moves 4
  bytes per element forward and 6 backward (14 a step with
  ``recompute_readers``), where the module's float32 chain moves about 40
  forward and 120 in the backward's recompute and autograd (204 a step:
  bench/roofline.py at CodeLlama-13B shape). Elsewhere (the CPU, float64,
  an unrecognised norm) the module runs as above. ``"off"``: always the module; ``"triton"`` / ``"torch"``:
  the fused op on that backend whenever the norm is recognised (tests force
  it this way, or with FASTEDGE_FUSED_NORM).
* The attention readers' inputs are split, not sliced (a split's backward is
  one concatenation, a slice's a zero-padded copy of the whole input), and
  the MLP's share of the layer's read leaves the attention region as a copy:
  a view would keep the whole [R + 1, B, S, D] read of every layer alive
  until the MLP's backward, since a region's inputs are kept.
* The backward releases the stack and the buffer once it has used them
  (`_StackWrite` and the masked-sum ops drop their references): a finished
  micro-batch's graph stays alive as long as its output is referenced (in a
  gradient-accumulation loop, until the next micro-batch's forward returns)
  and must not hold them while the next micro-batch allocates its own. A
  forward's graph supports one backward: a second one, even with
  ``retain_graph=True``, raises (it would add the readers' gradients into
  the buffer twice).
* ``grad_buffer_dtype``: the buffer is kept in the stack's dtype by default
  (bf16 for a bf16 model). Each reader group's backward adds its
  fp32-accumulated share into it, up to 2L + 1 times per row, rounding each
  time. Against float64, the mask gradients of a 40-layer bf16 Llama
  (hidden 128; bench/memory.py --grad-precision) have 1.65% error with a
  bf16 buffer, 1.50% with a float32 one and 1.48% in the authors' design
  (bf16 throughout): the bf16 forward dominates, and the buffer's rounding
  adds a tenth to it. ``grad_buffer_dtype=torch.float32`` removes that
  share at twice the buffer's bytes (one more bf16 stack's worth: at 13B
  shape, the largest micro-batch at seq 72 on an 80 GB card drops from 17
  to 11).
"""
from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from fastedge import ops
from fastedge.adapters import Adapter
from fastedge.graph import EdgeGraph, ReaderGroup
from fastedge.sharding import PLAIN

ABLATIONS = ("interchange", "zero", "mean")


class UnpatchedError(RuntimeError):
    """An `EdgeModel` was used after `EdgeModel.unpatch` gave its model back."""


@dataclass
class _PatchRecord:
    """What patching changed on one model, shared by every live `EdgeModel` of
    it: the original requires_grad flags and mode (taken at the first patch,
    never from a model another patch froze) and the EdgeModels still patched."""
    flags: dict
    was_training: bool
    live: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)


# model -> its _PatchRecord while some EdgeModel of it is patched (weak keys: a
# dropped model takes its record with it; nothing is stored on the model itself)
_PATCHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class EdgeModelOutput:
    logits: Tensor                 # [B, S, vocab]
    edge_mask_sum: Tensor          # sum of the edge masks used (sampled or fixed), 0-dim fp32
    n_edges: int
    node_mask_sum: Optional[Tensor] = None  # sum of node masks, when node masks are on
    n_nodes: int = 0
    # the run's writer stack (y_w - y~_w of every writer, [n_writers, B, S, D]), when asked
    # for with `EdgeModel.writer_deltas` (attribution pins it: `_Pin`)
    writer_deltas: Optional[Tensor] = None

    @property
    def edge_sparsity(self) -> Tensor:
        """``1 - sum(z) / n_edges`` (differentiable in the edge log_alphas)."""
        return 1 - self.edge_mask_sum / self.n_edges

    @property
    def node_sparsity(self) -> Optional[Tensor]:
        if self.node_mask_sum is None:
            return None
        return 1 - self.node_mask_sum / self.n_nodes


class _StackWrite(torch.autograd.Function):
    """Write `delta` into rows [start, start + n) of `stack` in place; the
    backward reads those rows of the gradient buffer. Threads the order token."""

    @staticmethod
    def forward(ctx, token, delta, stack, grad_buffer, start):
        stack[start:start + delta.shape[0]].copy_(delta)
        ctx.grad_buffer, ctx.start, ctx.n, ctx.dtype = grad_buffer, start, delta.shape[0], delta.dtype
        return token.clone()

    @staticmethod
    def backward(ctx, dtoken):
        if ctx.grad_buffer is None:
            raise RuntimeError("Trying to backward through an EdgeModel forward a second time: its "
                               "gradient buffer is released after the first backward (a second "
                               "backward, even with retain_graph=True, would add the readers' "
                               "gradients into it twice); run the forward again")
        rows = ctx.grad_buffer[ctx.start:ctx.start + ctx.n]
        # released even under retain_graph=True: a second backward would add
        # every reader's gradient into the same buffer again
        ctx.grad_buffer = None  # a finished graph kept alive (its output held) must not keep the buffer
        return dtoken, rows.to(ctx.dtype), None, None, None


NORM_CHUNK_ELEMENTS = 1 << 25  # rows per chunk of the lean reader norm: about this many elements
FUSED_NORM_MODES = ("auto", "off", "triton", "torch")


class _RowChunked(torch.autograd.Function):
    """``fn(x)`` for a row-wise ``fn`` (a norm: it acts on the last dimension
    only), computed a chunk of rows at a time and saving only ``x``: the
    backward recomputes ``fn`` chunk by chunk under autograd and takes its
    vector-Jacobian product there. Same values and gradients as ``fn(x)``
    (each row is computed by the same ops); the float32 temporaries of a
    norm (Hugging Face's RMSNorm keeps a float32 copy of its input, and its
    backward makes several more) exist for one chunk at a time instead of for
    all ``R x B x S`` rows of a layer's readers."""

    @staticmethod
    def forward(ctx, x, fn, chunk_elements):
        ctx.fn = fn
        width = x.shape[-1]
        ctx.chunk_rows = max(1, chunk_elements // max(1, width))
        rows = x.reshape(-1, width)
        out = None
        for lo in range(0, rows.shape[0], ctx.chunk_rows):
            y = fn(rows[lo:lo + ctx.chunk_rows])
            if out is None:
                out = y.new_empty((rows.shape[0],) + tuple(y.shape[1:]))
            out[lo:lo + y.shape[0]] = y
        ctx.save_for_backward(x)
        return out.view(tuple(x.shape[:-1]) + tuple(out.shape[1:]))

    @staticmethod
    def backward(ctx, dout):
        x, = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        drows = dout.reshape(rows.shape[0], -1)
        dx = torch.empty_like(rows)
        for lo in range(0, rows.shape[0], ctx.chunk_rows):
            with torch.enable_grad():
                xc = rows[lo:lo + ctx.chunk_rows].detach().requires_grad_(True)
                yc = ctx.fn(xc)
            dx[lo:lo + xc.shape[0]], = torch.autograd.grad(yc, xc, drows[lo:lo + xc.shape[0]])
        return dx.view(x.shape), None, None


def _fused_norm_mode(mode: Optional[str]) -> Optional[str]:
    """`fused_norm` as given; None reads FASTEDGE_FUSED_NORM when the norm
    runs (unset: "auto"), so that tests can force it without an argument."""
    if mode is None:
        env = os.environ.get("FASTEDGE_FUSED_NORM", "").strip().lower()
        if not env:
            return None
        mode, where = env, "FASTEDGE_FUSED_NORM"
    else:
        where = "fused_norm"
    if mode not in FUSED_NORM_MODES:
        raise ValueError(f"{where} must be one of {', '.join(FUSED_NORM_MODES)}, got {mode!r}")
    return mode


def position_ids_from_attention_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip padding: ``cumsum(mask) - 1``, 0 at pads."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _Pin:
    """A run whose writer deltas are given instead of computed (attribution:
    `fastedge.attribution`, EAP-IG).

    The stack holds ``deltas`` (``y_w - y~_w`` of a clean and an ablated run,
    [n_writers, B, S, D]) whatever this run's own writers output, while each
    reader still reads this run's residual stream: writer ``w``'s ablated
    value is taken as ``y~'_w = y_w - deltas_w`` (``y_w`` this run's output,
    no gradient), so that with every mask 1 the reader's input
    ``sum_w y~'_w + sum_w deltas_w`` is this run's residual stream, the
    gradient reaches ``y_w`` through the stack rows (``deltas_w + (y_w -
    y_w.detach())``: the value ``deltas_w`` exactly, the derivative 1), and
    the gradient of edge mask ``z[r, w]`` is ``deltas_w . d metric / d in_r``:
    the fixed clean-minus-ablated difference against this run's gradient.

    ``patch = (lo, hi, alpha)``: writers ``[lo, hi)`` (one group: the
    embeddings, a layer's heads, or an MLP) output the interpolation
    ``y~_w + alpha * deltas_w = y_w - (1 - alpha) * deltas_w`` instead, as
    constants (no gradient flows into them), where ``y_w`` is this run's
    output (equal to the clean run's wherever nothing upstream is patched)."""

    def __init__(self, deltas: Tensor, patch: Optional[tuple] = None):
        self.deltas, self.patch = deltas, patch

    def output(self, start: int, y: Tensor) -> Tensor:
        """Writers ``[start, start + len(y))``'s outputs, patched where asked."""
        if self.patch is None:
            return y
        lo, hi, alpha = self.patch
        stop = start + y.shape[0]
        if stop <= lo or start >= hi:
            return y
        if start < lo or stop > hi:
            raise AssertionError(f"a patch covers whole writer groups: [{lo}, {hi}) vs [{start}, {stop})")
        return (y - (1 - alpha) * self.deltas[start:stop]).detach()

    def ablated(self, start: int, y: Tensor) -> Tensor:
        return y.detach() - self.deltas[start:start + y.shape[0]]

    def delta(self, start: int, y: Tensor) -> Tensor:
        return self.deltas[start:start + y.shape[0]] + (y - y.detach())


class EdgeModel(nn.Module):
    """A patched model. Its parameters are the mask `log_alpha`s only; the
    wrapped model stays frozen and is reached through `.model`."""

    # what the layer loop calls around each unit's weights (fastedge.sharding:
    # FSDP2 unshards and reshards there; PLAIN does nothing)
    _weights = PLAIN

    def __init__(self, model: nn.Module, *, ablation: str = "interchange", node_masks: bool = True,
                 seed: int = 0, recompute_readers: bool = False,
                 generator: Optional[torch.Generator] = None,
                 grad_buffer_dtype: Optional[torch.dtype] = None, lean_norm: bool = True,
                 precision: str = "full", fused_norm: Optional[str] = None):
        super().__init__()
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
        adapter = Adapter(model)
        object.__setattr__(self, "model", model)  # not a submodule: its weights are not ours
        object.__setattr__(self, "adapter", adapter)
        self.graph = EdgeGraph.from_config(model.config)
        for attn, mlp in zip(self.graph.groups[0:-1:2], self.graph.groups[1:-1:2]):
            # `_Run.read_layer` reads the MLP reader in the attention group's call
            if mlp.first_reader != attn.first_reader + attn.n_readers or mlp.n_writers < attn.n_writers:
                raise AssertionError(f"graph layout: the MLP reader of group {mlp.index} does not follow "
                                     f"its attention group")
        self.ablation = ablation
        self.recompute_readers = recompute_readers
        if grad_buffer_dtype not in (None, torch.float32):
            raise ValueError(f"grad_buffer_dtype must be None (the stack's dtype) or torch.float32, "
                             f"got {grad_buffer_dtype}")
        self.grad_buffer_dtype = grad_buffer_dtype
        self.lean_norm = bool(lean_norm)
        if precision not in ops.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(map(repr, ops.PRECISIONS))}, "
                             f"got {precision!r}")
        self.precision = precision
        self.fused_norm = _fused_norm_mode(fused_norm)
        # Patching the same model again shares the first patch's record of the
        # original flags, so no unpatch can "restore" another patch's frozen state.
        record = _PATCHES.get(model)
        if record is None:
            record = _PatchRecord({name: p.requires_grad for name, p in model.named_parameters()},
                                  model.training)
            _PATCHES[model] = record
        record.live.add(self)
        object.__setattr__(self, "_patch_record", record)
        self._unpatched = False
        model.requires_grad_(False)
        model.eval()
        weight = adapter.token_embedding.weight
        # masks and their arithmetic stay fp32 (float64 for a float64 model, as in the tests)
        self.mask_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        init = dict(generator=generator, device=weight.device, dtype=self.mask_dtype)
        self.edge_log_alpha = nn.ParameterList(
            [nn.Parameter(ops.init_log_alpha(g.n_readers, g.n_writers, **init)) for g in self.graph.groups])
        self.node_log_alpha = (nn.Parameter(ops.init_log_alpha(self.graph.n_writers, **init))
                               if node_masks else None)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        if int(seed) < 0:  # the noise seeds derived from it must be non-negative
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.seed = int(seed)
        self._fixed_masks: Optional[list[Tensor]] = None
        self._mean_outputs: Optional[Tensor] = None

    # -- masks ---------------------------------------------------------------------

    def mask_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def reset_masks(self, generator: Optional[torch.Generator] = None,
                    mean: float = ops.constants.INIT_MEAN) -> None:
        """Back to the initial state: log_alpha ~ N(10, 0.01) (or N(mean, 0.01)),
        no fixed circuit."""
        self._fixed_masks = None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(ops.init_log_alpha(*p.shape, generator=generator, device=p.device, dtype=p.dtype,
                                           mean=mean))

    def set_circuit(self, edges: Iterable[tuple[str, str]], nodes: Optional[Iterable[str]] = None) -> None:
        """Fix the masks to a circuit: the listed (writer, reader) edges at 1,
        every other edge at 0; with `nodes`, only those writers are kept.
        Something other than a list of (writer, reader) pairs of names (a
        3-tuple, a bare string) is refused with a ValueError; an unknown name
        or a pair that is not an edge with a KeyError."""
        from fastedge.graph import edge_pair
        g = self.graph
        if isinstance(edges, str):
            raise ValueError(f"edges must be a list of (writer, reader) pairs, got the string {edges!r}")
        if isinstance(nodes, str):
            raise ValueError(f"nodes must be a list of writer names, got the string {nodes!r}")
        edges = [edge_pair(item, i) for i, item in enumerate(edges)]  # before anything changes
        device = self.edge_log_alpha[0].device
        fixed = [torch.zeros(gr.n_readers, gr.n_writers, device=device, dtype=self.mask_dtype)
                 for gr in g.groups]
        group_of_reader = {}
        for gi, gr in enumerate(g.groups):
            for r in gr.readers:
                group_of_reader[r] = (gi, r - gr.first_reader)
        for writer, reader in edges:
            g.edge_index(writer, reader)  # raises on an unknown name or a pair that is not an edge
            gi, row = group_of_reader[g.reader_index[reader]]
            fixed[gi][row, g.writer_index[writer]] = 1.0
        if nodes is not None:
            keep = torch.zeros(g.n_writers, device=device, dtype=self.mask_dtype)
            for name in nodes:
                if not isinstance(name, str) or name not in g.writer_index:
                    raise KeyError(f"unknown writer {name!r} in nodes")
                keep[g.writer_index[name]] = 1.0
            fixed = [m * keep[: m.shape[1]] for m in fixed]
        self._fixed_masks = fixed

    @property
    def _fixed_masks(self) -> Optional[list[Tensor]]:
        """The fixed circuit's masks per group (None: masks are sampled)."""
        return self._circuit[0]

    @_fixed_masks.setter
    def _fixed_masks(self, masks: Optional[list[Tensor]]) -> None:
        # with the edge-mask sum of every forward under them (constants): made
        # once here instead of from each read's masks in every forward
        total = None if masks is None else torch.stack([m.sum() for m in masks]).sum()
        self._circuit = (masks, total)

    @property
    def circuit_fixed(self) -> bool:
        return self._fixed_masks is not None

    # -- attribution (fastedge.attribution) ----------------------------------------------

    def unit_masks(self) -> list[Tensor]:
        """Fix every edge mask at 1 as leaf tensors that require grad (one
        ``[R_g, W_g]`` per reader group, the mask dtype) and return them: a
        backward then leaves in each ``.grad`` the derivative of the output in
        every edge mask at all-ones, ``(y_w - y~_w) . d out / d in_r`` (the
        EAP score), accumulated over backwards. Node masks play no part.
        `reset_masks` or `set_circuit` undoes it."""
        device = self.edge_log_alpha[0].device
        masks = [torch.ones(g.n_readers, g.n_writers, device=device, dtype=self.mask_dtype,
                            requires_grad=True) for g in self.graph.groups]
        self._fixed_masks = masks
        return masks

    def writer_deltas(self, input_ids: Tensor, corrupted_input_ids: Optional[Tensor] = None,
                      attention_mask: Optional[Tensor] = None) -> EdgeModelOutput:
        """A forward without gradients whose output also carries the run's
        writer stack (``writer_deltas``: ``y_w - y~_w`` of every writer,
        ``[n_writers, B, S, D]``) under the model's masks as they stand."""
        with torch.no_grad():
            return self.forward(input_ids, corrupted_input_ids, attention_mask, seed=0, keep_stack=True)

    def pinned_forward(self, input_ids: Tensor, deltas: Tensor, attention_mask: Optional[Tensor] = None,
                       patch: Optional[tuple] = None) -> EdgeModelOutput:
        """A forward on `input_ids` whose stack holds `deltas` (`_Pin`): with
        `unit_masks`, its backward gives ``deltas_w . d out / d in_r`` at this
        run's point; ``patch = (lo, hi, alpha)`` interpolates writers
        ``[lo, hi)`` between their ablated (0) and clean (1) outputs."""
        self._check_patched()
        B, S = input_ids.shape
        expect = (self.graph.n_writers, B, S, self.adapter.hidden_size)
        if tuple(deltas.shape) != expect:
            raise ValueError(f"deltas must be [n_writers, B, S, hidden] = {list(expect)}, got {list(deltas.shape)}")
        return self._run(input_ids, None, attention_mask, pin=_Pin(deltas, patch))

    # -- mean ablation -----------------------------------------------------------------

    @torch.no_grad()
    def compute_mean_outputs(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Each writer's output averaged over a reference batch, per position
        ([n_writers, S, D]); used by ``ablation="mean"``."""
        self._check_patched()
        writer_outputs = self._run(input_ids, None, attention_mask, collect_writers=True)
        if attention_mask is None:
            means = writer_outputs.mean(dim=1)
        else:
            weight = attention_mask.to(writer_outputs.dtype)[None, :, :, None]
            means = (writer_outputs * weight).sum(1) / weight.sum(1).clamp(min=1)
        self._mean_outputs = means
        return means

    # -- forward -----------------------------------------------------------------------

    def forward(self, input_ids: Tensor, corrupted_input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, seed: Optional[int] = None,
                keep_stack: bool = False) -> EdgeModelOutput:
        self._check_patched()
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if self.ablation == "interchange":
            if corrupted_input_ids is None:
                raise ValueError("interchange ablation needs corrupted_input_ids")
            if corrupted_input_ids.shape != input_ids.shape:
                raise ValueError(f"corrupted_input_ids must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(corrupted_input_ids.shape)}")
        if self.ablation == "mean" and self._mean_outputs is None:
            raise ValueError("mean ablation needs compute_mean_outputs(reference_input_ids) first")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if seed is None:
            seed = self.seed * 1_000_003 + int(self.step)
            if self.training and torch.is_grad_enabled():
                self.step += 1
        return self._run(input_ids, corrupted_input_ids, attention_mask, seed=seed, keep_stack=keep_stack)

    def _run(self, input_ids, corrupted_input_ids, attention_mask, seed=0, collect_writers=False,
             keep_stack=False, pin: Optional[_Pin] = None):
        a, g = self.adapter, self.graph
        B, S = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = position_ids_from_attention_mask(attention_mask)
        masks_by_window = {}
        dtype = a.token_embedding.weight.dtype
        device = input_ids.device
        ablation = "zero" if collect_writers else "pinned" if pin is not None else self.ablation
        training_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

        run = _Run(self, seed, training_graph and not collect_writers, collect_writers)
        # (a pinned run's stack is its deltas: each write copies the same values in place)
        run.stack = (pin.deltas if pin is not None
                     else torch.empty((g.n_writers, B, S, a.hidden_size), dtype=dtype, device=device))
        run.grad_buffer = (torch.zeros_like(run.stack, dtype=self.grad_buffer_dtype or dtype)
                           if run.needs_grad else None)
        run.token = torch.zeros((), device=device, requires_grad=run.needs_grad)

        self._weights.enter(-1)  # the embedding (fastedge.sharding: units unsharded around their use)
        clean = a.embed(input_ids, positions)
        if ablation == "pinned":
            clean = [pin.output(w, y[None])[0] for w, y in enumerate(clean)]
            corrupted = [pin.ablated(w, y[None])[0] for w, y in enumerate(clean)]
        elif ablation == "interchange":
            corrupted = a.embed(corrupted_input_ids, positions)
        elif ablation == "zero":
            corrupted = [None] * len(clean)
        else:
            corrupted = [self._mean(w, S) for w in range(len(clean))]
        for w, (y, y_c) in enumerate(zip(clean, corrupted)):
            run.write(w, pin.delta(w, y[None]) if pin is not None else (y if y_c is None else y - y_c)[None])
        resid_c = _sum_or_none(corrupted)
        if ablation == "mean":
            resid_c = self._mean_prefix(0, len(clean), S)

        cos_sin = a.rotary_cos_sin(clean[0], positions)
        if cos_sin is not None:  # prepared once for every layer's heads
            cos_sin = Rotary.prepare(*cos_sin, a.head_dim)
        self._weights.leave(-1)
        for layer in range(len(a.blocks)):
            self._weights.enter(layer)
            window = a.sliding_window(layer)
            if window not in masks_by_window:
                masks_by_window[window] = _attention_mask(attention_mask, window, causal=a.causal)
            attn_bias = masks_by_window[window]
            attn_group, mlp_group = g.groups[2 * layer], g.groups[2 * layer + 1]
            first_head = attn_group.n_writers
            # corrupted layer, attention part
            heads_c = None
            if ablation == "interchange":
                with torch.no_grad():
                    x_c = a.attn_norm(layer, resid_c)[None]
                    heads_c = self._heads(layer, x_c.expand(a.n_heads, -1, -1, -1),
                                          x_c.expand(a.n_kv_heads, -1, -1, -1),
                                          x_c.expand(a.n_kv_heads, -1, -1, -1), cos_sin, attn_bias)
            elif ablation == "mean":
                heads_c = torch.stack([self._mean(first_head + h, S) for h in range(a.n_heads)])
            # clean heads from their readers; the same call reads the MLP's
            # share of the writers before the layer (see `_Run.read_layer`)
            heads, mlp_partial = run.region(self._attn_readers, layer, attn_group, mlp_group, resid_c,
                                            cos_sin, attn_bias)
            if pin is not None:
                heads = pin.output(first_head, heads)
                heads_c = pin.ablated(first_head, heads)
                run.write(first_head, pin.delta(first_head, heads))
            else:
                run.write(first_head, heads if heads_c is None else heads - heads_c)
            attn_c = None if heads_c is None else heads_c.sum(0)
            # the MLP: its partial sum, the corrupted attention output (part of
            # its base) and its reads of this layer's heads
            mlp_base = resid_c if a.parallel else _add(resid_c, attn_c)
            # (added here, outside the region: one input per region is kept for
            # the backward instead of two)
            y_mlp = run.region(self._mlp_reader, layer, attn_group, mlp_group,
                               mlp_partial if a.parallel else _add(mlp_partial, attn_c))
            mlp_writer = first_head + a.n_heads
            if ablation == "interchange":
                with torch.no_grad():
                    y_mlp_c = a.mlp(layer, a.mlp_norm(layer, mlp_base))
            elif ablation == "mean":
                y_mlp_c = self._mean(mlp_writer, S)
            elif pin is not None:
                y_mlp = pin.output(mlp_writer, y_mlp[None])[0]
                y_mlp_c = pin.ablated(mlp_writer, y_mlp[None])[0]
            else:
                y_mlp_c = None
            run.write(mlp_writer, pin.delta(mlp_writer, y_mlp[None]) if pin is not None
                      else (y_mlp if y_mlp_c is None else y_mlp - y_mlp_c)[None])
            resid_c = _add(_add(resid_c, attn_c), y_mlp_c)
            self._weights.leave(layer)
        if collect_writers:
            return run.stack
        self._weights.enter(len(a.blocks))
        logits = run.region(self._final_reader, None, g.groups[-1], resid_c)
        self._weights.leave(len(a.blocks))
        return EdgeModelOutput(logits=logits, edge_mask_sum=run.edge_sum, n_edges=g.n_edges,
                               node_mask_sum=run.node_sum(), n_nodes=g.n_writers,
                               writer_deltas=run.stack if keep_stack else None)

    # Reader regions: a group's masked sum and what its readers apply to it.
    # With recompute_readers they run under activation checkpointing, so the
    # reader inputs ([R, B, S, D] per layer) are recomputed in the backward.

    def _attn_readers(self, run, layer, group, mlp_group, base, cos_sin, attn_bias):
        a = self.adapter
        hq, hkv = a.n_heads, a.n_kv_heads
        # splits, not slices: a split's backward is one concatenation, where
        # each slice's would be a zero-padded tensor of the whole input
        x, mlp_partial = run.read_layer(group, mlp_group, base).split([group.n_readers, 1])
        xq, xk, xv = self._reader_norm(layer, x).split([hq, hkv, hkv])
        # the MLP's row as a copy: a view would keep the whole [R + 1, *T]
        # read alive (a region input is kept) until the MLP's backward
        return self._heads(layer, xq, xk, xv, cos_sin, attn_bias), mlp_partial[0].clone()

    def _reader_norm(self, layer, x):
        """The layer's attention norm on every reader's input [R, *T]: the
        fused op where `_fused_norm_backend` allows it, else the module, lean
        (`_RowChunked`: chunked, saving only x) when it will be differentiated."""
        a = self.adapter
        backend = self._fused_norm_backend(layer, x)
        if backend is not None:
            p = a.attn_norm_params(layer)
            return ops.fused_norm(x, p.weight, p.bias, eps=p.eps, kind=p.kind, backend=backend)
        if self.lean_norm and torch.is_grad_enabled() and x.requires_grad:
            module = functools.reduce(getattr, a.spec.attn_norm.split("."), a.blocks[layer])
            # the norm's forward as it is now (bound): the backward recomputes
            # with this very function, even if the class is patched meanwhile
            return _RowChunked.apply(x, module.forward, NORM_CHUNK_ELEMENTS)
        return a.attn_norm(layer, x)

    def _fused_norm_backend(self, layer, x) -> Optional[str]:
        """The fused norm's backend for this layer's readers, or None for the
        module: the norm must be recognised (`Adapter.attn_norm_params`), with
        frozen parameters in x's dtype; "auto" takes it only where the Triton
        kernels run (`fastedge.ops.norm.auto_backend`)."""
        mode = self.fused_norm or _fused_norm_mode(None)
        if mode == "off":
            return None
        p = self.adapter.attn_norm_params(layer)
        if p is None or any(t is not None and (t.requires_grad or t.dtype != x.dtype)
                            for t in (p.weight, p.bias)):
            return None
        if mode != "auto":
            return mode
        if ops.norm.auto_backend(x, p.weight) == "triton" and not ops.norm.triton_reasons(x, p.weight):
            return "triton"
        return None

    def _mlp_reader(self, run, layer, attn_group, group, partial):
        a = self.adapter
        x = run.read_rest(attn_group, group, partial)
        return a.mlp(layer, a.mlp_norm(layer, x))

    def _final_reader(self, run, layer, group, base):
        return self.adapter.unembed(run.read(group, base)[0])

    def _heads(self, layer, xq, xk, xv, cos_sin, attn_bias) -> Tensor:
        return attention_heads(self.adapter, layer, xq, xk, xv, cos_sin, attn_bias)

    def _mean(self, writer: int, S: int) -> Tensor:
        means = self._mean_outputs
        if means.shape[1] < S:
            raise ValueError(f"mean outputs were computed for {means.shape[1]} positions; "
                             f"inputs have {S}")
        return means[writer, :S][None]  # broadcast over the batch

    def _mean_prefix(self, start: int, stop: int, S: int) -> Tensor:
        return self._mean_outputs[start:stop, :S].sum(0)[None]

    # -- undo -----------------------------------------------------------------------

    def unpatch(self) -> nn.Module:
        """Give back the original model. This EdgeModel refuses to run from
        now on (`UnpatchedError`); a second call just returns the model.

        The model's requires_grad flags and train/eval mode go back to what
        they were before it was first patched once no other EdgeModel of the
        same model is patched: while one is, the weights stay frozen, so that
        it never puts gradients into them. (Patching twice and unpatching the
        second thus leaves the model frozen for the first; unpatching both, in
        either order, or dropping the first, restores it.)"""
        if self._unpatched:
            return self.model
        self._unpatched = True
        record = self._patch_record
        record.live.discard(self)
        if not len(record.live):
            for name, p in self.model.named_parameters():
                p.requires_grad_(record.flags.get(name, True))
            self.model.train(record.was_training)
            if _PATCHES.get(self.model) is record:
                del _PATCHES[self.model]
        return self.model

    def _check_patched(self) -> None:
        if self._unpatched:
            raise UnpatchedError("this EdgeModel was unpatched (EdgeModel.unpatch gave its model back) and "
                                 "no longer runs: its model's weights are no longer frozen. Patch the model "
                                 "again with fastedge.patch(model)")


class _Run:
    """The state of one forward: the stack, its gradient buffer, the order
    token, and the node masks of every writer."""

    def __init__(self, em: EdgeModel, seed: int, needs_grad: bool, plain: bool):
        self.em, self.seed, self.needs_grad, self.plain = em, seed, needs_grad, plain
        # the reader regions' edge-mask sums, added once at the end (`edge_sum`)
        self.edge_sums: list[Tensor] = [] if em._fixed_masks is None else [em._circuit[1]]
        self.node_masks = self._sample_node_masks()

    def write(self, start: int, delta: Tensor) -> None:
        if self.needs_grad and delta.requires_grad:
            self.token = _StackWrite.apply(self.token, delta, self.stack, self.grad_buffer, start)
        else:
            with torch.no_grad():
                self.stack[start:start + delta.shape[0]].copy_(delta)

    def region(self, fn, *args):
        """Run a reader region, checkpointed when the model recomputes readers.
        The region's edge-mask sum (None if it sampled no masks) leaves it as
        an output, so that its gradient flows through the checkpoint."""
        def body(token, *args):
            self.token_for_read = token
            self.region_edge_sum = None
            out = fn(self, *args)
            return out, self.region_edge_sum
        if self.em.recompute_readers and self.needs_grad:
            out, edge_sum = torch.utils.checkpoint.checkpoint(body, self.token, *args, use_reentrant=False)
        else:
            out, edge_sum = body(self.token, *args)
        if self.needs_grad:  # the region's unit unsharded again before its backward (fastedge.sharding)
            out = self.em._weights.gate(args[0], out)
        if edge_sum is not None:
            self.edge_sums.append(edge_sum)
        return out

    @property
    def edge_sum(self) -> Tensor:
        """The sum of every edge mask this run used (0-dim, mask dtype)."""
        if not self.edge_sums:
            em = self.em
            return torch.zeros((), device=em.edge_log_alpha[0].device, dtype=em.mask_dtype)
        return torch.stack(self.edge_sums).sum()

    def _count_edges(self, edge_sum: Tensor) -> None:
        self.region_edge_sum = _add(self.region_edge_sum, edge_sum)

    def _after_writes(self, log_alpha: Tensor) -> Tensor:
        """`log_alpha` tied to the order token (module docstring), when the run
        has a backward: ``log_alpha + 0 * token`` in one op."""
        return torch.add(log_alpha, self.token_for_read, alpha=0) if self.needs_grad else log_alpha

    def read_layer(self, attn: ReaderGroup, mlp: ReaderGroup, base: Optional[Tensor]) -> Tensor:
        """One layer's attention readers and, as one more row, the MLP reader's
        sum over the same writers (those before the layer), in one call over
        the attention prefix: ``[R_attn + 1, *T]``. The MLP reader is the next
        reader after the attention group, so its row draws the same noise as
        in a call of its own. Reading the prefix once instead of twice (and
        accumulating both readers' gradients in one backward) halves the
        passes over the stack per layer."""
        return self._read(attn.index, attn.first_reader, attn.n_readers + 1, attn.n_writers, base,
                          extra_group=mlp.index)

    def read_rest(self, attn: ReaderGroup, mlp: ReaderGroup, partial: Tensor) -> Tensor:
        """The MLP reader's input: `partial` (its sum over the writers before
        the layer, plus its base) plus its masked reads of the writers between
        the attention prefix and itself (the layer's heads)."""
        em, W_a, W_m = self.em, attn.n_writers, mlp.n_writers
        if W_m == W_a:  # parallel blocks: the MLP reads no head of its layer
            return partial
        rows = self.stack[W_a:W_m]
        grad_rows = self.grad_buffer[W_a:W_m] if self.needs_grad else None
        base = _full(partial, rows.shape[1:])
        if self.plain:
            mask = torch.ones(1, W_m - W_a, device=rows.device, dtype=em.mask_dtype)
            return ops.masked_writer_sum(rows, mask, base, unit_mask=True)[0]
        if em._fixed_masks is not None:  # (their edge sum is counted once per forward)
            mask = self._after_writes(em._fixed_masks[mlp.index][:, W_a:])
            return ops.masked_writer_sum(rows, mask, base, grad_stack=grad_rows, precision=em.precision,
                                         unit_mask=True)[0]
        edge = self._after_writes(em.edge_log_alpha[mlp.index])
        # the whole row's masks (W_m values: cheap), so that the noise counters
        # are those of the MLP reader's own call; the prefix part is unused here
        z, _ = ops.sample_masks(edge, None, seed=self.seed, reader_offset=mlp.first_reader,
                                training=em.training)
        z = z[:, W_a:]
        self._count_edges(z.sum())
        if self.node_masks is not None:
            z = z * self.node_masks[W_a:W_m]
        return ops.masked_writer_sum(rows, z, base, grad_stack=grad_rows, precision=em.precision,
                                     unit_mask=True)[0]  # z: hard-concrete samples, in [0, 1]

    def read(self, group: ReaderGroup, base: Optional[Tensor]) -> Tensor:
        return self._read(group.index, group.first_reader, group.n_readers, group.n_writers, base)

    def _read(self, gi: int, first_reader: int, n_readers: int, n_writers: int, base: Optional[Tensor],
              extra_group: Optional[int] = None) -> Tensor:
        """Readers ``first_reader ..`` of group `gi` over the first `n_writers`
        writers; `extra_group` appends that group's rows (the next group: the
        MLP reader), over the same writers, to the same call."""
        em = self.em
        if base is not None:
            base = _full(base, self.stack.shape[1:])
        if self.plain:  # every mask 1: the unmasked model's writer outputs (for mean ablation)
            mask = torch.ones(n_readers, n_writers, device=self.stack.device, dtype=em.mask_dtype)
            return ops.masked_writer_sum(self.stack, mask, base, unit_mask=True)

        def rows_of(per_group):  # this group's rows, plus the extra group's over the same writers
            if extra_group is None:
                return per_group[gi]
            return torch.cat([per_group[gi], per_group[extra_group][:, :n_writers]])

        grad_stack = self.grad_buffer if self.needs_grad else None
        if em._fixed_masks is not None:  # (their edge sum is counted once per forward)
            mask = self._after_writes(rows_of(em._fixed_masks))
            return ops.masked_writer_sum(self.stack, mask, base, grad_stack=grad_stack,
                                         precision=em.precision, unit_mask=True)  # 0s and 1s
        edge = self._after_writes(rows_of(em.edge_log_alpha))
        node = None if em.node_log_alpha is None else em.node_log_alpha[:n_writers]
        out, edge_sum = ops.sampled_masked_writer_sum(
            self.stack, edge, node, base, seed=self.seed, reader_offset=first_reader,
            training=em.training, grad_stack=grad_stack, precision=em.precision)
        self._count_edges(edge_sum)
        return out

    def node_sum(self) -> Optional[Tensor]:
        return None if self.node_masks is None else self.node_masks.sum()

    def _sample_node_masks(self) -> Optional[Tensor]:
        """Node masks of every writer ([n_writers]), once per forward: sampled
        from this run's seed in training (the noise every fused call draws for
        the same writers: node noise depends on the seed and the writer only),
        deterministic in eval. Made here, before any reader region, and only
        sliced inside them: with ``recompute_readers`` a checkpointed region's
        recomputation then slices the same tensor instead of drawing the noise
        again. None when the run uses no sampled node masks (none, a fixed
        circuit, or the plain run of mean ablation)."""
        em = self.em
        if em.node_log_alpha is None or em._fixed_masks is not None or self.plain:
            return None
        u = (ops.node_noise(self.seed, em.graph.n_writers, em.node_log_alpha.device).to(em.mask_dtype)
             if em.training else None)
        return ops.hard_concrete(em.node_log_alpha, training=em.training, u=u)


def attention_heads(a: Adapter, layer: int, xq: Tensor, xk: Tensor, xv: Tensor, cos_sin,
                    attn_bias: Tensor) -> Tensor:
    """Per-head attention outputs [H, B, S, D] from per-reader normed inputs
    xq [Hq, B, S, D], xk / xv [Hkv, B, S, D] (each head reads its own input).
    `cos_sin`: None (no rotary), the model's rotary ``(cos, sin)`` or a
    `Rotary` prepared from them (once per forward: cheaper per layer)."""
    q_w, q_b, k_w, k_b, v_w, v_b = a.qkv(layer)
    q = _project(xq, q_w, q_b)
    k = _project(xk, k_w, k_b)
    v = _project(xv, v_w, v_b)
    q, k, v = (t.permute(1, 0, 2, 3) for t in (q, k, v))  # [B, H, S, d]
    if cos_sin is not None:
        rotary = cos_sin if isinstance(cos_sin, Rotary) else Rotary.prepare(*cos_sin, q.shape[-1])
        q, k = rotary(q), rotary(k)
    attn = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_bias, scale=a.scale, enable_gqa=a.n_heads != a.n_kv_heads)
    o_w, o_b = a.out(layer)
    # each head's output projection, the output bias split evenly across heads
    return _per_head_matmul(attn.transpose(0, 1), o_w.transpose(1, 2),
                            None if o_b is None else o_b / a.n_heads)


def _full(t: Tensor, shape) -> Tensor:
    """`t` broadcast to `shape` and materialised (the ops take whole rows)."""
    return t if t.shape == shape else t.expand(shape).contiguous()


def _project(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Per-head projection: x [H, B, S, D], weight [H, d, D] -> [H, B, S, d]."""
    return _per_head_matmul(x, weight, bias)


def _per_head_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x[h] @ weight[h].T + bias[h]`` for each head h: x [H, B, S, K],
    weight [H, N, K], bias [H, N] or [N] (shared) -> [H, B, S, N], as one
    batched product (bmm, or baddbmm with the bias). Written out because an
    einsum spends about three times the host ops setting up the same product
    (permutes and views around its bmm), in the forward and the backward."""
    H, B, S, K = x.shape
    rows = x.reshape(H, B * S, K)   # a view when each head's [B, S, K] is contiguous
    w = weight.transpose(1, 2)      # [H, K, N], a view
    if bias is None:
        out = torch.bmm(rows, w)
    else:
        out = torch.baddbmm(bias.unsqueeze(-2), rows, w)
    return out.view(H, B, S, out.shape[-1])


class Rotary(NamedTuple):
    """The rotary embedding of heads [B, H, S, d], prepared once per forward.

    Hugging Face's form on the first ``rot`` dims (partial rotary keeps the
    rest): ``t * cos + rotate_half(t) * sin`` with ``rotate_half(t) =
    cat(-t2, t1)`` for the halves t1, t2 of those dims. Here the sign moves
    into ``sin`` and the halves' swap is one op, so that each head tensor
    costs three ops (swap, product, fused multiply-add) instead of about ten
    (slices, negation, concatenations): ``t * cos + swap(t) * sin`` where
    ``cos`` is 1 and ``sin`` 0 on the dims that do not rotate. The same
    values up to rounding (the pass-through dims exactly)."""
    cos: Tensor               # [B, 1, S, d]
    sin: Tensor               # [B, 1, S, d], signed
    perm: Optional[Tensor]    # [d] source of each dim after the swap; None: a roll of all d dims

    @classmethod
    def prepare(cls, cos: Tensor, sin: Tensor, head_dim: int) -> "Rotary":
        """From the model's rotary ``cos, sin`` ([B, S, rot], rot even, <= head_dim)."""
        rot, half = cos.shape[-1], cos.shape[-1] // 2
        if rot % 2 or rot > head_dim:
            raise ValueError(f"rotary width {rot} must be even and at most the head width {head_dim}")
        sign = torch.ones(rot, dtype=sin.dtype, device=sin.device)
        sign[:half] = -1
        sin = sin * sign
        perm = None
        if rot < head_dim:
            rest = (*cos.shape[:-1], head_dim - rot)
            cos = torch.cat((cos, cos.new_ones(rest)), dim=-1)
            sin = torch.cat((sin, sin.new_zeros(rest)), dim=-1)
            idx = torch.arange(head_dim, device=cos.device)
            perm = torch.cat((idx[half:rot], idx[:half], idx[rot:]))
        return cls(cos[:, None], sin[:, None], perm)

    def __call__(self, t: Tensor) -> Tensor:
        if self.perm is None:  # every dim rotates: the halves' swap is a roll by half the width
            swapped = torch.roll(t, t.shape[-1] // 2, dims=-1)
        else:
            swapped = t.index_select(-1, self.perm)
        return torch.addcmul(t * self.cos, swapped, self.sin)


def _attention_mask(attention_mask: Tensor, window: Optional[int] = None, causal: bool = True) -> Tensor:
    """[B, 1, S, S] boolean: causal (unless `causal` is False), not padding,
    and within the sliding window (i - j < window) if any; a query always
    sees itself, so a padded row never becomes all -inf (its output is
    unused)."""
    S = attention_mask.shape[1]
    allowed = torch.ones(S, S, dtype=torch.bool, device=attention_mask.device)
    causal = allowed.tril() if causal else allowed
    if window is not None:
        causal = causal.triu(-(window - 1))
    keys = attention_mask.bool()[:, None, None, :]
    eye = torch.eye(S, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | eye


def _sum_or_none(tensors):
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return None
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def patch(model: nn.Module, *, ablation: str = "interchange", node_masks: bool = True, seed: int = 0,
          recompute_readers: bool = False, grad_buffer_dtype: Optional[torch.dtype] = None,
          lean_norm: bool = True, precision: str = "full",
          fused_norm: Optional[str] = None) -> EdgeModel:
    """Turn a Hugging Face causal LM into an edge-prunable `EdgeModel`
    (GPT-2, Llama family incl. grouped k/v heads, Mistral, Qwen2, GPT-NeoX).
    The model's weights are reused, never copied, and frozen;
    `EdgeModel.unpatch()` gives the model back.

    Memory options (module docstring, "Memory"): ``recompute_readers``
    recomputes each layer's reader inputs in the backward (use it for large
    models: at CodeLlama-13B shape it is what lets a micro-batch of 8 fit 80
    GB); ``lean_norm`` runs the readers' norms chunked, keeping only their
    input; ``grad_buffer_dtype=torch.float32`` accumulates the stack gradient
    in float32 instead of the stack's dtype (more precise; twice the
    buffer's bytes for a bf16 model). ``precision="fast"`` lets the GPU
    kernels round the masks once to the model's dtype in the masked sums
    (one tensor-core product instead of up to two; `fastedge.masked_writer_sum`).
    ``fused_norm`` ("auto", "off", "triton", "torch"; None: FASTEDGE_FUSED_NORM,
    else "auto") runs the readers' norms as one fused kernel each way where
    the Triton kernels run (module docstring, "Memory")."""
    return EdgeModel(model, ablation=ablation, node_masks=node_masks, seed=seed,
                     recompute_readers=recompute_readers, grad_buffer_dtype=grad_buffer_dtype,
                     lean_norm=lean_norm, precision=precision, fused_norm=fused_norm)
