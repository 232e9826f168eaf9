"""Sharding the frozen model over ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`).

    torchrun --nproc_per_node 8 -m fastedge.cli prune --model M --task T --shard fsdp ...
    fastedge.prune(model, task, shard="fsdp")          # under an initialised process group

`shard_edge_model(em)` shards a patched model's frozen parameters over the
default process group: each transformer block is one FSDP unit, the
embeddings another (unless the unembedding shares their weight), and the
root unit holds the rest (final norm, unembedding). `load_sharded` builds
a saved model that way on the meta device and reads each rank's shards
from the checkpoint, so that no rank ever holds the whole model. Each rank
keeps 1/N of every parameter as a `DTensor` shard. The masks, the Lagrange
multipliers and the optimizer stay replicated, and the micro-batches are
split over the ranks as in plain data parallelism (`fastedge.distributed`):
the mesh is the same ranks, so every rank is both a data-parallel worker and
a holder of 1/N of the weights.

Why FSDP's own hooks are not enough
-----------------------------------
FSDP unshards a unit in the pre-forward hook of its module and reshards it
after. `EdgeModel` never calls a block's `forward`: it reads the block's
weights through per-head views (`fastedge.adapters`) from its own layer loop
(`EdgeModel._run`), so those hooks never fire. The loop therefore drives
the unit itself, through `FSDPWeights` (the object `EdgeModel._weights`
holds; `PlainWeights` does nothing):

* forward: ``enter(position)`` unshards the unit of a position (-1 the
  embeddings, 0 .. L - 1 the blocks, L the final reader's root), waiting
  for its prefetch, and starts an asynchronous all-gather of the next
  unit; ``leave(position)`` reshards it. At most the current and the next
  unit are unsharded at a time.
* backward: autograd keeps the tensors the forward saved, among them views
  of the *unsharded* parameters (a projection saves its weight). FSDP2
  frees an unsharded parameter by shrinking its storage to 0 bytes and, on
  the next unshard, grows the same storage back and copies the gathered
  values in: the saved views are valid again exactly while the unit is
  unsharded (and a backward that runs on a resharded unit fails loudly:
  "setStorage: ... out of bounds for storage of size 0"). ``gate(layer,
  outputs)`` puts a gradient hook on each output of a reader region (the
  attention heads, the MLP's partial sum, the MLP output, the logits) that
  unshards the unit before the region's backward (and before its
  checkpoint recomputation, with ``recompute_readers``) and prefetches the
  unit before it, resharding every other unit.

  The backward visits the units in reverse order, one at a time: the
  order token of `fastedge.model` makes every writer's backward wait for
  every reader that could read it, so layer L - 1's outputs receive their
  gradients only after all of layer L's readers are done. The last unit
  of a backward is resharded by a callback queued on the autograd engine.

The HF model's own forward (the full-model reference of `fastedge.prune`,
`fastedge.evaluate`) runs through FSDP's hooks as usual.

Every forward and backward is collective: all ranks must run the same
number of them, with the same structure. `fastedge.prune` keeps that true
when one rank's loss is not finite (it still runs its backward passes and
stops at the step's end with every other rank); an exception on one rank
inside a forward (a bug, or the full model's own output not finite on that
rank's batch: `fastedge.prune` raises there) leaves the others waiting in an
all-gather until the process group's timeout.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

SHARD_MODES = ("fsdp",)

# Models whose own forward calls parts of a block rather than the block
# (Tracr's, which returns the residual stream between its attention and its
# MLP): FSDP's hooks must sit on those parts, which form the layer's unit
# together (one `fully_shard` of the list: one all-gather).
_UNIT_PARTS = {"tracr": ("self_attn", "mlp")}


def check_shard(shard: Optional[str]) -> Optional[str]:
    """`shard` as given (None or "fsdp"); anything else is refused."""
    if shard is not None and shard not in SHARD_MODES:
        raise ValueError(f"shard must be None (every rank holds the whole model) or one of "
                         f"{', '.join(map(repr, SHARD_MODES))}, got {shard!r}")
    return shard


class PlainWeights:
    """The weights are ordinary tensors: nothing to do around their use."""
    sharded = False

    def enter(self, layer: Optional[int]) -> None:
        pass

    def leave(self, layer: Optional[int]) -> None:
        pass

    def gate(self, layer: Optional[int], outputs):
        return outputs


PLAIN = PlainWeights()


def is_fsdp_module(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(module: nn.Module):
    """`module`'s FSDP unit unsharded inside the block (a no-op for a module
    that FSDP does not shard, or one whose unit is unsharded already):
    `fastedge.adapters.Adapter` reads a block's per-head shapes through it.
    Collective when it gathers: every rank must enter it."""
    import sys
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no parameter can be sharded
    sharded = dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in module.parameters())
    unit = _unit_module(module) if sharded else None
    if unit is None:
        yield
        return
    unit.unshard()
    try:
        yield
    finally:
        unit.reshard()


def _unit_module(module: nn.Module) -> Optional[nn.Module]:
    """The FSDP module whose unit holds `module`'s parameters (itself, or
    its first FSDP child: Tracr's blocks are sharded by parts), or None."""
    if is_fsdp_module(module):
        return module
    return next((m for m in module.modules() if is_fsdp_module(m)), None)


