"""From a compiled Tracr model (`AssembledTransformerModel`) to a
`TracrForCausalLM`, and the `TracrModel` bundle a user works with: the model,
its input encoding and output decoding, and what the program is.

Weights are copied as they are (float32, as Tracr computes): Haiku's linear
weights ``[in, out]`` become PyTorch's ``[out, in]``; the head-major layouts
of the query, key, value and output projections are the ones PyTorch's
per-head views expect. The unembedding is not a parameter in Tracr (it is
the projection onto the output space, built inside the Haiku module); it is
read by applying that module to the identity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from fastedge.tracr.modeling import TracrConfig, TracrForCausalLM


class TracrConversionError(ValueError):
    """The object is not a compiled Tracr model this conversion understands."""


INSTALL_HINT = 'pip install -e ".[tracr]"'


def require_tracr(what: str = "this"):
    """Import Tracr's compiler (and JAX / Haiku, which it runs on) and return
    ``tracr.compiler.compiling``; without the ``tracr`` extra, raise an
    ImportError that says how to install it. Everything that compiles or
    converts goes through here, so the message is the same everywhere."""
    try:
        import haiku  # noqa: F401
        import jax  # noqa: F401
        from tracr.compiler import compiling
    except ImportError as e:
        raise ImportError(f"{what} needs Tracr, which could not be imported ({e}); install fastedge's "
                          f"tracr extra: {INSTALL_HINT}  (tracr-pypi, JAX, Haiku)") from e
    return compiling


@dataclass
class TracrModel:
    """A converted Tracr program: `model` (a `TracrForCausalLM`) and how to
    talk to it. ``input_vocab`` is the program's vocabulary (without BOS and
    PAD), ``max_seq_len`` the longest input it was compiled for (BOS not
    counted), ``categorical`` whether outputs are classes (`output_vocab`,
    decoded by argmax) or numbers (the single output value)."""
    model: TracrForCausalLM
    name: str = ""
    program: Any = field(default=None, repr=False)   # the RASP program, when known
    compiled: Any = field(default=None, repr=False)  # Tracr's AssembledTransformerModel, when known

    @property
    def config(self) -> TracrConfig:
        return self.model.config

    @property
    def categorical(self) -> bool:
        return self.config.categorical_output

    @property
    def bos(self) -> str:
        return self.config.bos_token

    @property
    def input_vocab(self) -> list:
        special = {self.config.bos_token, self.config.tracr_pad_token}
        return sorted((v for v in self.config.input_vocab if v not in special), key=_sort_key)

    @property
    def output_vocab(self) -> Optional[list]:
        return self.config.output_vocab

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def encode(self, tokens: Sequence) -> list[int]:
        """Token ids of ``[BOS, *tokens]`` (a leading BOS in `tokens` is kept
        as it is)."""
        tokens = list(tokens)
        if not tokens or tokens[0] != self.bos:
            tokens = [self.bos] + tokens
        index = {v: i for i, v in enumerate(self.config.input_vocab)}
        unknown = [t for t in tokens if t not in index]
        if unknown:
            raise ValueError(f"tokens {unknown} are not in this program's vocabulary {self.input_vocab}")
        if len(tokens) - 1 > self.max_seq_len:
            raise ValueError(f"{len(tokens) - 1} tokens is longer than this program's maximum of "
                             f"{self.max_seq_len}")
        return [index[t] for t in tokens]

    def decode(self, logits: torch.Tensor) -> list:
        """Outputs at every position of one sequence's logits [S, output_size]
        but BOS: classes of `output_vocab` (categorical) or floats."""
        logits = logits[1:]
        if self.categorical:
            return [self.output_vocab[i] for i in logits.argmax(-1).tolist()]
        return logits[:, 0].tolist()

    @torch.no_grad()
    def run(self, tokens: Sequence) -> list:
        """The program's outputs on `tokens` (BOS excluded), from the PyTorch model."""
        ids = torch.tensor([self.encode(tokens)], device=self.model.device)
        return self.decode(self.model(ids).logits[0])


