"""The command line around attribution scores: `fastedge attribute`,
`fastedge eval --scores --sweep`, `fastedge export-mib`, on a tiny GPT-2
saved to a folder (a task with distinct clean and corrupted answers) and on
the shipped induction model; and `fastedge.evaluate.sweep_scores`."""
import json
import math

import pytest
import torch

import fastedge
from fastedge.attribution import EdgeScores
from fastedge.circuit import Circuit
from fastedge.cli import main
from fastedge.eap_graph import circuit_from_eap_graph_json, eap_edge_count, eap_edge_count_of

from test_cli_errors import FAST, _refused, make_folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("cli-attribute"))


def _model_args(folders):
    return ["--model", folders["model"], "--data", folders["data"]]


def _attribute(folders, out, *extra):
    return ["attribute", *_model_args(folders), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def eap_ig(folders):
    """scores.pt and scores.json of EAP-IG-inputs (3 steps) on the tiny GPT-2."""
    out = folders["root"] / "eap-ig.pt"
    assert main(_attribute(folders, out, "--method", "eap-ig-inputs", "--ig-steps", "3", "--batch-size", "4")) == 0
    return out


def _library_scores(folders, **kw):
    """The same attribution through the library, from the same folders."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fastedge.tasks.files import load_data
    model = AutoModelForCausalLM.from_pretrained(folders["model"], attn_implementation="eager").eval()
    task = load_data(folders["data"], AutoTokenizer.from_pretrained(folders["model"]))
    return fastedge.attribute(model, task, **kw)


def test_attribute_writes_scores_and_eap_json(folders, eap_ig, capsys):
    scores = EdgeScores.load(eap_ig)
    assert scores.method == "eap-ig-inputs" and scores.ig_steps == 3 and scores.metric == "logit_diff"
    assert scores.sign == "gate" and scores.n_examples == 9 and scores.d_model == 16
    expected = _library_scores(folders, method="eap-ig-inputs", ig_steps=3, batch_size=4)
    assert torch.allclose(scores.flat(), expected.flat(), rtol=1e-5, atol=1e-7)
    assert scores.flat().abs().max() > 0
    beside = eap_ig.with_suffix(".json")
    assert json.loads(beside.read_text()) == scores.to_eap_graph_json()

    out = folders["root"] / "eap.pt"
    capsys.readouterr()
    assert main(_attribute(folders, out, "--method", "eap", "--sign", "eap-ig", "--eap-json",
                           str(folders["root"] / "named.json"))) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attribute: eap on 9 examples")
    eap = EdgeScores.load(out)
    top = eap.top(1)[0]
    assert f"{top[0]}->{top[1]}" in lines[0] and "sign eap-ig" in lines[0]
    assert (folders["root"] / "named.json").exists() and not out.with_suffix(".json").exists()
    plain = _library_scores(folders, method="eap", sign="eap-ig")
    assert torch.allclose(eap.flat(), plain.flat(), rtol=1e-5, atol=1e-7)


def test_attribute_on_the_shipped_model_says_why_its_metric(tmp_path, capsys):
    """The induction task's clean and corrupted answers are the same token:
    its logit difference is 0, so the default metric there is the answer's
    log-probability, and the line says why."""
    assert main(["attribute", "--n-examples", "24", "--method", "eap-ig-inputs", "--ig-steps", "2",
                 "--out", str(tmp_path / "s.pt")]) == 0
    line = capsys.readouterr().out.strip()
    assert "metric logprob (the task's clean and corrupted answers are the same" in line
    scores = EdgeScores.load(tmp_path / "s.pt")
    assert scores.metric == "logprob" and scores.flat().abs().max() > 0


def test_eval_sweep_of_scores(folders, eap_ig, tmp_path):
    sweep_path = tmp_path / "sweep.json"
    assert main(["eval", *_model_args(folders), "--scores", str(eap_ig), "--sweep", "0,0.5,0.9,0.999",
                 "--out", str(sweep_path)]) == 0
    result = json.loads(sweep_path.read_text())
    scores = EdgeScores.load(eap_ig)
    assert [p["target_sparsity"] for p in result["points"]] == [0.0, 0.5, 0.9, 0.999]
    for point in result["points"]:
        assert point["n_edges"] == Circuit.from_scores(scores, sparsity=point["target_sparsity"]).n_edges
    assert result["points"][0]["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    assert math.isfinite(result["cpr"]) and math.isfinite(result["cmd"]) and result["absolute"] is True


def test_sweep_scores_evaluates_the_top_circuits(folders, eap_ig):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fastedge.evaluate import evaluate, faithfulness_areas, sweep_scores
    from fastedge.tasks.files import load_data
    model = AutoModelForCausalLM.from_pretrained(folders["model"], attn_implementation="eager").eval()
    task = load_data(folders["data"], AutoTokenizer.from_pretrained(folders["model"]))
    em = fastedge.patch(model)
    g = torch.Generator().manual_seed(5)
    scores = EdgeScores(graph=em.graph, scores=[torch.randn(grp.n_readers, grp.n_writers, generator=g)
                                                for grp in em.graph.groups])
    sparsities = [0.0, 0.3, 0.7, 0.999]
    result = sweep_scores(em, task, scores, sparsities, batch_size=5, absolute=False)
    for s, point in zip(sparsities, result["points"]):
        circuit = Circuit.from_scores(scores, sparsity=s, absolute=False)
        assert point["n_edges"] == circuit.n_edges
        assert point["faithfulness"] == evaluate(em, task, circuit, batch_size=5)["faithfulness"]
    areas = faithfulness_areas([p["edge_fraction"] for p in result["points"]],
                               [p["faithfulness"] for p in result["points"]])
    assert result["cpr"] == areas["cpr"] and result["cmd"] == areas["cmd"]
    from fastedge import shipped as shipped_model
    shipped = fastedge.patch(shipped_model.load_shipped_model())
    with pytest.raises(ValueError, match="another graph"):
        sweep_scores(shipped, task, scores, sparsities)


def test_export_mib_from_scores_and_masks(folders, eap_ig, tmp_path, capsys):
    out = tmp_path / "mib"
    assert main(["export-mib", "--scores", str(eap_ig), "--model-tag", "gpt2", "--task-tag", "ioi",
                 "--method", "eap-ig", "--out", str(out), "--form", "both"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("export-mib: wrote ") and "9 binary circuits" in line
    scores = EdgeScores.load(eap_ig)
    importances = out / "eap-ig" / "importances" / "ioi_gpt2" / "importances.json"
    assert json.loads(importances.read_text()) == scores.to_eap_graph_json()
    circuits = out / "eap-ig" / "circuits" / "ioi_gpt2"
    total = eap_edge_count(scores.graph)
    for path in circuits.iterdir():
        fraction = float(path.name[len("circuit_"):-len("pct.json")]) / 100
        c = circuit_from_eap_graph_json(path, scores.graph)
        assert eap_edge_count_of(c) <= fraction * total

    # a pruning run's masks: their log_alphas ranked signed, d_model from the circuit.json beside them
    run = tmp_path / "run"
    assert main(["prune", *_model_args(folders), *FAST, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["export-mib", "--masks", str(run / "masks.pt"), "--model-tag", "gpt2", "--task-tag", "ioi",
                 "--method", "ep", "--out", str(out), "--form", "circuits", "--fractions", "0.1,0.5"]) == 0
    assert "ranked by signed score" in capsys.readouterr().out
    written = json.loads((out / "ep" / "ioi_gpt2" / "circuit_50pct.json").read_text())
    assert written["cfg"]["d_model"] == 16
    state = torch.load(run / "masks.pt", weights_only=False)
    log_alphas = EdgeScores.from_masks(state["edge_model"], graph=scores.graph)
    n = sum(e["in_graph"] for e in written["edges"].values())
    assert 0 < n <= 0.5 * total
    from fastedge.eap_graph import circuit_to_eap_graph_json
    from fastedge.mib import circuit_within
    signed = circuit_within(log_alphas, int(0.5 * total), absolute=False)
    assert circuit_to_eap_graph_json(signed, d_model=16) == written


def test_refusals_are_one_line(folders, eap_ig, tmp_path, capsys):
    line = _refused(capsys, _attribute(folders, tmp_path / "a.pt", "--method", "eap-ig"))
    assert "--method 'eap-ig' is not one of eap, eap-ig-inputs, eap-ig-activations" in line
    line = _refused(capsys, _attribute(folders, tmp_path / "a.pt", "--metric", "acc"))
    assert "--metric 'acc'" in line
    line = _refused(capsys, _attribute(folders, tmp_path / "a.pt", "--ig-steps", "0"))
    assert "--ig-steps must be at least 1" in line
    line = _refused(capsys, _attribute(folders, eap_ig))
    assert "already exists; add --overwrite" in line
    line = _refused(capsys, _attribute(folders, tmp_path / "nowhere" / "a.pt"))
    assert "does not exist" in line

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    line = _refused(capsys, ["eval", *_model_args(folders), "--scores", str(garbage), "--sweep", "mib"])
    assert "cannot read this scores file" in line
    torch.save({"format": "fastedge.masks/1"}, tmp_path / "masks.pt")
    line = _refused(capsys, ["eval", *_model_args(folders), "--scores", str(tmp_path / "masks.pt"),
                             "--sweep", "mib"])
    assert "masks, not attribution scores: give it to --masks" in line
    line = _refused(capsys, ["eval", *_model_args(folders), "--scores", str(eap_ig)])
    assert "--scores is read only with --sweep" in line
    # scores of another model: the shipped model's graph
    shipped = tmp_path / "shipped.pt"
    assert main(["attribute", "--n-examples", "8", "--method", "eap", "--out", str(shipped)]) == 0
    line = _refused(capsys, ["eval", *_model_args(folders), "--scores", str(shipped), "--sweep", "mib"])
    assert "holds scores of another model" in line
    line = _refused(capsys, ["export-mib", "--scores", str(eap_ig), "--model-tag", "gpt2", "--task-tag", "ioi",
                             "--method", "m", "--out", str(tmp_path / "x"), "--form", "all"])
    assert "--form 'all' is not one of scores, circuits, both" in line
    line = _refused(capsys, ["export-mib", "--masks", str(eap_ig), "--model-tag", "gpt2", "--task-tag", "ioi",
                             "--method", "m", "--out", str(tmp_path / "x")])
    assert "holds attribution scores" in line
    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save({"format": "fastedge.masks/1", "graph": EdgeScores.load(eap_ig).graph.to_dict(),
                "edge_model": {f"edge_log_alpha.{i}": torch.zeros(g.n_readers, g.n_writers)
                               for i, g in enumerate(EdgeScores.load(eap_ig).graph.groups)}}, lone / "masks.pt")
    line = _refused(capsys, ["export-mib", "--masks", str(lone / "masks.pt"), "--model-tag", "gpt2",
                             "--task-tag", "ioi", "--method", "m", "--out", str(tmp_path / "x")])
    assert "give --d-model" in line
    line = _refused(capsys, ["eval", *_model_args(folders), "--circuit", "c.json", "--rank", "abs"])
    assert "--rank" in line


def test_help_of_the_new_commands(capsys):
    for argv in (["attribute", "--help"], ["export-mib", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--method", "--ig-steps", "--metric", "--sign", "--split", "--eap-json", "--model-tag",
                   "--task-tag", "--form", "--fractions", "--d-model", "--scores", "--rank"):
        assert option in text, option
