"""Ground truth of Tracr-compiled models (`fastedge.tracr.truth`, `.spaces`).

The Tracr programs need the ``tracr`` extra and skip without it; the
hand-built model of `tracr_synthetic` (nonzero biases, the corner cases of
the read spaces) needs only PyTorch. Circuits are run here on the user's
float32 model through `fastedge.patch`, independently of the float64 copy
`ground_truth` uses, and the read/write spaces are checked against
perturbation probes (`tracr_probe`).
"""
import json

import numpy as np
import pytest
import torch

import fastedge
from fastedge.circuit import Circuit
from fastedge.graph import EdgeGraph
from fastedge.tracr import spaces
from fastedge.tracr.inputs import batch_ids, input_space
from fastedge.tracr.truth import NUMERICAL_TOLERANCE, GroundTruth, ground_truth

import tracr_synthetic
from tracr_probe import Probe

# fast to compile; categorical and numerical, attention-only and MLP paths
PROGRAMS = ("reverse", "xproportion", "shift_by", "count")
PAPER = ("reverse", "xproportion")


@pytest.fixture(autouse=True)
def one_thread():
    # the models are tiny: threads only add overhead (and a lot of it on a loaded machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def compiled():
    """name -> (TracrModel, GroundTruth), compiled once per module."""
    pytest.importorskip("tracr.compiler.compiling",
                        reason="Tracr is not installed (pip install -e '.[tracr]')")
    from fastedge.tracr import programs
    cache = {}

    def get(name):
        if name not in cache:
            tm = programs.load(name)
            cache[name] = (tm, ground_truth(tm))
        return cache[name]
    return get


def _outputs(tm, edges=None):
    """Decoded outputs [B, S] of the float32 model on its whole input space
    (the full model, or the circuit `edges` under zero ablation), and the
    positions that count (every position but BOS, no padding)."""
    ids, mask = batch_ids(tm, input_space(tm))
    with torch.no_grad():
        if edges is None:
            logits = tm.model(ids, attention_mask=mask).logits
        else:
            em = fastedge.patch(tm.model, ablation="zero", node_masks=False)
            try:
                em.set_circuit(edges)
                logits = em(ids, attention_mask=mask).logits
            finally:
                em.unpatch()
    scored = mask.bool()
    scored[:, 0] = False
    return (logits.argmax(-1) if tm.categorical else logits[..., 0]), scored


def _changed(tm, full, out, scored) -> int:
    """How many outputs differ (categorical) or move by more than the
    tolerance (numerical)."""
    if tm.categorical:
        return int(((full != out) & scored).sum())
    return int((((full - out).abs() > NUMERICAL_TOLERANCE) & scored).sum())


# (1) the weight-composition circuit keeps every output ------------------------------------

@pytest.mark.parametrize("name", PROGRAMS)
def test_weight_composition_circuit_keeps_every_output(compiled, name):
    tm, truth = compiled(name)
    assert truth.complete
    assert 0 < len(truth.edges) < truth.graph.n_edges
    full, scored = _outputs(tm)
    out, _ = _outputs(tm, truth.edges)
    assert _changed(tm, full, out, scored) == 0
    if not tm.categorical:
        # float32 rounding only: far below the tolerance
        assert float((full - out).abs()[scored].max()) < 1e-6
    # and the comparison does see a change: nothing into the unembedding
    cut = {e for e in truth.edges if e[1] != "resid_post"}
    out, _ = _outputs(tm, cut)
    assert _changed(tm, full, out, scored) > 0


def test_synthetic_weight_composition_circuit_keeps_logits():
    """With nonzero biases everywhere, the circuit's logits equal the full
    model's at every real position (float64 rounding only)."""
    for seed in range(3):
        tm = tracr_synthetic.build(seed)
        truth = ground_truth(tm)
        assert truth.complete
        ids, mask = batch_ids(tm, input_space(tm))
        em = fastedge.patch(tm.model, ablation="zero", node_masks=False)
        try:
            with torch.no_grad():
                full = tm.model(ids, attention_mask=mask).logits
                em.set_circuit(truth.edges)
                kept = em(ids, attention_mask=mask).logits
                em.set_circuit(set(truth.graph.edges()) - {next(iter(truth.necessary))})
                cut = em(ids, attention_mask=mask).logits
        finally:
            em.unpatch()
        real = mask.bool()
        scale = float(full[real].abs().max())
        assert float((kept - full).abs()[real].max()) <= 1e-12 * scale, seed
        assert float((cut - full).abs()[real].max()) > 1e-6 * scale, seed


