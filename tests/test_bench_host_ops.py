"""bench/host_ops.py: the host-op counter of a pruning step."""
import csv
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import host_ops  # noqa: E402
from host_ops import OpCounter  # noqa: E402

from fastedge import ops  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_counts_aten_ops_once_each():
    x = torch.randn(3, 4)
    with OpCounter() as c:
        y = (x + 1) * x
        y.sum()
    assert c.counts == Counter({"aten::add.Tensor": 1, "aten::mul.Tensor": 1, "aten::sum": 1})


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_custom_op_counts_once_and_its_insides_not_at_all(backend):
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(5, 2, 3, generator=g)
    mask = torch.rand(4, 5, generator=g)
    with OpCounter() as c:
        ops.masked_writer_sum(stack, mask, backend=backend)
    fastedge_ops = {k: v for k, v in c.counts.items() if k.startswith("fastedge::")}
    assert fastedge_ops == {"fastedge::masked_writer_sum": 1}
    # the implementation's matrix product runs inside the op, unseen
    assert not any(k.startswith(("aten::mm", "aten::addmm", "aten::matmul", "aten::einsum"))
                   for k in c.counts), c.counts


def test_fake_and_real_tensors_count_alike():
    def step():
        x = torch.ones(3, 4)
        return (x.t() @ x).relu().sum()
    with OpCounter() as real:
        step()
    with FakeTensorMode(), OpCounter() as fake:  # fake tensors answer .device through the mode
        step()
    assert real.counts == fake.counts


def test_per_layer_is_the_difference_per_added_layer():
    shallow = Counter({"aten::add.Tensor": 10, "aten::mm": 4, "aten::sum": 1})
    deep = Counter({"aten::add.Tensor": 16, "aten::mm": 10, "aten::sum": 1, "aten::cat": 3})
    assert host_ops.per_layer(shallow, deep, 3) == {"aten::add.Tensor": 2, "aten::mm": 2, "aten::cat": 1}


def test_the_cli_records_a_row_per_setting(tmp_path):
    host_ops.main(["--models", "small-llama", "--depths", "1,2", "--time", "--repeats", "1",
                   "--out", str(tmp_path)])
    with open(tmp_path / "host_ops.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["recompute_readers"] for r in rows] == ["False", "True"]
    for r in rows:
        assert r["git_rev"] and r["model"] == "small-llama"
        assert float(r["aten_per_layer"]) > 0 and float(r["custom_per_layer"]) > 0
        steps = [float(t) for t in r["host_ms_steps"].split("/")]
        assert len(steps) == 2 and min(steps) > 0
        float(r["host_ms_per_layer"]), float(r["host_ms_per_layer_outside_ops"])  # recorded, numbers
        assert float(r["aten_per_layer"]) == pytest.approx(float(r["fwd_aten_per_layer"])
                                                           + float(r["bwd_aten_per_layer"]))
    # recomputing the readers replays their ops in the backward
    assert float(rows[1]["bwd_aten_per_layer"]) > float(rows[0]["bwd_aten_per_layer"])
