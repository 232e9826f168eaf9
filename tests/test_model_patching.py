"""Patching native Hugging Face models: exact checks that need no oracle."""
import pytest
import torch

import fastedge
from fastedge.architectures import UnsupportedArchitectureError
from tiny_models import ARCHITECTURES, VOCAB, WIDE, tiny_model, token_batch


def _hf_logits(model, ids, attention_mask=None):
    kwargs = {}
    if attention_mask is not None:
        kwargs = dict(attention_mask=attention_mask,
                      position_ids=fastedge.model.position_ids_from_attention_mask(attention_mask))
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_masks_one_is_the_model_on_clean_input(arch):
    model = tiny_model(arch)
    ids, cids = token_batch()
    em = fastedge.patch(model)
    em.set_circuit(em.graph.edges())
    with torch.no_grad():
        out = em(ids, cids)
    assert torch.allclose(out.logits, _hf_logits(model, ids), atol=2e-5, rtol=1e-5)
    assert out.edge_mask_sum.item() == em.graph.n_edges


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_edge_masks_zero_is_the_model_on_corrupted_input(arch):
    model = tiny_model(arch)
    ids, cids = token_batch()
    em = fastedge.patch(model)
    em.set_circuit([])
    with torch.no_grad():
        out = em(ids, cids)
    assert torch.allclose(out.logits, _hf_logits(model, cids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padding_keeps_positions(arch, padding):
    model = tiny_model(arch)
    ids, cids = token_batch(batch=3, seq=9)
    mask = torch.ones_like(ids)
    for b, n_pad in enumerate((0, 2, 4)):
        if n_pad:
            if padding == "left":
                mask[b, :n_pad] = 0
            else:
                mask[b, -n_pad:] = 0
    em = fastedge.patch(model)
    em.set_circuit(em.graph.edges())
    with torch.no_grad():
        out = em(ids, cids, attention_mask=mask).logits
    ref = _hf_logits(model, ids, mask)
    keep = mask.bool()
    assert torch.allclose(out[keep], ref[keep], atol=2e-5, rtol=1e-5)
    em.set_circuit([])
    with torch.no_grad():
        out = em(ids, cids, attention_mask=mask).logits
    assert torch.allclose(out[keep], _hf_logits(model, cids, mask)[keep], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "neox-parallel"])
def test_bf16_model(arch):
    model32 = tiny_model(arch)
    model = tiny_model(arch, dtype=torch.bfloat16)
    ids, cids = token_batch()
    em = fastedge.patch(model)
    assert all(p.dtype == torch.float32 for p in em.parameters()), "masks stay fp32"
    em.set_circuit(em.graph.edges())
    with torch.no_grad():
        out = em(ids, cids).logits
    assert out.dtype == torch.bfloat16
    ref32 = _hf_logits(model32, ids)
    ref16 = _hf_logits(model, ids)
    # within twice the bf16 model's own error against its fp32 twin, plus a bf16 ulp
    bound = 2 * (ref16.float() - ref32).abs().max() + 2 ** -7 * ref32.abs().max()
    assert (out.float() - ref32).abs().max() <= bound
    em.train()
    em.reset_masks()
    o = em(ids, cids)
    (o.logits.float().pow(2).mean() + o.edge_sparsity).backward()
    assert all(torch.isfinite(p.grad).all() for p in em.parameters())


def test_masks_are_parameters_grouped_per_layer():
    em = fastedge.patch(tiny_model("llama-gqa"))
    g = em.graph
    assert [tuple(p.shape) for p in em.edge_log_alpha] == [(gr.n_readers, gr.n_writers) for gr in g.groups]
    assert em.node_log_alpha.shape == (g.n_writers,)
    assert sum(p.numel() for p in em.edge_log_alpha) == g.n_edges
    la = torch.cat([p.detach().reshape(-1) for p in em.edge_log_alpha])
    assert abs(la.mean().item() - 10) < 0.01 and abs(la.std().item() - 0.01) < 0.005
    assert all(p.requires_grad for p in em.parameters())


def test_reuses_weights_freezes_and_unpatches():
    model = tiny_model("qwen2")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    pointers = {p.data_ptr() for p in model.parameters()}
    em = fastedge.patch(model)
    assert not any(p.requires_grad for p in model.parameters()), "the model is frozen"
    assert all(p.data_ptr() not in pointers for p in em.parameters()), "only masks are parameters"
    q_w = em.adapter.qkv(0)[0]
    assert q_w.data_ptr() == model.model.layers[0].self_attn.q_proj.weight.data_ptr(), "views, not copies"
    back = em.unpatch()
    assert back is model
    assert {n: p.requires_grad for n, p in back.named_parameters()} == flags


def test_training_samples_and_eval_is_deterministic():
    em = fastedge.patch(tiny_model("gpt2"))
    ids, cids = token_batch()
    em.eval()
    with torch.no_grad():
        a, b = em(ids, cids).logits, em(ids, cids).logits
    assert torch.equal(a, b)
    em.train()
    with torch.no_grad():
        for p in em.edge_log_alpha:
            p.normal_(0, 1)
    x = em(ids, cids)
    y = em(ids, cids)
    assert not torch.equal(x.logits, y.logits), "two training steps draw different masks"
    assert torch.equal(em(ids, cids, seed=4).logits, em(ids, cids, seed=4).logits)


def test_circuit_that_keeps_everything_equals_full_model_and_reset():
    model = tiny_model("neox-sequential")
    ids, cids = token_batch()
    em = fastedge.patch(model)
    em.set_circuit(em.graph.edges(), nodes=em.graph.writers)
    with torch.no_grad():
        assert torch.allclose(em(ids, cids).logits, _hf_logits(model, ids), atol=2e-5)
    em.reset_masks()
    assert not em.circuit_fixed
    with pytest.raises(KeyError, match="not upstream"):
        em.set_circuit([("m1", "a0.h0.q")])
    with pytest.raises(KeyError, match="unknown writer"):
        em.set_circuit([], nodes=["nope"])


def test_saved_model_loads_and_patches_from_a_folder(tmp_path):
    model = tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "tiny")
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", attn_implementation="eager")
    em = fastedge.patch(loaded)
    em.set_circuit(em.graph.edges())
    ids, cids = token_batch()
    with torch.no_grad():
        assert torch.allclose(em(ids, cids).logits, _hf_logits(model, ids), atol=2e-5)


