"""Checks of the naive float64 oracle (`tests/naive_edge_model.py`) against
Hugging Face models with tiny random-weight configs.

The Hugging Face models run in float64 (`model.double()` on a copy), but some
of their code rounds through float32 whatever the model's dtype: RMSNorm
(`hidden_states.to(torch.float32)`), the eager attention softmax of the rotary
models (`softmax(..., dtype=torch.float32)`) and the rotary cos/sin (inverse
frequencies and angles computed in float32). Under `hf_in_float64()` those
three places compute in float64 instead (the same formulas, only without the
float32 rounding), so that the oracle can be compared to ~1e-12. Without it the
difference is ~1e-7, and a left-padded batch gives NaN everywhere (the float64
mask minimum becomes -inf in float32, a fully masked row's softmax is NaN, and
the NaN reaches every position through the masked keys); one test checks the
unpatched model too, loosely and without padding.

Besides the all-ones / all-zeros checks, activation patching with forward hooks
on the Hugging Face modules checks single writers (all of a writer's out-edges
cut = its output replaced by the corrupted run's) and single readers (all of a
reader's in-edges cut = its projection computed from the corrupted residual),
which pins down head slicing, the GPT-NeoX fused q/k/v layout and which query
heads share a grouped k/v reader.
"""
import contextlib
import copy
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from naive_edge_model import (  # noqa: E402
    naive_edge_forward, naive_writer_outputs, position_ids_from_attention_mask)
from fastedge.graph import EdgeGraph  # noqa: E402

transformers = pytest.importorskip("transformers")

F64 = torch.float64
VOCAB = 53
B, S = 2, 7
TOL = 1e-10          # float64 oracle vs float64 Hugging Face, relative to max(1, |logits|)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny float64 matmuls on a busy CPU: OpenMP threads only add contention
    # (seen here: 1 s instead of 20 ms per forward pass with 2 threads).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _configs():
    T = transformers
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    rot = dict(common, hidden_size=24, intermediate_size=40, num_attention_heads=4)
    return {
        "gpt2": T.GPT2Config(n_positions=32, n_embd=24, n_layer=2, n_head=3, n_inner=40, **common),
        "llama": T.LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, rope_theta=500.0, **rot),
        "mistral": T.MistralConfig(num_hidden_layers=2, num_key_value_heads=2, sliding_window=4, **rot),
        "qwen2": T.Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, **rot),
        "qwen2_window": T.Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, use_sliding_window=True,
                                      sliding_window=3, max_window_layers=1, **rot),
        "neox_parallel": T.GPTNeoXConfig(num_hidden_layers=2, rotary_pct=0.5, use_parallel_residual=True,
                                         **dict(common, hidden_size=40, intermediate_size=56,
                                                num_attention_heads=5)),   # rotary dim 4
        "neox_sequential": T.GPTNeoXConfig(num_hidden_layers=2, rotary_pct=0.5, use_parallel_residual=False,
                                           hidden_act="gelu_new", **rot),   # rotary dim 3 (odd)
    }


ARCHS = list(_configs())
WINDOWED = {"mistral", "qwen2_window"}


_MODELS = {}


def make_model(arch):
    """A tiny random model (float32, as users hold them) and its graph. The
    weights get extra noise so that biases and norm weights are not 0 and 1."""
    if arch not in _MODELS:
        torch.manual_seed(sum(map(ord, arch)))
        model = transformers.AutoModelForCausalLM.from_config(_configs()[arch], attn_implementation="eager")
        model.eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        _MODELS[arch] = (model, EdgeGraph.from_config(model.config))
    return _MODELS[arch]


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, S), generator=g), torch.randint(0, VOCAB, (B, S), generator=g)


def make_padding(kind):
    if kind is None:
        return None
    mask = torch.ones(B, S, dtype=torch.long)
    if kind == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    else:
        mask[0, 4:] = 0
        mask[1, 6:] = 0
    return mask


# -- Hugging Face in float64 -----------------------------------------------------

from hf_float64 import hf_in_float64  # noqa: E402


def hf_double(model):
    return copy.deepcopy(model).double().eval()


@torch.no_grad()
def hf_logits(model64, ids, attention_mask=None, exact=True):
    kwargs = {}
    if attention_mask is not None:
        kwargs = dict(attention_mask=attention_mask,
                      position_ids=position_ids_from_attention_mask(attention_mask))
    with hf_in_float64() if exact else contextlib.nullcontext():
        return model64(ids, **kwargs).logits