# (2) the spaces, a second way ---------------------------------------------------------------

def _check_against_probe(tm, seed=0):
    graph = EdgeGraph.from_config(tm.config)
    writes = spaces.write_dims(tm.model)
    reads = spaces.read_dims(tm.model, writes)
    probe = Probe(tm.model, seed=seed)
    probed_writes = probe.write_dims()
    for w in graph.writers:
        assert np.array_equal(writes[w], probed_writes[w]), (w, writes[w], probed_writes[w])
    probed_reads = probe.read_dims(graph, writes)
    for r in graph.readers:
        assert np.array_equal(reads[r], probed_reads[r]), (r, reads[r], probed_reads[r])
    edges = set(spaces.composition_edges(graph, writes, reads))
    assert edges == probe.edges(graph, probed_writes)
    return writes, reads, edges


@pytest.mark.parametrize("name", PROGRAMS)
def test_spaces_match_perturbation_probe(compiled, name):
    tm, truth = compiled(name)
    _, _, edges = _check_against_probe(tm)
    assert edges == truth.edges


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_spaces_match_probe_and_construction(seed):
    tm = tracr_synthetic.build(seed)
    writes, reads, _ = _check_against_probe(tm, seed)
    # the corner cases, as the construction places them (tracr_synthetic)
    for side, dims in tracr_synthetic.EXPECTED_A0H0.items():
        assert reads[f"a0.h0.{side}"].tolist() == dims, side
    assert reads["m0"].tolist() == tracr_synthetic.EXPECTED_M0
    # ... and each is a case the naive rule gets wrong: W_Q's rows would add
    # dims 1 (no key meets it) and 3 (keys only nobody-written dim 9),
    # W_QK's columns alone would miss dim 4 (read through b_Q), W_V's rows
    # would add dim 3 (W_O kills it), W1's columns would add dim 3 (dead unit)
    attn = tm.model.transformer.h[0].self_attn
    wq_rows = np.flatnonzero((attn.q_proj.weight[:4] != 0).any(0).numpy())
    assert {1, 3} <= set(wq_rows.tolist())
    wv_rows = np.flatnonzero((attn.v_proj.weight[:4] != 0).any(0).numpy())
    assert 3 in wv_rows
    w1_cols = np.flatnonzero((tm.model.transformer.h[0].mlp.fc1.weight != 0).any(0).numpy())
    assert 3 in w1_cols


# (3) necessity -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PROGRAMS)
def test_necessity_is_consistent(compiled, name):
    tm, truth = compiled(name)
    assert truth.necessary | truth.redundant == truth.edges
    assert not truth.necessary & truth.redundant
    assert truth.necessary
    full, scored = _outputs(tm)
    real_changes = []     # numerical: every output move above float32 noise
    for e in sorted(truth.edges):
        out, _ = _outputs(tm, truth.edges - {e})
        changed = _changed(tm, full, out, scored)
        if e in truth.necessary:
            assert changed > 0, f"removing necessary edge {e} changes nothing"
        else:
            assert changed == 0, f"removing redundant edge {e} changes {changed} outputs"
        assert truth.effects[e]["changed_outputs"] == changed, e
        if not tm.categorical:
            move = (out - full).abs()[scored]
            real_changes.append(move[move > 1e-6])
    if not tm.categorical:
        # the tolerance sits in the gap, two orders of magnitude from each
        # side, between what removing a redundant edge does (Tracr's own
        # approximation error, ~6e-9 on xproportion) and the smallest real
        # change of an output (0.2 there)
        assert max(truth.effects[e]["max_abs_change"] for e in truth.redundant) * 100 < NUMERICAL_TOLERANCE
        assert float(torch.cat(real_changes).min()) > 100 * NUMERICAL_TOLERANCE
    # redundancy is per edge; on these programs the redundant edges also go together
    out, _ = _outputs(tm, truth.necessary)
    assert truth.redundant_jointly_removable
    assert _changed(tm, full, out, scored) == 0