def shard_model(model: nn.Module, blocks, mesh=None, *, embeddings=None, bare: bool = False) -> None:
    """`fully_shard` each of `blocks` (the model's transformer blocks), the
    `embeddings` (a list of modules: one unit; None: they stay in the root),
    then the model itself (the root unit: everything else), over `mesh` (default:
    every rank of the default process group). Every unit reshards after
    its forward, the root too (FSDP keeps the root unsharded by default,
    which would hold the embedding and the unembedding for a whole step).
    `bare`: the parameters are on the meta device (`load_sharded`), so
    FSDP's lazy initialisation waits for the real ones."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard='fsdp' needs an initialised process group: run under torchrun "
                           "(the command line joins it) or call fastedge.distributed.init_from_env() first")
    if mesh is None:
        device = next(model.parameters()).device
        kind = "cuda" if device.type == "cuda" else "cpu"
        mesh = init_device_mesh(kind, (dist.get_world_size(),))
    for unit in layer_units(model, blocks):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    if embeddings:
        fully_shard(embeddings if len(embeddings) > 1 else embeddings[0], mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    if not bare:
        _lazy_init_root(model)


def embedding_unit(adapter) -> Optional[list]:
    """The embeddings as a unit of their own (token, and learned position
    embeddings where the model has them), unless the unembedding shares the
    token embedding's weight (GPT-2): then they stay in the root. Apart,
    the forward holds the embedding only at its start and the final reader
    the unembedding only: at Llama-3-70B shape each is 2.1 GB, whose
    all-gather transiently needs as much again."""
    token = adapter.token_embedding
    head = getattr(adapter.lm_head, "weight", None)
    if head is not None and head is token.weight:
        return None
    return [m for m in (token, adapter.position_embedding) if m is not None]


def layer_units(model: nn.Module, blocks) -> list:
    """Each layer's FSDP unit: its block, or the list of the block's parts
    that the model's forward calls (`_UNIT_PARTS`)."""
    parts = _UNIT_PARTS.get(getattr(getattr(model, "config", None), "model_type", None))
    if parts is None:
        return list(blocks)
    return [[getattr(block, name) for name in parts] for block in blocks]


def _lazy_init_root(model: nn.Module) -> None:
    """FSDP's root state initialises on the root's first forward; the layer
    loop may unshard blocks before any such forward (a mean-ablation
    reference, evaluation), so initialise it now. (A private method: its
    absence in another PyTorch only means the first root forward does it.)"""
    state = getattr(model, "_get_fsdp_state", lambda: None)()
    init = getattr(state, "_lazy_init", None)
    if init is not None:
        init()