def assert_close(got, expected, attention_mask=None, tol=TOL, what=""):
    assert got.dtype == F64 and got.shape == expected.shape
    assert torch.isfinite(got).all(), f"{what}: non-finite oracle output"
    keep = torch.ones(got.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    got, expected = got[keep], expected[keep]
    scale = max(1.0, expected.abs().max().item())
    err = (got - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def masks(graph, value):
    return torch.full((graph.n_readers, graph.n_writers), float(value), dtype=F64)


# -- all ones, all zeros ------------------------------------------------------------

@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_and_all_zeros_match_hugging_face(arch, padding):
    model, graph = make_model(arch)
    ids, cids = make_inputs()
    am = make_padding(padding)
    model64 = hf_double(model)
    ones = naive_edge_forward(model, graph, ids, cids, masks(graph, 1), attention_mask=am)
    assert_close(ones, hf_logits(model64, ids, am), am, what="all edge masks 1 vs clean model")
    zeros = naive_edge_forward(model, graph, ids, cids, masks(graph, 0), attention_mask=am)
    assert_close(zeros, hf_logits(model64, cids, am), am, what="all edge masks 0 vs corrupted model")
    # node masks: all 0 with every edge on also gives the corrupted run
    off = naive_edge_forward(model, graph, ids, cids, masks(graph, 1),
                             node_mask=torch.zeros(graph.n_writers, dtype=F64), attention_mask=am)
    assert_close(off, zeros, am, what="all node masks 0")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox_parallel"])
def test_unpatched_hugging_face_agrees_to_float32_rounding(arch):
    model, graph = make_model(arch)
    ids, cids = make_inputs(1)
    got = naive_edge_forward(model, graph, ids, cids, masks(graph, 1))
    assert_close(got, hf_logits(hf_double(model), ids, exact=False), tol=1e-5, what="vs unpatched float64 model")


def test_graph_must_describe_the_model():
    model, _ = make_model("llama")
    wrong = EdgeGraph(n_layers=3, n_heads=4, n_kv_heads=4)
    ids, cids = make_inputs()
    with pytest.raises(ValueError, match="does not describe"):
        naive_edge_forward(model, wrong, ids, cids, masks(wrong, 1))


# -- padding ---------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "neox_parallel"])
def test_padding_does_not_change_real_tokens_under_random_masks(arch, side):
    """A padded example's real-token logits equal the unpadded example's, under
    the same fractional edge and node masks (positions skip the padding). Not
    for left padding with a sliding window: Hugging Face counts the window in
    indices, pads included."""
    if side == "left" and arch in WINDOWED:
        pytest.skip("sliding window counts padded indices")
    model, graph = make_model(arch)
    g = torch.Generator().manual_seed(3)
    n = 5
    ids, cids = torch.randint(0, VOCAB, (1, n), generator=g), torch.randint(0, VOCAB, (1, n), generator=g)
    edge = torch.rand(graph.n_readers, graph.n_writers, generator=g, dtype=F64)
    node = torch.rand(graph.n_writers, generator=g, dtype=F64)
    alone = naive_edge_forward(model, graph, ids, cids, edge, node_mask=node)
    pad = torch.full((1, 2), 0, dtype=torch.long)
    cat = (lambda p, x: torch.cat([p, x], 1)) if side == "left" else (lambda p, x: torch.cat([x, p], 1))
    am = cat(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, n, dtype=torch.long))
    padded = naive_edge_forward(model, graph, cat(pad + 7, ids), cat(pad + 11, cids), edge,
                                node_mask=node, attention_mask=am)
    assert torch.isfinite(padded).all()
    assert_close(padded[am.bool()].view(1, n, -1), alone, what="padded vs unpadded")


def test_position_ids_from_attention_mask():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert position_ids_from_attention_mask(am).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]


# -- zero and mean ablation ----------------------------------------------------------------