# (4) the judge ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PAPER)
def test_judge(compiled, name):
    tm, truth = compiled(name)
    print()
    print(truth)
    verdict = truth.judge(truth.edges)
    assert verdict["recovered"] and verdict["outputs_reproduced"]
    assert verdict["missing_necessary"] == [] and verdict["outside_truth"] == []
    assert truth.judge(truth.necessary)["recovered"]

    order = sorted(truth.necessary, key=lambda e: truth.graph.edge_index(*e))
    for e in order:
        v = truth.judge(truth.edges - {e})
        assert not v["recovered"] and v["missing_necessary"] == [e] and v["outputs_reproduced"] is False

    outside = [e for e in truth.graph.edges() if e not in truth.edges]
    for e in (outside[0], outside[len(outside) // 2], outside[-1]):
        v = truth.judge(truth.edges | {e})
        assert not v["recovered"] and v["outside_truth"] == [e]
        assert v["outputs_reproduced"] is True, e   # an edge outside carries nothing visible

    # a Circuit works as well as an edge set
    circuit = Circuit(edges=sorted(truth.edges), nodes=sorted({w for w, _ in truth.edges}),
                      graph=truth.graph, ablation="zero")
    assert truth.judge(circuit)["recovered"]
    assert truth.judge(truth.edges, check_outputs=False)["outputs_reproduced"] is None

    for w, r in truth.edges:
        assert truth.via(w, r), (w, r)      # every edge meets on some named direction
    d = json.loads(json.dumps(truth.to_dict()))
    assert len(d["edges"]) == len(truth.edges)
    assert {tuple(e) for e in d["necessary"]} == truth.necessary


def test_judge_rejects_bad_edges():
    truth = ground_truth(tracr_synthetic.build(0))
    with pytest.raises(KeyError, match="unknown"):
        truth.judge([("a9.h0", "resid_post")])
    with pytest.raises(KeyError, match="not upstream"):
        truth.judge([("m1", "a0.h0.q")])
    with pytest.raises(ValueError, match="pair"):
        truth.judge(["m0"])
    other = EdgeGraph(n_layers=1, n_heads=1, n_kv_heads=1, embeddings=("tok_embeds", "pos_embeds"))
    with pytest.raises(ValueError, match="graph"):
        truth.judge(Circuit(edges=[("tok_embeds", "resid_post")], nodes=["tok_embeds"], graph=other))


def test_chunked_runs_and_samples(monkeypatch):
    from fastedge.tracr import truth as truth_module
    tm = tracr_synthetic.build(2)
    whole = ground_truth(tm)
    # 7 rows per forward (writers x S x D per row)
    monkeypatch.setattr(truth_module, "_CHUNK_ELEMENTS", whole.graph.n_writers * 4 * 12 * 7)
    chunked = ground_truth(tm)
    assert chunked._outputs.chunk == 7 and chunked.n_inputs == whole.n_inputs == 84
    for attr in ("edges", "necessary", "effects"):
        assert getattr(chunked, attr) == getattr(whole, attr), attr
    monkeypatch.setattr(truth_module, "MAX_INPUTS", 50)
    with pytest.raises(ValueError, match="n_examples"):
        ground_truth(tm)
    sampled = ground_truth(tm, n_examples=20, seed=1)
    assert sampled.n_inputs == 20 and sampled.edges == whole.edges
    assert sampled.necessary <= whole.necessary   # fewer inputs can only show fewer changes


def test_ground_truth_rejects_bad_arguments():
    tm = tracr_synthetic.build(0)
    with pytest.raises(TypeError, match="TracrModel"):
        ground_truth(tm.model)
    with pytest.raises(ValueError, match="numerical"):
        ground_truth(tm, tolerance=1e-3)
    assert isinstance(ground_truth(tm), GroundTruth)
    import fastedge.tracr
    assert fastedge.tracr.ground_truth is ground_truth and fastedge.tracr.GroundTruth is GroundTruth