class FSDPWeights:
    """The unshard/reshard protocol of the layer loop (module docstring).

    Units: ``None`` is the root (final norm, unembedding, and the
    embeddings when tied to it), ``"embed"`` the embeddings when they are a
    unit of their own (`embed`: a module of it), ``0 .. L - 1`` the blocks.
    Forward order: embeddings, blocks 0 .. L - 1, root (final reader);
    backward order: root, L - 1 .. 0 (the embeddings have no backward: no
    gradient reaches them)."""
    sharded = True

    def __init__(self, model: nn.Module, blocks, prefetch: bool = True, embed=None):
        self.root = model
        self.embed = embed
        # a module of each layer's unit (FSDP unshards the whole unit through any of them)
        self.blocks = [u[0] if isinstance(u, list) else u for u in layer_units(model, blocks)]
        self.prefetch = prefetch
        self._unsharded: dict = {}     # unit -> None (unsharded) or a pending async handle
        self._callback_queued = False
        self.log: Optional[list] = None  # tests: ("unshard" | "reshard", unit, "forward" | "backward")

    # -- units -----------------------------------------------------------------------
    def _module(self, unit):
        if unit == "embed":
            return self.embed
        return self.root if unit is None else self.blocks[unit]

    def _record(self, what, unit, phase):
        if self.log is not None:
            self.log.append((what, unit, phase))

    def _ensure(self, unit, phase) -> None:
        handle = self._unsharded.get(unit)
        if handle is not None:
            handle.wait()
        # (a no-op when FSDP has the unit unsharded already; called anyway,
        # since FSDP's own hooks, in the model's plain forward, may have
        # resharded a unit this object still counts as unsharded)
        self._module(unit).unshard()
        if unit not in self._unsharded or handle is not None:
            self._record("unshard", unit, phase)
        self._unsharded[unit] = None

    def _start(self, unit, phase) -> None:
        """Prefetch: start the unit's all-gather without waiting for it."""
        if not self.prefetch or unit in self._unsharded:
            return
        self._unsharded[unit] = self._module(unit).unshard(async_op=True)
        self._record("prefetch", unit, phase)

    def _reshard(self, unit, phase) -> None:
        handle = self._unsharded.pop(unit, "absent")
        if handle == "absent":
            return
        if handle is not None:  # a prefetch never used: finish it before freeing
            handle.wait()
        self._module(unit).reshard()
        self._record("reshard", unit, phase)

    def _keep_only(self, keep, phase) -> None:
        for unit in [u for u in self._unsharded if u not in keep]:
            self._reshard(unit, phase)

    def reshard_all(self) -> None:
        for unit in list(self._unsharded):
            self._reshard(unit, "end")

    # -- forward -----------------------------------------------------------------------
    def enter(self, position: int) -> None:
        """Before the forward uses a unit's weights: unshard it, prefetch the
        next. `position`: -1 the embedding (root), 0 .. L - 1 the blocks, L
        the final reader (root)."""
        unit = self._unit(position)
        nxt = self._unit(position + 1) if position + 1 <= len(self.blocks) else unit
        # anything else still unsharded (a forward that stopped early: the
        # writers' outputs for mean ablation end before the final reader) goes
        self._keep_only({unit, nxt}, "forward")
        self._ensure(unit, "forward")
        if nxt != unit:
            self._start(nxt, "forward")

    def leave(self, position: int) -> None:
        """After the forward's last use of the unit's weights."""
        self._reshard(self._unit(position), "forward")

    def _unit(self, position: Optional[int]):
        """The FSDP unit of a position: a block's index, "embed", or None for the root."""
        if position is not None and position < 0 and self.embed is not None:
            return "embed"
        if position is None or position < 0 or position >= len(self.blocks):
            return None
        return position

    # -- backward ------------------------------------------------------------------------
    def gate(self, layer: Optional[int], outputs):
        """A gradient hook on each output of a reader region that needs a
        gradient: it unshards the region's unit before the region's backward
        runs (`outputs` is returned unchanged)."""
        tensors = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for t in tensors:
            if isinstance(t, Tensor) and t.requires_grad and t.grad_fn is not None:
                t.register_hook(self._hook(layer))
        return outputs

    def _hook(self, layer):
        def hook(grad):
            self._backward_enter(layer)
            return None
        return hook

    def _backward_enter(self, position: Optional[int]) -> None:
        """The backward reached a region of `position` (None: the final
        reader): unshard its unit, prefetch the unit before it, reshard the rest."""
        unit = self._unit(position)
        if not self._callback_queued:
            # the engine runs this when the whole backward is done: reshard the last units
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._callback_queued = True
        before = [len(self.blocks) - 1] if unit is None else ([unit - 1] if unit > 0 else [])
        before = [b for b in before if b >= 0]
        self._keep_only({unit, *before}, "backward")
        self._ensure(unit, "backward")
        for b in before:
            self._start(b, "backward")

    def _backward_done(self) -> None:
        self._callback_queued = False
        self.reshard_all()


def shard_edge_model(em, *, prefetch: bool = True):
    """Shard `em`'s frozen model with FSDP2 (module docstring) and make its
    layer loop drive the units; returns `em`. A model already sharded
    (`load_sharded`) keeps its shards."""
    model = em.model
    blocks = em.adapter.blocks
    embeddings = embedding_unit(em.adapter)
    if not is_fsdp_module(model):
        shard_model(model, blocks, embeddings=embeddings)
    else:
        _lazy_init_root(model)
    if embeddings is not None and not is_fsdp_module(embeddings[0]):
        embeddings = None  # sharded elsewhere with the embeddings in the root
    em._weights = FSDPWeights(model, blocks, prefetch=prefetch, embed=embeddings and embeddings[0])
    return em


