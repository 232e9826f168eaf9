"""Peak memory per rank of sharded pruning (`fastedge.sharding`, FSDP2), on fake tensors.

    python bench/memory.py --model llama-3-70b --ranks 8 --card h100-80gb
    python bench/memory.py --model codellama-34b --ranks 8 --card h100-80gb,h200-141gb

What is traced
--------------
One rank's pruning step (bench/pruning_step.py: masked forward with the
corrupted pass, KL + Lagrangian, backward into the masks, AdamW) of
`fastedge.patch(model, recompute_readers=True)`, on a model of the named
shape built under `FakeTensorMode` (bf16, nothing allocated), counted by
bench/memtrack.py as bench/memory.py does for one device. The difference:
the layer loop runs the real unshard/reshard protocol of
`fastedge.sharding.FSDPWeights` (prefetch of the next unit, re-unshard in
the backward through the gradient hooks, reshard of the last unit by the
engine callback) over `FakeUnit`s, which stand in for FSDP2's units on one
rank of ``--ranks``:

* sharded: each parameter's storage is shrunk to 0 bytes (as FSDP2 frees an
  unsharded parameter) and the rank holds a shard of ``ceil(numel / ranks)``
  elements instead, counted before the step;
* unshard: an all-gather output buffer of the unit's full size is allocated,
  the parameters' storages grow back to full size (FSDP2 copies the
  gathered values into the same storages, so autograd's saved views stay
  valid), and the buffer is freed: the transient peak of FSDP2's copy-out;
* reshard: the storages shrink to 0 again.

Units as `fastedge.sharding` makes them: one per block, the embedding
(unless tied to the unembedding) and the root (final norm and unembedding).
So the peak holds the shards, the masks and their optimizer state, at most
two unsharded units (the one in use and the prefetched one), the stack, its
gradient buffer and one layer's reader region. Not counted: FSDP2's
all-gather *input* buffer (a copy of one unit's shards: 1/ranks of a
block), NCCL's buffers, and what bench/memory.py does not count either
(kernel workspaces, allocator rounding beyond 512 bytes, fragmentation,
the CUDA context): the budget's headroom covers them.

The step's memory is affine in the micro-batch's tokens (every activation,
the stack and its buffer are per token), so a fit of ``peak = a + b *
tokens`` over a few traced points gives the largest micro-batch at each
sequence length and card; the limits at seq 72 are traced to check the fit
(they must fit and one more sequence must not).
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

import pruning_step as ps
from memtrack import LiveTensorTracker

GB = 1e9
CARDS = {"h100-80gb": 80.0, "h200-141gb": 141.0}


def llama_3_70b_config(n_layers: Optional[int] = None):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                      num_hidden_layers=n_layers or 80, num_attention_heads=64, num_key_value_heads=8,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500_000.0,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def codellama_34b_config(n_layers: Optional[int] = None):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                      num_hidden_layers=n_layers or 48, num_attention_heads=64, num_key_value_heads=8,
                      max_position_embeddings=16384, rms_norm_eps=1e-5, rope_theta=1_000_000.0,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def qwen2_72b_config(n_layers: Optional[int] = None):
    from transformers import Qwen2Config
    cfg = Qwen2Config(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                      num_hidden_layers=n_layers or 80, num_attention_heads=64, num_key_value_heads=8,
                      max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                      tie_word_embeddings=False, use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    return cfg


LARGE_CONFIGS = {"llama-3-70b": llama_3_70b_config, "codellama-34b": codellama_34b_config,
                 "qwen2-72b": qwen2_72b_config}


class _Done:
    """The handle of an unshard that already happened (`unshard(async_op=True)`)."""

    def wait(self) -> None:
        pass


class FakeUnit:
    """One FSDP2 unit as one rank of `world` holds it (module docstring):
    `unshard` / `reshard` as `fastedge.sharding.FSDPWeights` calls them."""

    def __init__(self, params, world: int):
        seen, self.params = set(), []
        for p in params:  # tied parameters once
            key = id(p.untyped_storage())
            if key not in seen:
                seen.add(key)
                self.params.append(p)
        self.full = [p.untyped_storage().nbytes() for p in self.params]
        self.full_bytes = sum(self.full)
        self.shards = [torch.empty(math.ceil(p.numel() / world), dtype=p.dtype) for p in self.params]
        self.shard_bytes = sum(s.untyped_storage().nbytes() for s in self.shards)
        self.tracker: Optional[LiveTensorTracker] = None
        self.unsharded = True
        self.reshard()

    def _remeasure(self) -> None:
        if self.tracker is not None:
            self.tracker.remeasure(*self.params)

    def unshard(self, async_op: bool = False):
        if not self.unsharded:
            dtype = self.params[0].dtype
            buffer = torch.empty(self.full_bytes // dtype.itemsize, dtype=dtype)  # the all-gather output
            for p, n in zip(self.params, self.full):
                p.untyped_storage().resize_(n)
            self._remeasure()
            del buffer  # freed after the copy-out
            self.unsharded = True
        return _Done() if async_op else None

    def reshard(self) -> None:
        if self.unsharded:
            for p in self.params:
                p.untyped_storage().resize_(0)
            self._remeasure()
            self.unsharded = False


class ShardedFakeModel:
    """A fake model of the named shape and its units on one rank of `ranks`."""

    def __init__(self, name: str, ranks: int, dtype=torch.bfloat16, n_layers: Optional[int] = None):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from transformers import AutoModelForCausalLM
        from fastedge.adapters import Adapter
        from fastedge.sharding import embedding_unit
        self.name, self.ranks = name, ranks
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.config = LARGE_CONFIGS[name](n_layers)
        with self.mode, torch.device("cpu"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype).eval().requires_grad_(False)
            self.weights = sum(p.untyped_storage().nbytes() for p in
                               {p.untyped_storage()._cdata: p for p in self.model.parameters()}.values())
            adapter = Adapter(self.model)
            blocks = adapter.blocks
            embeddings = embedding_unit(adapter)  # as fastedge.sharding makes them: apart unless tied
            self.embed = (None if embeddings is None else
                          FakeUnit([p for m in embeddings for p in m.parameters()], ranks))
            elsewhere = {id(p) for b in blocks for p in b.parameters()}
            elsewhere |= {id(p) for p in (self.embed.params if self.embed else [])}
            self.blocks = [FakeUnit(list(b.parameters()), ranks) for b in blocks]
            self.root = FakeUnit([p for p in self.model.parameters() if id(p) not in elsewhere], ranks)
        self.units = [self.root, *self.blocks] + ([self.embed] if self.embed else [])
        self.shard_bytes = sum(u.shard_bytes for u in self.units)
        self.block_bytes = self.blocks[0].full_bytes
        self.root_bytes = self.root.full_bytes
        self.embed_bytes = self.embed.full_bytes if self.embed else 0

    @property
    def writers(self) -> int:
        from fastedge.graph import EdgeGraph
        return EdgeGraph.from_config(self.config).n_writers

    def trace(self, micro_batch: int, seq: int, breakdown: bool = False) -> dict:
        """One step of one micro-batch on one rank: bytes before the step
        (shards, masks, inputs), the step's peak above that and the peak total."""
        import fastedge
        from fastedge.sharding import FSDPWeights
        t0 = time.perf_counter()
        vocab = self.config.vocab_size
        with self.mode:
            ids, corrupted = ps.random_batch(vocab, micro_batch, seq, "cpu")
            full = torch.zeros(micro_batch, vocab).log_softmax(-1)
            em = fastedge.patch(self.model, node_masks=False, recompute_readers=True)
            try:
                em.train()
                em.forward = _fixed_seed(em.forward)
                em._weights = FSDPWeights(self.root, self.blocks, prefetch=True, embed=self.embed)
                opt = ps.make_optimizer(em)
                shards = [s for u in self.units for s in u.shards]
                with LiveTensorTracker(self.model, em, ids, corrupted, full, shards, round_to=512,
                                       record_peak=breakdown) as t:
                    for u in self.units:
                        u.tracker = t
                    ps.pruning_step(em, opt, ids, corrupted, full, micro_batch)
                for u in self.units:
                    u.tracker = None
                    assert not u.unsharded, "a unit was left unsharded after the step"
            finally:
                em.unpatch()
                self.model.requires_grad_(False)
        return dict(micro_batch=micro_batch, seq=seq, tokens=micro_batch * seq, before=t.baseline_bytes,
                    step=t.peak_bytes, total=t.peak_total_bytes, seconds=time.perf_counter() - t0,
                    breakdown=t.peak_breakdown(10) if breakdown else [])