def test_unsupported_models_are_named():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model
    with pytest.raises(UnsupportedArchitectureError, match=r"type 'bert'\) is not supported.*gpt2.*llama"):
        fastedge.patch(BertModel(BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                                            intermediate_size=8)))
    with pytest.raises(UnsupportedArchitectureError, match="no lm_head"):
        fastedge.patch(GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=8)))


def test_bad_inputs():
    em = fastedge.patch(tiny_model("gpt2"))
    ids, cids = token_batch()
    with pytest.raises(ValueError, match="needs corrupted_input_ids"):
        em(ids)
    with pytest.raises(ValueError, match="corrupted_input_ids must have"):
        em(ids, cids[:, :3])
    with pytest.raises(ValueError, match="ablation must be one of"):
        fastedge.patch(tiny_model("gpt2"), ablation="resample")
    with pytest.raises(ValueError, match="compute_mean_outputs"):
        fastedge.patch(tiny_model("gpt2"), ablation="mean")(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_precision_fast_rounds_the_masks_on_the_triton_backend(dtype, monkeypatch):
    """patch(precision="fast") reaches the kernels: on the triton backend the
    logits move by the masks' rounding (and no more); on the torch backend,
    which has no one-product path, they stay bit for bit."""
    pytest.importorskip("triton")
    model = tiny_model(WIDE, dtype=dtype)  # enough readers for the tensor-core path
    ids, corrupted = token_batch()

    def logits(precision):
        torch.manual_seed(0)  # the same log_alphas each time
        em = fastedge.patch(model, precision=precision)
        em.eval()
        with torch.no_grad():
            out = em(ids, corrupted).logits.double()
        em.unpatch()
        return out

    cpu = {p: logits(p) for p in ("full", "fast")}
    assert torch.equal(cpu["full"], cpu["fast"])
    monkeypatch.setenv("FASTEDGE_BACKEND", "triton")
    full, fast = logits("full"), logits("fast")
    scale = full.abs().max().item()
    assert not torch.equal(full, fast), "precision='fast' did not change the arithmetic"
    # one rounding of each mask (2^-8 in bf16; fp32: mask and stack to tf32,
    # 2^-11 each) against up to two, through a 3-layer model
    tol = {torch.float32: 1e-3, torch.bfloat16: 2e-2}[dtype]
    assert (full - fast).abs().max().item() <= tol * scale
    with pytest.raises(ValueError, match="precision"):
        fastedge.patch(model, precision="half")