def _final_norm_and_unembed(model64):
    norm, _ = _site(model64, None, "final_norm")
    return lambda x: model64.get_output_embeddings()(norm(x))


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "neox_sequential"])
def test_zero_ablation_with_no_edges_sees_only_zeros(arch):
    model, graph = make_model(arch)
    ids, cids = make_inputs()
    got = naive_edge_forward(model, graph, ids, cids, masks(graph, 0), ablation="zero")
    # every reader reads 0: resid_post reads 0, so the logits are the final
    # norm of 0 (its bias for LayerNorm, 0 for RMSNorm) through the unembedding
    with torch.no_grad():
        expected = _final_norm_and_unembed(hf_double(model))(torch.zeros(B, S, model.config.hidden_size, dtype=F64))
    assert_close(got, expected, what="zero ablation, no edges")
    other = naive_edge_forward(model, graph, cids, ids, masks(graph, 0), ablation="zero")
    assert_close(other, got, what="independent of the input")
    # with all edges on, zero ablation is the clean model
    full = naive_edge_forward(model, graph, ids, None, masks(graph, 1), ablation="zero")
    assert_close(full, hf_logits(hf_double(model), ids), what="zero ablation, all edges")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mean_ablation(arch):
    model, graph = make_model(arch)
    ids, cids = make_inputs()
    g = torch.Generator().manual_seed(5)
    edge = torch.rand(graph.n_readers, graph.n_writers, generator=g, dtype=F64)
    # means taken from one corrupted example = interchange with that example everywhere
    ref = cids[:1]
    mean = naive_writer_outputs(model, graph, ref)[:, 0]                  # [W, S, D]
    assert mean.shape == (graph.n_writers, S, model.config.hidden_size)
    got = naive_edge_forward(model, graph, ids, None, edge, ablation="mean", mean_outputs=mean)
    expected = naive_edge_forward(model, graph, ids, ref.expand(B, S), edge)
    assert_close(got, expected, what="mean of one example vs interchange")
    # no edges: the readers see the sum of the means, the reference example's residual
    none = naive_edge_forward(model, graph, ids, None, masks(graph, 0), ablation="mean", mean_outputs=mean)
    assert_close(none, hf_logits(hf_double(model), ref).expand(B, S, -1), what="mean ablation, no edges")
    # a [W, D] mean is the same at every position
    flat = mean.mean(1)
    a = naive_edge_forward(model, graph, ids, None, edge, ablation="mean", mean_outputs=flat)
    b = naive_edge_forward(model, graph, ids, None, edge, ablation="mean",
                           mean_outputs=flat[:, None].expand(-1, S, -1))
    assert_close(a, b, what="[W, D] mean")


def test_non_edges_are_ignored():
    model, graph = make_model("neox_parallel")
    ids, cids = make_inputs()
    g = torch.Generator().manual_seed(6)
    edge = torch.rand(graph.n_readers, graph.n_writers, generator=g, dtype=F64)
    junk = edge.clone()
    for r in range(graph.n_readers):
        junk[r, graph.reader_prefix[r]:] = 123.0
    assert_close(naive_edge_forward(model, graph, ids, cids, junk),
                 naive_edge_forward(model, graph, ids, cids, edge), what="non-edge entries")


def test_node_mask_equals_the_same_mask_on_every_out_edge():
    model, graph = make_model("qwen2")
    ids, cids = make_inputs()
    node = torch.rand(graph.n_writers, generator=torch.Generator().manual_seed(7), dtype=F64)
    a = naive_edge_forward(model, graph, ids, cids, masks(graph, 1), node_mask=node)
    b = naive_edge_forward(model, graph, ids, cids, node.expand(graph.n_readers, -1).clone())
    assert_close(a, b, what="node mask vs edge masks")


def test_gradients_flow_to_the_masks():
    model, graph = make_model("llama")
    ids, cids = make_inputs()
    g = torch.Generator().manual_seed(8)
    base = torch.rand(graph.n_readers, graph.n_writers, generator=g, dtype=F64)
    node = torch.rand(graph.n_writers, generator=g, dtype=F64)
    picks = [(graph.reader_index["a1.h3.q"], graph.writer_index["a0.h1"]),
             (graph.reader_index["a2.h1.k"], graph.writer_index["m1"]),
             (graph.reader_index["resid_post"], graph.writer_index["embeds"])]

    def f(values, node):
        edge = base.clone()
        for (r, w), v in zip(picks, values):
            edge[r, w] = v
        return naive_edge_forward(model, graph, ids, cids, edge, node_mask=node).sum(-1).tanh().sum()

    values = torch.tensor([base[r, w] for r, w in picks], dtype=F64, requires_grad=True)
    node = node.requires_grad_()
    assert torch.autograd.gradcheck(f, (values, node), eps=1e-6, atol=1e-6)


# -- activation patching through the Hugging Face modules --------------------------------------

def _site(model, layer, kind):
    """(module, "input" or "output"): where a writer's output or a reader's
    projection lives in the Hugging Face model."""
    arch_type = model.config.model_type
    if kind == "tok":
        return model.get_input_embeddings(), "output"
    if kind == "final_norm":
        base = model.base_model
        return getattr(base, {"gpt2": "ln_f", "gpt_neox": "final_layer_norm"}.get(arch_type, "norm")), "output"
    if arch_type == "gpt2":
        blk = model.transformer.h[layer]
        table = dict(o=(blk.attn.c_proj, "input"), qkv=(blk.attn.c_attn, "output"),
                     mlp=(blk.mlp, "output"), mlp_norm=(blk.ln_2, "output"))
    elif arch_type == "gpt_neox":
        blk = model.gpt_neox.layers[layer]
        table = dict(o=(blk.attention.dense, "input"), qkv=(blk.attention.query_key_value, "output"),
                     mlp=(blk.mlp, "output"), mlp_norm=(blk.post_attention_layernorm, "output"))
    else:
        blk = model.model.layers[layer]
        table = dict(o=(blk.self_attn.o_proj, "input"), q=(blk.self_attn.q_proj, "output"),
                     k=(blk.self_attn.k_proj, "output"), v=(blk.self_attn.v_proj, "output"),
                     mlp=(blk.mlp, "output"), mlp_norm=(blk.post_attention_layernorm, "output"))
    return table[kind]


