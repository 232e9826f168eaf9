"""The edge graph reproduces the counts of docs/CONCEPTS.md section 1."""
import pytest
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

from fastedge.architectures import UnsupportedArchitectureError
from fastedge.graph import EdgeGraph


def test_gpt2_small_counts():
    g = EdgeGraph.from_config(GPT2Config())  # 12 layers, 12 heads
    assert (g.n_writers, g.n_readers, g.n_edges) == (158, 445, 32936)
    assert g.writers[:3] == ["tok_embeds", "pos_embeds", "a0.h0"]
    assert sum(1 for _ in g.edges()) == 32936


def test_codellama_13b_counts():
    config = LlamaConfig(num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                         hidden_size=5120, intermediate_size=13824, vocab_size=32016)
    g = EdgeGraph.from_config(config)
    assert (g.n_writers, g.n_readers, g.n_edges) == (1641, 4841, 3877661)
    assert max(gr.n_readers for gr in g.groups) == 120
    assert g.groups[-1].n_writers == 1641


def test_grouped_query_llama3_8b():
    config = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    g = EdgeGraph.from_config(config)
    assert g.n_writers == 1 + 32 * 33
    assert g.n_readers == 32 * (32 + 8 + 8 + 1) + 1
    assert "a0.h7.k" in g.reader_index and "a0.h8.k" not in g.reader_index
    assert "a0.h31.q" in g.reader_index


def test_edges_respect_order_and_blocks():
    g = EdgeGraph.from_config(GPT2Config(n_layer=3, n_head=4))
    assert g.has_edge("a0.h1", "m0") and not g.has_edge("a0.h1", "a0.h2.q")
    assert g.has_edge("m0", "a1.h0.k") and not g.has_edge("m1", "m1")
    assert g.has_edge("m2", "resid_post")
    neox = EdgeGraph.from_config(GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4))
    assert not neox.has_edge("a0.h1", "m0"), "a parallel block's MLP does not read its own heads"
    for i in range(g.n_edges):
        w, r = g.edge(i)
        assert g.edge_index(w, r) == i


def test_other_architectures_and_serialisation():
    for config in (MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                   Qwen2Config(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2)):
        g = EdgeGraph.from_config(config)
        assert g.writers[0] == "embeds"
        again = EdgeGraph.from_json(g.to_json())
        assert again == g and again.fingerprint() == g.fingerprint()
        assert list(again.edges()) == list(g.edges())


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import BertConfig
    with pytest.raises(UnsupportedArchitectureError, match="'bert' is not supported.*gpt2.*llama"):
        EdgeGraph.from_config(BertConfig())


def test_bad_lookups():
    g = EdgeGraph.from_config(GPT2Config(n_layer=2, n_head=2))
    with pytest.raises(KeyError, match="not upstream"):
        g.edge_index("m1", "a0.h0.q")
    with pytest.raises(KeyError, match="unknown writer"):
        g.edge_index("a9.h0", "m0")


def test_split_by_group_gives_each_groups_edges_in_the_masks_layout():
    import torch
    g = EdgeGraph(n_layers=2, n_heads=4, n_kv_heads=2, embeddings=("tok_embeds", "pos_embeds"))
    flat = torch.randn(g.n_edges)
    blocks = g.split_by_group(flat)
    assert [tuple(b.shape) for b in blocks] == [(grp.n_readers, grp.n_writers) for grp in g.groups]
    for (w, r), value in zip(g.edges(), flat.tolist()):
        grp = g.group_of(r)
        assert blocks[grp.index][g.reader_index[r] - grp.first_reader, g.writer_index[w]].item() == value
    with pytest.raises(ValueError, match="one value per edge"):
        g.split_by_group(flat[:-1])
