"""The patched model against the naive float64 oracle (tests/naive_edge_model.py):
random masks, node masks, every gradient, every ablation, random circuits, and
the memory the backward pass keeps."""
import pytest
import torch

import fastedge
from fastedge import ops
from hf_float64 import hf_in_float64
from naive_edge_model import naive_edge_forward, naive_writer_outputs
from tiny_models import ARCHITECTURES, tiny_model, token_batch


@pytest.fixture(autouse=True)
def _float64_throughout():
    """The patched model runs Hugging Face's norm and rotary modules: make them
    compute in float64 so that the comparison with the oracle can be tight."""
    with hf_in_float64():
        yield


def _random_log_alphas(em, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in em.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 2 + 0.5)


def _oracle_masks(em, seed, training):
    """The masks the fused op draws, as a differentiable float64 function of
    the log_alphas: [n_readers, n_writers] edge masks and [n_writers] node masks."""
    g = em.graph
    rows = []
    for gi, group in enumerate(g.groups):
        la = em.edge_log_alpha[gi]
        u = ops.edge_noise(seed, group.n_readers, group.n_writers, group.first_reader, "cpu").double()
        z = ops.hard_concrete(la, training=training, u=u if training else None)
        rows.append(torch.nn.functional.pad(z, (0, g.n_writers - group.n_writers)))
    edge = torch.cat(rows)
    node = None
    if em.node_log_alpha is not None:
        u = ops.node_noise(seed, g.n_writers, "cpu").double()
        node = ops.hard_concrete(em.node_log_alpha, training=training, u=u if training else None)
    return edge, node


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_masks_logits_and_gradients_match_oracle(arch, training):
    model = tiny_model(arch, dtype=torch.float64)
    ids, cids = token_batch(batch=2, seq=6)
    em = fastedge.patch(model)
    _random_log_alphas(em, seed=3)
    em.train(training)
    seed = 12345
    out = em(ids, cids, seed=seed)
    weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss = (out.logits * weights).sum() + 3.0 * out.edge_mask_sum + 2.0 * out.node_mask_sum
    loss.backward()
    grads = [p.grad.clone() for p in em.parameters()]

    em.zero_grad()
    edge, node = _oracle_masks(em, seed, training)
    logits = naive_edge_forward(model, em.graph, ids, cids, edge, node)
    assert torch.allclose(out.logits.detach(), logits.detach(), atol=1e-10, rtol=1e-9)
    live = torch.cat([torch.nn.functional.pad(torch.ones(gr.n_readers, gr.n_writers, dtype=torch.float64),
                                              (0, em.graph.n_writers - gr.n_writers)) for gr in em.graph.groups])
    oracle_loss = (logits * weights).sum() + 3.0 * (edge * live).sum() + 2.0 * node.sum()
    oracle_loss.backward()
    for got, p in zip(grads, em.parameters()):
        assert torch.allclose(got, p.grad, atol=1e-9, rtol=1e-7), f"max error {(got - p.grad).abs().max()}"


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "neox-parallel"])
def test_recomputed_readers_give_identical_gradients(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids, cids = token_batch()
    grads = []
    for recompute in (False, True):
        em = fastedge.patch(model, recompute_readers=recompute)
        _random_log_alphas(em, seed=8)
        em.train()
        out = em(ids, cids, seed=2)
        (out.logits.pow(2).sum() + out.edge_mask_sum).backward()
        grads.append([p.grad for p in em.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "neox-sequential"])
def test_zero_ablation_matches_oracle(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids, _ = token_batch()
    em = fastedge.patch(model, ablation="zero")
    _random_log_alphas(em, seed=4)
    em.eval()
    out = em(ids)
    edge, node = _oracle_masks(em, 0, False)
    ref = naive_edge_forward(model, em.graph, ids, None, edge, node, ablation="zero")
    assert torch.allclose(out.logits.detach(), ref.detach(), atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "neox-parallel"])
def test_mean_ablation_matches_oracle(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids, _ = token_batch(batch=2, seq=6, seed=2)
    reference_ids, _ = token_batch(batch=5, seq=6, seed=3)
    em = fastedge.patch(model, ablation="mean")
    means = em.compute_mean_outputs(reference_ids)
    oracle_means = naive_writer_outputs(model, em.graph, reference_ids).mean(dim=1)
    assert torch.allclose(means, oracle_means, atol=1e-10)
    _random_log_alphas(em, seed=6)
    em.train()
    out = em(ids, seed=9)
    edge, node = _oracle_masks(em, 9, True)
    ref = naive_edge_forward(model, em.graph, ids, None, edge, node, ablation="mean", mean_outputs=means)
    assert torch.allclose(out.logits.detach(), ref.detach(), atol=1e-10)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padding_with_random_masks(padding):
    model = tiny_model("llama-gqa", dtype=torch.float64)
    ids, cids = token_batch(batch=2, seq=8)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    em = fastedge.patch(model)
    _random_log_alphas(em, seed=1)
    em.eval()
    out = em(ids, cids, attention_mask=mask).logits
    edge, node = _oracle_masks(em, 0, False)
    ref = naive_edge_forward(model, em.graph, ids, cids, edge, node, attention_mask=mask)
    keep = mask.bool()
    assert torch.allclose(out[keep].detach(), ref[keep].detach(), atol=1e-10)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_circuit_matches_oracle_under_the_same_01_masks(arch):
    model = tiny_model(arch, dtype=torch.float64)
    ids, cids = token_batch()
    em = fastedge.patch(model)
    g = em.graph
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(g.n_edges, generator=gen) < 0.4
    edges = [e for e, k in zip(g.edges(), keep.tolist()) if k]
    nodes = [w for w in g.writers if torch.rand(1, generator=gen).item() < 0.8]
    em.set_circuit(edges, nodes)
    with torch.no_grad():
        out = em(ids, cids).logits
    edge = torch.zeros(g.n_readers, g.n_writers, dtype=torch.float64)
    for w, r in edges:
        edge[g.reader_index[r], g.writer_index[w]] = 1
    node = torch.zeros(g.n_writers, dtype=torch.float64)
    node[[g.writer_index[w] for w in nodes]] = 1
    ref = naive_edge_forward(model, g, ids, cids, edge, node)
    assert torch.allclose(out, ref, atol=1e-10)


# -- memory (docs/CONCEPTS.md section 5) --------------------------------------------------------

def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for the backward during fn()."""
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _fastedge_step_bytes(model, ids, cids):
    em = fastedge.patch(model, recompute_readers=True)
    em.train()

    def step():
        out = em(ids, cids, seed=1)
        return out.logits.sum() + out.edge_mask_sum
    n = _saved_bytes(step)
    # The stack and its gradient buffer live on the autograd context outside
    # saved_tensors_hooks (the in-place stack protocol): count them too.
    B, S = ids.shape
    hidden = model.config.hidden_size
    n += 2 * em.graph.n_writers * B * S * hidden * torch.finfo(torch.float64).bits // 8
    em.unpatch()
    return n


def _naive_step_bytes(model, ids, cids):
    g = fastedge.EdgeGraph.from_config(model.config)
    edge = torch.full((g.n_readers, g.n_writers), 0.9, dtype=torch.float64, requires_grad=True)
    node = torch.full((g.n_writers,), 0.9, dtype=torch.float64, requires_grad=True)
    return _saved_bytes(lambda: naive_edge_forward(model, g, ids, cids, edge, node).sum())


def _gpt2(n_layer):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=n_layer, n_head=4, n_embd=32, vocab_size=29, n_positions=16)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).double().eval()


def test_saved_bytes_at_twelve_layers_at_most_a_fifth_of_naive():
    model = _gpt2(12)
    ids, cids = torch.randint(0, 29, (2, 12)), torch.randint(0, 29, (2, 12))
    ours, naive = _fastedge_step_bytes(model, ids, cids), _naive_step_bytes(model, ids, cids)
    print(f"saved for backward at 12 layers: fastedge {ours} B, naive {naive} B, ratio {ours / naive:.4f}")
    assert ours <= naive / 5


def test_saved_bytes_grow_linearly_for_fastedge_and_faster_for_naive():
    ids, cids = torch.randint(0, 29, (2, 12)), torch.randint(0, 29, (2, 12))
    ours, naive = {}, {}
    for n_layer in (2, 4, 8):
        model = _gpt2(n_layer)
        ours[n_layer] = _fastedge_step_bytes(model, ids, cids)
        naive[n_layer] = _naive_step_bytes(model, ids, cids)
    # equal increments per added layer (linear), up to the small mask tensors
    step_a = ours[4] - ours[2]
    step_b = (ours[8] - ours[4]) / 2
    assert abs(step_b - step_a) <= 0.15 * step_a, ours
    # the naive design's increments grow with depth
    assert (naive[8] - naive[4]) / 2 > 1.5 * (naive[4] - naive[2]), naive


def test_sliding_window_attention_matches_oracle():
    from transformers import MistralConfig, MistralForCausalLM
    config = MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           hidden_size=16, intermediate_size=21, vocab_size=37, sliding_window=3)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = MistralForCausalLM(config).double().eval()
    ids, cids = token_batch(batch=2, seq=8)
    em = fastedge.patch(model)
    _random_log_alphas(em, seed=2)
    em.eval()
    out = em(ids, cids).logits
    edge, node = _oracle_masks(em, 0, False)
    ref = naive_edge_forward(model, em.graph, ids, cids, edge, node)
    assert torch.allclose(out.detach(), ref.detach(), atol=1e-10)
    em.set_circuit(em.graph.edges())
    with torch.no_grad():
        assert torch.allclose(em(ids, cids).logits, model(ids).logits, atol=1e-10)