def _fixed_seed(forward):
    # a fake tensor's step counter cannot be read: every forward takes seed 0
    def run(*args, **kwargs):
        kwargs.setdefault("seed", 0)
        return forward(*args, **kwargs)
    return run


def plan(name: str, ranks: int, cards: dict, seqs=(72, 1024), headroom_gib: float = 1.5,
         headroom_frac: float = 0.05, n_layers: Optional[int] = None, verify: bool = True,
         fit_points=((1, 72), (2, 72), (1, 288)), log=print) -> dict:
    """Trace `fit_points` on one rank of `ranks`, fit ``peak = a + b *
    tokens``, and give the largest micro-batch per (card, seq); the limits at
    the first seq are traced (`verify`)."""
    from memory import usable_bytes
    t0 = time.perf_counter()
    fm = ShardedFakeModel(name, ranks, n_layers=n_layers)
    dtype_bytes = 2
    log(f"fake {name} ({fm.config.num_hidden_layers} layers) built in {time.perf_counter() - t0:.0f} s: weights "
        f"{fm.weights / GB:.1f} GB, {fm.shard_bytes / GB:.2f} GB per rank of {ranks}; a block "
        f"{fm.block_bytes / GB:.2f} GB, the embedding {fm.embed_bytes / GB:.2f} GB, the root unit "
        f"{fm.root_bytes / GB:.2f} GB")
    traced = {}

    def trace(m, s, breakdown=False):
        if (m, s) not in traced:
            p = fm.trace(m, s, breakdown=breakdown)
            traced[(m, s)] = p
            log(f"  micro {m:>3} x seq {s:>5}: before {p['before'] / GB:7.2f} GB, step {p['step'] / GB:7.2f} GB, "
                f"total {p['total'] / GB:7.2f} GB ({p['seconds']:.0f} s)")
        return traced[(m, s)]

    points = [trace(m, s, breakdown=(i == 0)) for i, (m, s) in enumerate(fit_points)]
    xs = [float(p["tokens"]) for p in points]
    ys = [float(p["total"]) for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    residual = max(abs(a + b * x - y) / y for x, y in zip(xs, ys))
    stack_per_token = fm.writers * fm.config.hidden_size * dtype_bytes
    limits = []
    for card, card_gb in cards.items():
        usable = usable_bytes(card_gb, headroom_gib, headroom_frac)
        for s in seqs:
            m = max(0, math.floor((usable - a) / b)) // s
            lim = dict(card=card, card_gb=card_gb, usable=usable, seq=s, max_micro=m,
                       predicted=a + b * max(m, 1) * s, traced=None, traced_next=None)
            if verify:
                m, below, above = _search(trace, m, s, usable)
                lim.update(max_micro=m, traced=below, traced_next=above, predicted=a + b * max(m, 1) * s)
            limits.append(lim)
    return dict(name=name, ranks=ranks, layers=fm.config.num_hidden_layers, weights=fm.weights,
                shard_bytes=fm.shard_bytes, block_bytes=fm.block_bytes, root_bytes=fm.root_bytes,
                embed_bytes=fm.embed_bytes,
                writers=fm.writers, hidden=fm.config.hidden_size, stack_per_token=stack_per_token,
                a=a, b=b, residual=residual, points=list(traced.values()), limits=limits,
                headroom=(headroom_gib, headroom_frac))


def _search(trace, m: int, seq: int, usable: float, tries: int = 12):
    """The largest micro-batch at `seq` whose traced peak fits `usable`,
    starting from the fit's `m`: up one at a time while it fits, bisection
    once a size that does not fit is known. Returns (micro-batch, its
    trace or None, the trace of one more)."""
    lo, hi = 0, None
    x = max(1, m)
    for _ in range(tries):
        if trace(x, seq)["total"] <= usable:
            lo = x
        else:
            hi = x
        if hi is not None and hi == lo + 1:
            break
        x = lo + 1 if hi is None else (lo + hi) // 2
    else:
        raise RuntimeError(f"the micro-batch search at seq {seq} did not settle (between {lo} and {hi})")
    return lo, (trace(lo, seq) if lo else None), trace(lo + 1, seq)


def markdown(plans: list, meta: dict, command: str) -> str:
    L = ["# Peak memory per rank of sharded pruning (FSDP2), traced on fake tensors", "",
         f"- date {meta['date']}; torch {meta['torch']}; transformers {meta['transformers']}; git {meta['git_rev']}",
         f"- command: `{command}`",
         "- one rank's step of `fastedge.patch(model, recompute_readers=True)` in bf16 (bench/pruning_step.py), "
         "with the layer loop's unshard/reshard protocol (`fastedge.sharding.FSDPWeights`) over emulated FSDP2 "
         "units (bench/memory_sharded.py): the rank's shards, at most two unsharded units and the all-gather "
         "buffer of an unshard, the stack, its gradient buffer, one layer's readers, the masks and AdamW state",
         "- budgets: card GB (10^9 bytes) less 1.5 GiB and 5% of the card (CUDA context, workspaces, NCCL, "
         "fragmentation), as in bench/memory.py",
         "", "## The models and the fit peak = a + b x tokens (micro-batch x seq)", "",
         "| model | layers | ranks | weights GB | per rank GB | block GB | embedding GB | root unit GB | writers "
         "| stack + buffer MB/token | a GB | b MB/token | fit residual |",
         "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for p in plans:
        L.append(f"| {p['name']} | {p['layers']} | {p['ranks']} | {p['weights'] / GB:.1f} | {p['shard_bytes'] / GB:.2f} "
                 f"| {p['block_bytes'] / GB:.2f} | {p['embed_bytes'] / GB:.2f} | {p['root_bytes'] / GB:.2f} "
                 f"| {p['writers']:,} "
                 f"| {2 * p['stack_per_token'] / 1e6:.1f} | {p['a'] / GB:.2f} | {p['b'] / 1e6:.1f} "
                 f"| {p['residual']:.1e} |")
    L += ["", "## Largest micro-batch per rank", "",
          "| model | card | usable GB | seq | largest micro-batch | fit GB at it | traced GB at it | traced GB at one more |",
          "|---|---|--:|--:|--:|--:|--:|--:|"]
    for p in plans:
        for x in p["limits"]:
            one = p["a"] + p["b"] * x["seq"]
            at = (f"{x['predicted'] / GB:.1f}" if x["max_micro"] else f"(one sequence: {one / GB:.0f})")
            L.append(f"| {p['name']} | {x['card']} | {x['usable'] / GB:.1f} | {x['seq']} | {x['max_micro']} | {at} "
                     f"| {_gb(x['traced'])} | {_gb(x['traced_next'])} |")
    L += ["", "## Traced points", "", "| model | micro-batch | seq | before GB | step GB | peak total GB | trace s |",
          "|---|--:|--:|--:|--:|--:|--:|"]
    for p in plans:
        for q in sorted(p["points"], key=lambda q: (q["seq"], q["micro_batch"])):
            L.append(f"| {p['name']} | {q['micro_batch']} | {q['seq']} | {q['before'] / GB:.2f} | {q['step'] / GB:.2f} "
                     f"| {q['total'] / GB:.2f} | {q['seconds']:.0f} |")
    for p in plans:
        bd = [q for q in p["points"] if q["breakdown"]]
        for q in bd:
            L += ["", f"What is live at the peak: {p['name']}, micro-batch {q['micro_batch']}, seq {q['seq']} "
                  f"(peak total {q['total'] / GB:.2f} GB):", "", "| made by (op), shape, dtype | count | GB |",
                  "|---|--:|--:|"]
            for what, count, nbytes in q["breakdown"]:
                L.append(f"| {what} | {count} | {nbytes / GB:.3f} |")
    return "\n".join(L) + "\n"


def _gb(point) -> str:
    return "" if point is None else f"{point['total'] / GB:.1f}"


def rows(plans: list, meta: dict) -> list[dict]:
    """memory.csv rows (bench/memory.py's columns): the traced points and the limits."""
    out = []
    for p in plans:
        base = dict(meta, model=p["name"], layers=p["layers"], dtype="bfloat16",
                    options=f"shard=fsdp ranks={p['ranks']} recompute_readers=True",
                    weights_gb=p["shard_bytes"] / GB)
        for q in p["points"]:
            out.append(dict(base, what="point-sharded", design="fastedge", batch=q["micro_batch"],
                            micro_batch=q["micro_batch"], seq=q["seq"], tokens=q["tokens"],
                            before_gb=q["before"] / GB, step_gb=q["step"] / GB, peak_total_gb=q["total"] / GB,
                            fit_gb=(p["a"] + p["b"] * q["tokens"]) / GB, trace_s=q["seconds"]))
        for x in p["limits"]:
            out.append(dict(base, what="limit-sharded", design="fastedge", seq=x["seq"], card_gb=x["card_gb"],
                            usable_gb=x["usable"] / GB, max_batch=x["max_micro"], micro_batch=x["max_micro"],
                            batch=x["max_micro"], tokens=x["max_micro"] * x["seq"], fit_gb=x["predicted"] / GB,
                            peak_total_gb=None if x["traced"] is None else x["traced"]["total"] / GB))
    return out