def _reader_columns(model, reader):
    """(site kind, column slice) of a q/k/v reader's projection output."""
    cfg, arch_type = model.config, model.config.model_type
    head, kind = int(reader.split(".")[1][1:]), reader.split(".")[2]
    D, H = cfg.hidden_size, cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or D // H
    if arch_type == "gpt2":                       # [q | k | v], each head by head
        start = "qkv".index(kind) * D + head * d
        return "qkv", slice(start, start + d)
    if arch_type == "gpt_neox":                   # head by head, each [q_h | k_h | v_h]
        start = head * 3 * d + "qkv".index(kind) * d
        return "qkv", slice(start, start + d)
    return kind, slice(head * d, (head + 1) * d)  # separate q_proj / k_proj / v_proj


@torch.no_grad()
def hf_patched(model64, ids, cids, module, where, cols):
    """Logits on `ids` with `module`'s input or output columns `cols` replaced
    by their values on `cids`."""
    saved = {}

    def grab(mod, args, out=None):
        saved["x"] = (args[0] if where == "input" else out).clone()

    def put(mod, args, out=None):
        x = (args[0] if where == "input" else out).clone()
        x[..., cols] = saved["x"][..., cols]
        return (x,) + tuple(args[1:]) if where == "input" else x

    reg = module.register_forward_pre_hook if where == "input" else module.register_forward_hook
    with hf_in_float64():
        handle = reg(grab)
        model64(cids)
        handle.remove()
        handle = reg(put)
        try:
            return model64(ids).logits
        finally:
            handle.remove()


def _patching_cases(arch):
    model, graph = make_model(arch)
    cfg = model.config
    H = graph.n_heads
    last = graph.n_layers - 1
    d = (getattr(cfg, "head_dim", None) or cfg.hidden_size // H)
    writers = [(graph.writers[0], "tok", None, slice(None)),
               (f"a0.h{H - 1}", "o", 0, slice((H - 1) * d, H * d)),
               (f"a{last}.h1", "o", last, slice(d, 2 * d)),
               ("m0", "mlp", 0, slice(None))]
    readers = [(f"a{last}.h{H - 1}.q", None, last), (f"a{last}.h{graph.n_kv_heads - 1}.k", None, last),
               (f"a{last}.h0.v", None, last), (f"a{last}.h0.k", None, last),
               (f"m{last}", "mlp_norm", last), ("resid_post", "final_norm", None)]
    return writers, readers


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "neox_parallel", "neox_sequential"])
def test_cutting_a_writer_or_reader_is_activation_patching(arch):
    model, graph = make_model(arch)
    model64 = hf_double(model)
    ids, cids = make_inputs(2)
    clean = hf_logits(model64, ids)
    writers, readers = _patching_cases(arch)
    for writer, kind, layer, cols in writers:
        # all out-edges of the writer cut: its output is the corrupted run's
        edge = masks(graph, 1)
        edge[:, graph.writer_index[writer]] = 0
        got = naive_edge_forward(model, graph, ids, cids, edge)
        module, where = _site(model64, layer, kind)
        expected = hf_patched(model64, ids, cids, module, where, cols)
        assert (expected - clean).abs().max() > 1e-6, f"patching {writer} changes nothing: a useless check"
        assert_close(got, expected, what=f"writer {writer} cut")
        node = torch.ones(graph.n_writers, dtype=F64)
        node[graph.writer_index[writer]] = 0
        assert_close(naive_edge_forward(model, graph, ids, cids, masks(graph, 1), node_mask=node),
                     expected, what=f"writer {writer} node mask 0")
    for reader, kind, layer in readers:
        # all in-edges of the reader cut: it reads the corrupted residual
        edge = masks(graph, 1)
        edge[graph.reader_index[reader]] = 0
        got = naive_edge_forward(model, graph, ids, cids, edge)
        cols = slice(None)
        if kind is None:
            kind, cols = _reader_columns(model, reader)
        module, where = _site(model64, layer, kind)
        expected = hf_patched(model64, ids, cids, module, where, cols)
        assert (expected - clean).abs().max() > 1e-6, f"patching {reader} changes nothing: a useless check"
        assert_close(got, expected, what=f"reader {reader} cut")
