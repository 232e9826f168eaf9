"""Data at scale (issue 12): the full model's reference per batch (exact KL,
nothing cached per example), the compact `ExampleStore`, and the induction
draw in blocks."""
import math
import random
import tracemalloc

import pytest
import torch
import torch.nn.functional as F

from fastedge import objectives
from fastedge.tasks import Example, TaskData, TaskDataError, WordTokenizer, collate, get_task, make_induction
from fastedge.tasks.store import ExampleStore


# -- the full model's reference --------------------------------------------------------------

def _tiny_gpt2(vocab=97, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=vocab, n_positions=32, bos_token_id=None, eos_token_id=None))
    with torch.no_grad():  # logits of a few units, so that the distributions are far from uniform
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def _kl_bound(ref64: torch.Tensor, logq64: torch.Tensor, logits: torch.Tensor, circuit: torch.Tensor) -> float:
    """How far a float32 KL(p || q) averaged over T rows may be from the
    float64 one: each log-softmax entry is x - m - log(sum exp(x - m)),
    three float32 operations on numbers of size at most |x| + |m| + log V,
    so it is off by at most 4 u (2 max|x| + log V + 1) (u = 2**-24, with one
    unit for exp's own rounding); both log-probabilities carry that, and the
    sum over V of p (log p - log q) adds gamma(V + 1) times the sum of the
    terms' magnitudes."""
    u = 2.0 ** -24
    V = logits.shape[-1]
    big = max(logits.abs().max().item(), circuit.abs().max().item())
    per_entry = 4 * u * (2 * big + math.log(V) + 1)
    p = ref64.exp()
    gamma = (V + 1) * u / (1 - (V + 1) * u)
    magnitude = (p * (ref64 - logq64).abs()).sum(-1).max().item()
    return 2 * per_entry * (1 + gamma) + gamma * magnitude + 2 * u * magnitude


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_reference_per_batch_gives_the_exact_kl(temperature):
    """`_FullModelReference` on a padded batch: the float32 KL of a random
    circuit against the full model equals the float64 KL computed from the
    full model's float64 logits, within the float32 rounding bound."""
    from fastedge import patch
    from fastedge.evaluate import full_logits
    from fastedge.prune import _FullModelReference
    model = _tiny_gpt2()
    em = patch(model)
    task = make_induction(n_examples=40, seed=3, vocab_size=97, half_length=8)
    rng = random.Random(0)
    examples = [task.examples[i] for i in rng.sample(range(len(task)), 7)]
    # awkward shapes: examples of different lengths, so the batch is padded
    examples = [Example(clean_ids=e.clean_ids[:len(e) - j], corrupted_ids=e.corrupted_ids[:len(e) - j],
                        target_positions=[p for p in e.target_positions if p + 1 < len(e) - j],
                        clean_answer=e.clean_answer[:len(e.target_positions) - j],
                        corrupted_answer=e.corrupted_answer[:len(e.target_positions) - j])
                for j, e in enumerate(examples)]
    batch = collate(examples, pad_id=5)
    objective = objectives.Objective("kl", temperature)
    ref = _FullModelReference(em, torch.device("cpu"), objective).get(batch)
    T = int(batch.target_mask.sum())
    assert ref.shape == (T, 97) and ref.dtype == torch.float32

    with torch.no_grad():
        model64 = _tiny_gpt2().double()
        logits64 = full_logits(patch(model64), batch.input_ids, batch.attention_mask)[batch.target_mask]
    ref64 = F.log_softmax(logits64 / temperature, dim=-1)
    circuit = torch.randn(T, 97, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    logq64 = F.log_softmax(circuit / temperature, dim=-1)
    exact = (ref64.exp() * (ref64 - logq64)).sum(-1).mean().item()
    got = objective.divergence(ref, circuit.float()).item()
    # the reference's own rounding: the float32 model's logits against the float64 model's
    logits32 = full_logits(em, batch.input_ids, batch.attention_mask)[batch.target_mask].detach().double()
    model_gap = (logits32 - logits64).abs().max().item() / temperature
    bound = _kl_bound(ref64, logq64, logits64 / temperature, circuit / temperature) + 2 * model_gap
    assert exact > 0.1
    assert abs(got - exact) <= bound, (got, exact, bound)


def test_reference_keeps_nothing_per_example():
    """The reference holds no per-example state: computing it for many
    batches leaves the object as it was."""
    from fastedge import patch
    from fastedge.prune import _FullModelReference
    em = patch(_tiny_gpt2())
    reference = _FullModelReference(em, torch.device("cpu"))
    before = dict(vars(reference))
    task = make_induction(n_examples=64, seed=0, vocab_size=97, half_length=4)
    for b in task.batches(8):
        reference.get(b)
    assert vars(reference) == before


def test_reference_refuses_a_model_with_non_finite_logits():
    from fastedge import patch
    from fastedge.prune import NonFiniteLossError, _FullModelReference
    model = _tiny_gpt2()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    task = make_induction(n_examples=8, seed=0, vocab_size=97, half_length=4)
    with pytest.raises(NonFiniteLossError, match="weight tensors hold NaN"):
        _FullModelReference(patch(model), torch.device("cpu")).get(collate(task.examples[:4]))


def test_mse_reference_is_the_raw_output():
    from fastedge import patch
    from fastedge.evaluate import full_logits
    from fastedge.prune import _FullModelReference
    em = patch(_tiny_gpt2())
    batch = collate(make_induction(n_examples=8, seed=0, vocab_size=97, half_length=4).examples[:5])
    ref = _FullModelReference(em, torch.device("cpu"), objectives.Objective("mse", 0.5)).get(batch)
    want = full_logits(em, batch.input_ids, batch.attention_mask)[batch.target_mask]
    torch.testing.assert_close(ref, want.float(), rtol=0, atol=0)


# -- the example store ------------------------------------------------------------------------

def _random_example(rng: random.Random, i: int) -> Example:
    n = rng.randint(3, 12)
    clean = [rng.randrange(2 ** 31 - 1) if rng.random() < 0.1 else rng.randrange(60000) for _ in range(n)]
    corrupted = [rng.randrange(60000) for _ in range(n)]
    offset = rng.choice([0, 1])
    positions = sorted(rng.sample(range(n - offset), rng.randint(1, n - offset)))
    if offset:
        ca, xa = [clean[p + 1] for p in positions], [corrupted[p + 1] for p in positions]
    else:
        ca, xa = [rng.randrange(50) for _ in positions], [rng.randrange(50) for _ in positions]
    meta = rng.choice([{}, {"text": "Grüße, 李", "k": [1, 2.5, None], "nested": {"a": True}},
                       {"pair": (1, 2)}, {3: "int key"}, {"obj": object.__name__}])
    return Example(clean_ids=clean, corrupted_ids=corrupted, target_positions=positions, clean_answer=ca,
                   corrupted_answer=xa, split=rng.choice(["train", "validation"]),
                   source=rng.choice(["", f"data.jsonl:{i}", f"ünïcode:{i}"]), meta=meta, answer_offset=offset)


def test_store_gives_back_every_field_of_every_example():
    rng = random.Random(7)
    examples = [_random_example(rng, i) for i in range(300)]
    store = ExampleStore(examples)
    assert len(store) == 300
    for e, got in zip(examples, store):
        assert got == e
        assert type(got.meta.get("pair", ())) is tuple  # meta JSON would change is kept as it is
    assert store[-1] == examples[-1] and store[17] == examples[17]
    with pytest.raises(IndexError):
        store[300]
    assert store == examples
    # examples are built on access: changing one changes nothing stored
    got = store[0]
    got.clean_ids[0] += 1
    got.meta["new"] = 1
    assert store[0] == examples[0]


def test_store_views_share_the_arrays_and_are_read_only():
    rng = random.Random(1)
    examples = [_random_example(rng, i) for i in range(100)]
    store = ExampleStore(examples)
    for name in ("train", "validation"):
        view = store.split(name)
        assert list(view) == [e for e in examples if e.split == name]
        assert view.split_counts()[name] == len(view)
    sliced = store[10:50:3]
    assert list(sliced) == examples[10:50:3]
    assert list(sliced[2:5]) == examples[10:50:3][2:5]
    assert list(store.split("train")[::2]) == [e for e in examples if e.split == "train"][::2]
    with pytest.raises(TypeError, match="read-only"):
        sliced.append(examples[0])
    store.set_split(3, "validation")
    assert store[3].split == "validation" and sliced is not None
    assert list(store.lengths()) == [len(e) for e in examples]
    assert store.token_range() == (min(min(e.clean_ids + e.corrupted_ids) for e in examples),
                                   max(max(e.clean_ids + e.corrupted_ids) for e in examples))
    assert sliced.token_range() == (min(min(e.clean_ids + e.corrupted_ids) for e in examples[10:50:3]),
                                    max(max(e.clean_ids + e.corrupted_ids) for e in examples[10:50:3]))


def test_store_refuses_ids_beyond_32_bits():
    e = Example(clean_ids=[1, 2 ** 31, 3], corrupted_ids=[1, 2, 3], target_positions=[0], clean_answer=[2 ** 31],
                corrupted_answer=[2], source="big:1")
    with pytest.raises(TaskDataError, match="big:1: .*32 bits"):
        ExampleStore([e])


def test_task_data_on_a_store_splits_checks_and_counts_without_lists():
    rng = random.Random(2)
    examples = [_random_example(rng, i) for i in range(80)]
    for flavour in (ExampleStore(examples), list(examples)):
        data = TaskData("t", flavour)
        assert len(data.split("train")) + len(data.split("validation")) == 80
        assert data.max_length == max(len(e) for e in examples)
        assert repr(data) == repr(TaskData("t", list(examples)))
        data.check_fits(vocab_size=2 ** 31)
        worst = max(range(80), key=lambda i: max(examples[i].clean_ids + examples[i].corrupted_ids))
        first_bad = next(i for i, e in enumerate(examples) if max(e.clean_ids + e.corrupted_ids) >= 60000)
        with pytest.raises(TaskDataError, match="outside the vocabulary"):
            data.check_fits(vocab_size=60000)
        try:
            data.check_fits(vocab_size=60000)
        except TaskDataError as e:  # the first offending example is named, store or list
            assert str(e).startswith(examples[first_bad].source or "an example of t")
        assert worst is not None
        with pytest.raises(TaskDataError, match="positions"):
            data.check_fits(vocab_size=2 ** 31, max_positions=5)
    assert isinstance(TaskData("t", ExampleStore(examples)).split("train").examples, ExampleStore)


def test_store_is_much_smaller_than_a_list_of_examples():
    """What an Example costs: tracemalloc over 5,000 induction examples with
    GPT-2's vocabulary, as a list of Examples and as a store."""
    task = make_induction(n_examples=5000, seed=0, vocab_size=50257, half_length=12, distinct=False)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        as_list = list(task.examples)
        list_bytes = tracemalloc.get_traced_memory()[0] - base
        del as_list
        base = tracemalloc.get_traced_memory()[0]
        store = ExampleStore(task.examples)
        store_bytes = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert store_bytes <= store.nbytes() * 1.3 + 100_000
    assert store_bytes * 8 < list_bytes, (store_bytes, list_bytes)
    assert store.nbytes() / 5000 < 400  # bytes an example: 48 int32 tokens, 11 positions, offsets, source


def test_building_a_large_task_never_holds_a_list_of_its_examples():
    """Peak traced memory while generating 20,000 induction examples stays
    near the store's own size (a list of Examples would be about 3 KB each)."""
    tracemalloc.start()
    try:
        task = make_induction(n_examples=20_000, seed=0, vocab_size=1000, half_length=12, distinct=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(task.examples, ExampleStore)
    assert peak < 2 * task.examples.nbytes() + 8_000_000, (peak, task.examples.nbytes())


@pytest.mark.parametrize("distinct", [True, False])
def test_induction_drawn_in_blocks_is_the_one_shot_draw(distinct):
    """The block-wise draw gives exactly the examples of the draw over all
    rows at once (the module docstring's formula): the shipped model's data
    and every seed's examples are unchanged. 300 rows over 50,257 tokens are
    4 blocks."""
    n, k, V, first, seed = 300, 6, 50257, 1, 5
    task = make_induction(n_examples=n, seed=seed, vocab_size=V, half_length=k, first_token=first,
                          bos_token_id=0, distinct=distinct)
    g = torch.Generator().manual_seed(seed)
    if distinct:
        perm = torch.rand(n, V - first, generator=g).argsort(dim=1) + first
        clean, other = perm[:, :k], perm[:, k:2 * k]
    else:
        clean = torch.randint(first, V, (n, k), generator=g)
        other = torch.randint(first, V, (n, k), generator=g)
    for i, e in enumerate(task.examples):
        t, s = clean[i].tolist(), other[i].tolist()
        assert e.clean_ids == [0] + t + t and e.corrupted_ids == [0] + s + t, i


def test_generated_text_tasks_are_stores_and_deterministic():
    word = WordTokenizer()
    a = get_task("ioi", word, n_examples=300, seed=4)
    b = get_task("ioi", word, n_examples=300, seed=4)
    assert isinstance(a.examples, ExampleStore)
    assert list(a.examples) == list(b.examples)
    keys = {(tuple(e.clean_ids), tuple(e.corrupted_ids)) for e in a.examples}
    assert len(keys) == 300  # the duplicate check still works on digests
    assert all(e.meta["clean_prompt"] for e in a.examples)


def test_reference_with_the_head_at_target_positions_only_equals_the_full_head():
    """GPT-2 takes logits_to_keep: the head runs at the positions that are a
    target in some row. The result equals the full head's at the targets
    (up to float32 rounding of the head's matrix product), on a padded batch
    whose rows have their targets at different positions."""
    from fastedge import patch
    from fastedge.prune import _FullModelReference
    em = patch(_tiny_gpt2())
    task = make_induction(n_examples=20, seed=1, vocab_size=97, half_length=6)
    examples = []
    for j, e in enumerate(task.examples[:6]):  # shift rows by j tokens: targets at different columns
        pad = [e.clean_ids[0]] * j
        examples.append(Example(clean_ids=pad + e.clean_ids, corrupted_ids=pad + e.corrupted_ids,
                                target_positions=[p + j for p in e.target_positions],
                                clean_answer=e.clean_answer, corrupted_answer=e.corrupted_answer))
    batch = collate(examples)
    reference = _FullModelReference(em, torch.device("cpu"), objectives.Objective("mse"))
    assert reference.keep
    kept = reference.get(batch)
    reference.keep = False
    full = reference.get(batch)
    assert kept.shape == full.shape == (int(batch.target_mask.sum()), 97)
    # the head's product over K = 16 inputs in float32: gamma(17) times the sum of |terms|
    u = 2.0 ** -24
    h = em.model.transformer(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    bound = 17 * u / (1 - 17 * u) * (h.abs().max() * em.model.lm_head.weight.abs().sum(-1).max()).item() * 2
    assert (kept - full).abs().max().item() <= bound
    assert not torch.equal(kept[:3], full[3:6])  # rows are not shuffled