def load_for_command_line(args, device, check_folder, load_tokenizer):
    """`fastedge prune --model M --shard fsdp` (not the shipped or a Tracr
    model): `load_sharded` in the run's dtype (--bf16), and the tokenizer.
    Returns (model, tokenizer or None, why none)."""
    from fastedge.cli_errors import CliError, one_line
    check_folder(args.model)
    try:
        model = load_sharded(args.model, dtype=torch.bfloat16 if args.bf16 else None, device=device)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot load model {args.model!r} shard by shard: {one_line(str(exc))}") from None
    tokenizer, no_tokenizer = load_tokenizer(args.model)
    return model, tokenizer, no_tokenizer


def check_command_line(args) -> None:
    """`fastedge prune --shard fsdp` runs under torchrun (an initialised
    process group); refused otherwise, before the model loads."""
    import torch.distributed as dist
    from fastedge.cli_errors import CliError
    if not (dist.is_available() and dist.is_initialized()):
        raise CliError(f"--shard {args.shard} shards the model over the ranks of a torchrun launch: run "
                       f"torchrun --nproc_per_node N -m fastedge.cli prune ... --shard {args.shard}")


def load_sharded(name_or_path: str, *, dtype: Optional[torch.dtype] = None, device=None, mesh=None,
                 attn_implementation: str = "eager") -> nn.Module:
    """A Hugging Face causal LM whose parameters each rank holds only as its
    FSDP2 shards, never whole: the model is built on the ``meta`` device,
    sharded (`shard_model`: the units `shard_edge_model` uses), its shards
    allocated on `device` (default: cuda:LOCAL_RANK where CUDA is, else
    the CPU), and each rank reads its rows of every tensor from the
    checkpoint's safetensors files with `torch.distributed.checkpoint`
    (`HuggingFaceStorageReader`, which reads slices). The non-persistent
    buffers (rotary frequencies), which the meta device leaves empty, are
    recomputed by transformers' own initialisation (`_init_weights`, what
    `from_pretrained` does for them). `name_or_path`: a local folder saved
    with `save_pretrained` (safetensors), or a Hub name (downloaded first
    with huggingface_hub). Every rank calls it (it is collective)."""
    import os
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastedge.adapters import Adapter
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download
        folder = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors"]))
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} has no .safetensors files: sharded loading reads safetensors checkpoints "
                         f"(save the model with save_pretrained(..., safe_serialization=True))")
    if device is None:
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                  else torch.device("cpu"))
    config = AutoConfig.from_pretrained(folder)
    if dtype is None:  # the checkpoint's own, as from_pretrained takes it
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval().requires_grad_(False)
    adapter = Adapter(model)
    if mesh is None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("load_sharded needs an initialised process group (torchrun, then "
                               "fastedge.distributed.init_from_env())")
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    reader = dcp.HuggingFaceStorageReader(str(folder))
    # model key -> file key (before sharding: transformers looks the renames up by the model's class)
    stored_as = _stored_names(model, reader.read_metadata().state_dict_metadata)
    shard_model(model, adapter.blocks, mesh, embeddings=embedding_unit(adapter), bare=True)
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():  # modules that own buffers and no parameters: rotary embeddings
            if next(module.buffers(recurse=False), None) is not None and \
                    next(module.parameters(recurse=False), None) is None:
                model._init_weights(module)
    state = {stored_as[key]: tensor for key, tensor in model.state_dict().items() if key in stored_as}
    names = {}  # each parameter's names: a tied one (GPT-2's unembedding) is stored under one of them
    for key, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(key)
    missing = [keys[0] for keys in names.values() if not any(k in stored_as for k in keys)]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} of the model's tensors "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    dcp.load(state, storage_reader=reader)
    _lazy_init_root(model)
    return model


def _stored_names(model: nn.Module, stored) -> dict:
    """{model key: the key the checkpoint stores it under}. transformers
    renames some keys on loading (GPT-NeoX's ``embed_out`` is the model's
    ``lm_head``): its own renaming table (`get_model_conversion_mapping`)
    is applied to the stored keys. Conversions other than renames (tensors
    split or merged on loading) are not supported here."""
    import re
    renames = []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # an older transformers: checkpoint keys are the model's
        transforms = []
    else:
        transforms = get_model_conversion_mapping(model)
    for t in transforms:
        if not isinstance(t, WeightRenaming):
            raise ValueError(f"sharded loading cannot convert {type(model).__name__}'s checkpoint "
                             f"({type(t).__name__} {t.source_patterns} -> {t.target_patterns})")
        renames += [(src, t.target_patterns[0]) for src in t.source_patterns]
    out = {}
    for key in stored:
        name = key
        for src, dst in renames:
            name = re.sub(src, dst, name)
        out[name] = key
    return out