def _sort_key(v):
    return (type(v).__name__, v)


def _array(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _unembedding(assembled, width: int) -> np.ndarray:
    """[D, output_size]: Tracr's projection onto the output space, read by
    applying its unembedding module to the identity."""
    import haiku as hk
    import jax.numpy as jnp

    @hk.without_apply_rng
    @hk.transform
    def project(x):
        return assembled.get_compiled_model().unembed(x, use_unembed_argmax=False)

    out = np.asarray(project.apply(assembled.params, jnp.eye(width, dtype=jnp.float32)[None]))[0]
    return out[:, None] if out.ndim == 1 else out   # a numerical output is squeezed to [D]


def _is_categorical(assembled) -> bool:
    from tracr.transformer import encoder
    return isinstance(assembled.output_encoder, encoder.CategoricalEncoder)


def _vocab_in_order(enc) -> list:
    return [v for v, _ in sorted(enc.encoding_map.items(), key=lambda kv: kv[1])]


def _label_name(label: str) -> str:
    """The RASP expression a residual direction belongs to ("length:3" -> "length")."""
    return label.split(":", 1)[0]


def writer_output_dims(model: TracrForCausalLM) -> dict[str, np.ndarray]:
    """Per writer (the names of docs/CONCEPTS.md), the residual dimensions it can write: the
    nonzero columns of its output map (embeddings: the embedding matrix; a
    head: W_V W_O; an MLP: W2 on the hidden units W1 feeds)."""
    cfg, t = model.config, model.transformer
    H, d = cfg.num_attention_heads, cfg.head_dim
    out = {"tok_embeds": _nonzero_cols(t.wte.weight), "pos_embeds": _nonzero_cols(t.wpe.weight)}
    for l, block in enumerate(t.h):
        att = block.self_attn
        wv = att.v_proj.weight.detach().view(H, d, -1)            # [H, d, D]
        wo = att.o_proj.weight.detach().t().reshape(H, d, -1)     # [H, d, D]
        bv = att.v_proj.bias.detach().view(H, d)
        bo = att.o_proj.bias.detach() != 0   # split across the heads (docs/CONCEPTS.md section 1)
        for h in range(H):
            ov = wv[h].t().double() @ wo[h].double()               # [D_in, D_out]
            writes = (ov != 0).any(0) | (bv[h].double() @ wo[h].double() != 0) | bo
            out[f"a{l}.h{h}"] = np.flatnonzero(writes.numpy())
        mlp = block.mlp
        fed = (mlp.fc1.weight.detach() != 0).any(1) | (mlp.fc1.bias.detach() != 0)   # hidden units with input
        w2 = mlp.fc2.weight.detach()[:, fed]                       # [D, hidden fed]
        out[f"m{l}"] = np.flatnonzero(((w2 != 0).any(1) | (mlp.fc2.bias.detach() != 0)).numpy())
    return out


def _nonzero_cols(weight: torch.Tensor) -> np.ndarray:
    return np.flatnonzero((weight.detach() != 0).any(0).numpy())


def _rasp_ops(program) -> dict[str, str]:
    """RASP label -> the kind of operation that computes it (Map, Aggregate,
    SelectorWidth, ...), for every expression of `program`."""
    if program is None:
        return {}
    from tracr.compiler import nodes, rasp_to_graph
    from tracr.rasp import rasp
    graph = rasp_to_graph.extract_rasp_graph(program).graph
    ops = {}
    for label, data in graph.nodes(data=True):
        expr = data.get(nodes.EXPR)
        if expr is not None:
            kind = type(expr).__name__
            if isinstance(expr, rasp.SOp):
                kind = ("numerical " if rasp.is_numerical(expr) else "categorical ") + kind
            ops[label] = kind
    return ops


def from_tracr(assembled, *, program=None, name: str = "") -> TracrModel:
    """Convert Tracr's compiled model (``compiling.compile_rasp_to_model``'s
    result) into a `TracrModel`. Pass the RASP `program` it was compiled
    from to have drawings name each block's operation."""
    for attr in ("params", "model_config", "residual_labels", "input_encoder", "output_encoder"):
        if not hasattr(assembled, attr):
            raise TracrConversionError(
                f"{type(assembled).__name__} is not a compiled Tracr model (no {attr!r}); pass the result "
                f"of tracr.compiler.compiling.compile_rasp_to_model")
    mc, params = assembled.model_config, assembled.params
    if getattr(mc, "layer_norm", False):
        raise TracrConversionError("Tracr models with layer norm are not supported (Tracr compiles without)")
    require_tracr("from_tracr")
    import jax
    if getattr(mc, "activation_function", jax.nn.relu) is not jax.nn.relu:
        raise TracrConversionError(f"only ReLU MLPs are supported, got {mc.activation_function}")
    if assembled.input_encoder is None or assembled.input_encoder.bos_token is None:
        raise TracrConversionError("the compiled model has no BOS token (compile with compiler_bos)")

    tok = _array(params["token_embed"]["embeddings"])
    pos = _array(params["pos_embed"]["embeddings"])
    D = tok.shape[1]
    if len(assembled.residual_labels) != D:
        raise TracrConversionError(f"{len(assembled.residual_labels)} residual labels for a residual "
                                   f"stream of width {D}")
    unembed = _unembedding(assembled, D)
    categorical = _is_categorical(assembled)
    first_mlp = params["transformer/layer_0/mlp/linear_1"]["w"]
    config = TracrConfig(
        vocab_size=tok.shape[0], n_positions=pos.shape[0], hidden_size=D,
        num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, head_dim=mc.key_size,
        intermediate_size=int(np.asarray(first_mlp).shape[1]), output_size=unembed.shape[1],
        causal=bool(mc.causal), categorical_output=categorical,
        input_vocab=_vocab_in_order(assembled.input_encoder),
        output_vocab=_vocab_in_order(assembled.output_encoder) if categorical else None,
        bos_token=assembled.input_encoder.bos_token, pad_token=assembled.input_encoder.pad_token,
        residual_labels=list(assembled.residual_labels), program_name=name,
        max_seq_len=pos.shape[0] - 1)
    model = TracrForCausalLM(config)
    sd = {"transformer.wte.weight": tok, "transformer.wpe.weight": pos, "lm_head.weight": unembed.T}
    for l in range(mc.num_layers):
        p = f"transformer/layer_{l}"
        for ours, theirs in (("self_attn.q_proj", "attn/query"), ("self_attn.k_proj", "attn/key"),
                             ("self_attn.v_proj", "attn/value"), ("self_attn.o_proj", "attn/linear"),
                             ("mlp.fc1", "mlp/linear_1"), ("mlp.fc2", "mlp/linear_2")):
            sd[f"transformer.h.{l}.{ours}.weight"] = _array(params[f"{p}/{theirs}"]["w"]).T
            sd[f"transformer.h.{l}.{ours}.bias"] = _array(params[f"{p}/{theirs}"]["b"])
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sd.items()}
    model.load_state_dict(state, strict=True)
    model.eval()

    ops = _rasp_ops(program)
    labels = {}
    for writer, dims in writer_output_dims(model).items():
        names = sorted({_label_name(config.residual_labels[i]) for i in dims})
        labels[writer] = [f"{n} ({ops[n]})" if n in ops else n for n in names]
    config.writer_labels = labels
    return TracrModel(model=model, name=name, program=program, compiled=assembled)


def compile_program(program, vocab, max_seq_len: int, *, name: str = "", causal: bool = False,
                    bos: str = "BOS", mlp_exactness: int = 100) -> TracrModel:
    """Compile a RASP program with Tracr and convert it (`from_tracr`)."""
    compiling = require_tracr("compile_program")
    assembled = compiling.compile_rasp_to_model(program, vocab=set(vocab), max_seq_len=max_seq_len,
                                                causal=causal, compiler_bos=bos,
                                                mlp_exactness=mlp_exactness)
    return from_tracr(assembled, program=program, name=name or getattr(program, "label", ""))
