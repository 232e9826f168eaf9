"""bench/roofline.py and fastedge.kernels.costs: the step-time model on fake tensors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import roofline as rl  # noqa: E402
from fastedge.kernels import costs  # noqa: E402
from fastedge.kernels import masked_sum as kms  # noqa: E402


def _direct_forward_count(R, W, N, e, cfg, base_rows):
    """Walk `_masked_sum_fwd_kernel`'s grid and loops as written and count every
    element its masked loads touch: (distinct bytes, all bytes loaded, bytes stored).
    The dot path loads the mask's hi and lo halves in the stack's dtype (every
    tile flagged: a fractional mask), the vector path the fp32 mask."""
    m_bytes = 2 * e if cfg["USE_DOT"] else 4
    BR, BW, BN = cfg["BLOCK_R"], cfg["BLOCK_W"], cfg["BLOCK_N"]
    n_r = -(-R // BR)
    seen, loaded, stored = set(), 0, 0
    for pid in range(n_r * -(-N // BN)):
        pid_r, pid_n = pid % n_r, pid // n_r
        rows = [r for r in range(pid_r * BR, pid_r * BR + BR) if r < R]
        cols = [n for n in range(pid_n * BN, pid_n * BN + BN) if n < N]
        for w0 in range(0, W, BW):
            ws = [w for w in range(w0, w0 + BW) if w < W]
            for r in rows:
                for w in ws:
                    seen.add(("m", r, w))
                    loaded += m_bytes
            for w in ws:
                for n in cols:
                    seen.add(("x", w, n))
                    loaded += e
        if base_rows:
            for r in rows:
                g = r % base_rows          # any reader -> row map: each row is read by some reader
                for n in cols:
                    seen.add(("b", g, n))
                    loaded += e
        stored += len(rows) * len(cols) * e
    distinct = sum(m_bytes if k[0] == "m" else e for k in seen)
    return distinct, loaded, stored


@pytest.mark.parametrize("R,W,N,dtype,base_rows,cfg", [
    (20, 37, 300, torch.bfloat16, 2, dict(USE_DOT=True, BLOCK_R=32, BLOCK_W=16, BLOCK_N=64, num_warps=4,
                                          num_stages=3)),
    (37, 23, 190, torch.float32, 0, dict(USE_DOT=True, BLOCK_R=16, BLOCK_W=16, BLOCK_N=32, num_warps=4,
                                         num_stages=3)),    # two reader tiles
    (3, 11, 257, torch.float32, 1, None),                   # the vector path, its own config
], ids=["R20-W37-N300-bf16-G2", "R37-W23-N190-fp32-2rtiles", "R3-W11-N257-fp32-vector"])
def test_forward_contract_bytes_equal_a_direct_count(R, W, N, dtype, base_rows, cfg):
    cfg = cfg or kms.forward_config(R, W, N, dtype)
    c = costs.masked_sum_forward(R, W, N, dtype, 90, base_rows=base_rows, config=cfg)
    e = torch.empty((), dtype=dtype).element_size()
    distinct, loaded, stored = _direct_forward_count(R, W, N, e, cfg, base_rows)
    assert c.dram_read == distinct
    assert c.dram_read + c.l2_read == loaded
    assert c.dram_write == stored
    assert c.launches == 1


def test_contract_follows_the_kernels_config_and_product_counts():
    R, W, N = 121, 1640, 8 * 72 * 5120
    wide = costs.masked_sum_forward(R, W, N, torch.bfloat16, 90)
    narrow = costs.masked_sum_forward(R, W, N, torch.bfloat16, 80)
    assert wide.config == kms.forward_config(R, W, N, torch.bfloat16, arch=90)
    assert wide.config["BLOCK_N"] == 2 * narrow.config["BLOCK_N"]
    # the mask reloads per column tile halve with twice the columns
    assert narrow.l2_read == pytest.approx(2 * wide.l2_read, rel=1e-3)
    # hi and lo: two 16-bit products where every tile has a lo half, one
    # where none has (0/1 masks) or in precision "fast"; fp32: three, two, one
    one = costs.masked_sum_forward(R, W, N, torch.bfloat16, 90, split=False).flops["tc16"]
    assert wide.flops["tc16"] == 2 * one
    assert costs.masked_sum_forward(R, W, N, torch.bfloat16, 90, lo_fraction=0.0).flops["tc16"] == one
    assert costs.masked_sum_forward(R, W, N, torch.bfloat16, 90, legacy=True).flops["tc16"] == 2 * one
    fp32 = costs.masked_sum_forward(37, 157, 32 * 64 * 768, torch.float32, 90)
    assert "tc16" not in fp32.flops and fp32.flops["tf32"] > 0
    fp32_one = costs.masked_sum_forward(37, 157, 32 * 64 * 768, torch.float32, 90, split=False).flops["tf32"]
    assert fp32.flops["tf32"] == 3 * fp32_one
    assert costs.masked_sum_forward(37, 157, 32 * 64 * 768, torch.float32, 90,
                                    lo_fraction=0.0).flops["tf32"] == 2 * fp32_one
    # dead writers are not read: the stack bytes scale with the live share
    half = costs.masked_sum_forward(R, W, N, torch.bfloat16, 90, live_fraction=0.5)
    assert half.dram_read < 0.51 * wide.dram_read
    mask_bwd = costs.masked_sum_backward_mask(R, W, N, torch.bfloat16, 90)
    S = kms.backward_mask_config(R, W, N, torch.bfloat16)["SLICES"]
    assert S > 1 and len(mask_bwd) == 2 and mask_bwd[0].dram_write == S * R * W * 4


def test_custom_op_costs_name_an_unknown_op():
    with pytest.raises(KeyError, match="no cost contract"):
        costs.custom_op_costs("fastedge::nonexistent", ())


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline")
    path = out / "r.json"
    threads = torch.get_num_threads()
    try:
        rl.main(["--model", "tiny-llama", "--card", "a100", "--no-calibration", "--json", str(path),
                 "--out", str(out)])
    finally:
        torch.set_num_threads(threads)   # main() sets one thread (nothing is computed on fake tensors)
    return json.loads(path.read_text()), out


def test_tiny_config_runs_end_to_end_and_json_has_the_keys(tiny_result):
    res, out = tiny_result
    for key in ("floor_ms", "fastedge_ms", "ratio", "tables", "meta", "calibration", "card_spec"):
        assert key in res, key
    for key in ("card", "model", "batch", "micro_batch", "seq", "git_rev"):
        assert key in res["meta"], key
    assert res["meta"]["card"] == "a100" and res["meta"]["model"] == "tiny-llama"
    assert 0 < res["floor_ms"] < res["fastedge_ms"]
    assert res["ratio"] == pytest.approx(res["fastedge_ms"] / res["floor_ms"])
    for kind in ("fastedge", "floor"):
        phases = [r["phase"] for r in res["tables"][kind]]
        assert phases == list(rl.PHASES)
        total = sum(r["modeled_ms"] for r in res["tables"][kind])
        assert total == pytest.approx(res[f"{kind}_ms"], rel=1e-9)
        for r in res["tables"][kind]:
            for col in ("launches", "host_ops", "gb", "gflop", "gflop_tc16", "gflop_tf32", "gflop_fp32", "bound_ms",
                        "modeled_ms", "measured_ms"):
                assert col in r
            assert r["gflop_tc16"] + r["gflop_tf32"] + r["gflop_fp32"] == pytest.approx(r["gflop"])
    assert (out / "roofline.csv").exists() and list(out.glob("roofline-tiny-llama-a100-*.md"))


def _launches_by_phase(records):
    launches = {}
    for r in records:
        assert r.phase in rl.PHASES, r.phase
        launches[r.phase] = launches.get(r.phase, 0) + r.n_launches
    return launches


def test_every_launch_of_a_traced_step_lands_in_a_named_phase():
    import memory
    bench = memory.FakeBench("tiny-llama", torch.bfloat16, n_layers=3)
    tr = rl.trace_step(bench, "fastedge", 2, 12, 4, True, 90)
    launches = _launches_by_phase(tr.records)
    total = sum(launches.values())
    for phase in rl.PHASES:
        if phase != "other":
            assert launches.get(phase, 0) > 0, f"no launch in {phase!r}"
    # what is left is per step, not per layer (the attention mask, positions and
    # rotary tables, the clean embedding): one more layer adds nothing to it
    deeper = rl.trace_step(memory.FakeBench("tiny-llama", torch.bfloat16, n_layers=4), "fastedge", 2, 12, 4,
                           True, 90)
    more = _launches_by_phase(deeper.records)
    assert sum(more.values()) > total
    assert more.get("other", 0) == launches.get("other", 0), (launches, more)
    assert launches.get("other", 0) <= 0.05 * total, launches
    customs = [r for r in tr.records if r.custom]
    assert customs and all(r.phase in (rl.MS_FWD, rl.MS_RECOMPUTE, rl.MS_BWD, rl.SAMPLING, "reader norms")
                           for r in customs)
    floor = rl.trace_step(bench, "floor", 2, 12, 4, True, 90)
    fl = {r.phase for r in floor.records if r.launches}
    assert not fl & {rl.MS_FWD, rl.MS_RECOMPUTE, rl.MS_BWD, rl.SAMPLING, "stack writes", "optimizer"}
    assert sum(r.n_launches for r in floor.records if r.phase == "other") <= 0.05 * sum(
        r.n_launches for r in floor.records)


def test_the_stream_model_is_bounded_by_host_and_device():
    card, cal = rl.CARDS["h200"], rl.CALIBRATION
    big = rl.OpRecord("big", "MLPs", False, [rl.Launch(dram=4.8e10)])
    small = [rl.OpRecord("s", "other", False, [rl.Launch(dram=1e3)]) for _ in range(100)]
    t_big, _ = rl.model_step([(big, 1)], card, cal)
    t_dev = rl.launch_time(big.launches[0], card, cal)
    assert t_big == pytest.approx(cal["host_aten_s"] + t_dev)
    # small ops after a big one hide their host time behind it
    t_all, rows = rl.model_step([(big, 1)] + [(s, 1) for s in small], card, cal)
    dev_small = 100 * rl.launch_time(small[0].launches[0], card, cal)
    assert t_all == pytest.approx(max(cal["host_aten_s"] * 101, t_big + dev_small))
    assert sum(r.modeled_ms for r in rows.values()) == pytest.approx(t_all * 1e3)


def test_stack_backward_by_columns_reads_dout_once():
    """The column-tile stack backward holds dout on chip: no dout re-reads
    from L2 (the writer-tile grid's and the legacy kernel's have one per
    further writer tile), only the mask's per column tile."""
    R, W, N = 121, 1640, 8 * 72 * 5120
    by_cols = costs.masked_sum_backward_stack(R, W, N, torch.bfloat16, torch.bfloat16, 90)
    assert by_cols.config["BY_COLUMNS"] and by_cols.kernel == "masked_sum_bwd_stack_by_columns"
    n_tiles = -(-N // by_cols.config["BLOCK_N"])
    assert by_cols.l2_read == (n_tiles - 1) * R * W * 2 * 2   # hi and lo, every tile flagged
    grid = dict(kms.backward_stack_config(R, W, N, torch.bfloat16, torch.bfloat16), BY_COLUMNS=False,
                BLOCK_R=16)
    by_writers = costs.masked_sum_backward_stack(R, W, N, torch.bfloat16, torch.bfloat16, 90, config=grid)
    w_tiles = -(-W // grid["BLOCK_W"])
    assert by_writers.l2_read - by_cols.l2_read == (w_tiles - 1) * R * N * 2
    assert by_writers.dram_bytes == by_cols.dram_bytes


def test_kernel_table_orders_the_mask_states():
    """--kernels: the masked sum alone at layer shapes. 0/1 masks (one product,
    no lo halves) are faster than fractional ones, dead writers faster still,
    and no state beats the card's copy bandwidth on the bytes it must move."""
    rows = rl.kernel_table(rl.CARDS["h200"], rl.CALIBRATION, rl.H200_COPY_TB_S)
    get = {(r["shape"], r["mode"], r["state"]): r for r in rows}
    for mode in ("fwd", "bwd"):
        frac = get[("cl13b-b8-L39", mode, "fractional masks")]["ms"]
        binary = get[("cl13b-b8-L39", mode, "0/1 masks")]["ms"]
        dead = get[("cl13b-b8-L39", mode, "99% writers dead")]["ms"]
        assert dead < binary < frac
    assert all(0 < r["copy_fraction"] <= 1 for r in rows)
    assert len(rows) == len(rl.KERNEL_SHAPES) * len(rl.KERNEL_STATES) * 2
