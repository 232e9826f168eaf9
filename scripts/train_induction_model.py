#!/usr/bin/env python
"""Train fastedge's shipped model, ``fastedge/shipped/induction-2l``.

A two-layer, four-head, attention-only transformer (Llama architecture:
``LlamaForCausalLM``, d_model 64, vocabulary 64, rotary positions) learns
induction on sequences of random tokens that repeat. The task is
``[BOS] t1..tk t1..tk`` (``fastedge.shipped.induction_batch``); training
sequences (``training_batch`` below) also put a random-length filler of other
tokens before and after the repeat, and draw k per row from 8..16, so that the
repeat sits at no fixed place. The loss is on the tokens that copying
predicts (the second copy of t2..tk).

Why Llama and not GPT-2: two GPT-2 attempts (learned absolute positions)
either learned positional lookup tricks instead of induction (sequences of 33
tokens: 99.8% copying accuracy, but no layer-0 head attends to the previous
token, scores <= 0.04, and no layer-1 head to the induction target, scores
<= 0.05; the heads attend to about half their own position and store bigram
information there), or had not learned after 3,000 steps (sequences of 64).
With rotary positions attention can only use relative positions, so no such
tricks exist, and the model learns the textbook circuit within a few hundred
steps: a previous-token head in layer 0 whose output is read by the keys of
induction heads in layer 1 (K-composition).

Attention-only in effect: every Llama block has an MLP, so each block's
``mlp.down_proj`` (no bias) is set to zero and frozen; the MLP writers ``m0``
and ``m1`` output exactly 0. ``intermediate_size`` is 16, so that the dead MLP
weights cost little space.

After training the script measures the copying accuracy, finds the heads of
the mechanism from their attention on the task (second half of fresh
sequences, k = DEFAULT_K; see ``fastedge.shipped.head_scores``):

* previous-token head: the layer-0 head with the most attention from ``i`` to
  ``i - 1`` (plus any other with score >= 0.5);
* induction heads: the layer-1 heads with the most attention from ``i`` to
  ``i - k + 1``, the token after the previous occurrence of the current token
  (best one plus any other with score >= 0.5),

and saves the model (safetensors and config, with ``save_pretrained``), the
heads and scores (``heads.json``) and a README into the output folder.

Deterministic: fixed seeds for the weights and every batch (bit-exact
reruns need the same thread count and kind of CPU). About three minutes on
two CPU cores:

    python scripts/train_induction_model.py                     # train and save
    python scripts/train_induction_model.py --prune-experiment  # ... then try edge pruning on it
    python scripts/train_induction_model.py --prune-from fastedge/shipped/induction-2l

``--prune-experiment`` / ``--prune-from`` run a throwaway feasibility check (not
fastedge's pruning loop): train edge masks with ``fastedge.patch`` towards
>= 90% edge sparsity and print the KL and the kept edges.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fastedge import shipped
from fastedge.shipped import (BOS, DEFAULT_K, MAX_K, TRAIN_K_RANGE, VOCAB_SIZE, copying_accuracy, head_scores,
                              induction_batch)

EVAL_SEED = 10_000_000   # evaluation batches use seeds from here on; training seeds stay below
TRAIN_LENGTH = 2 * MAX_K + 1
ARCH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=16)


def build_model(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB_SIZE, num_key_value_heads=ARCH["num_attention_heads"],
                         max_position_embeddings=TRAIN_LENGTH, bos_token_id=BOS, eos_token_id=BOS,
                         tie_word_embeddings=True, use_cache=False, **ARCH)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # attention-only: the MLPs' output projections are zero and stay zero
    for block in model.model.layers:
        with torch.no_grad():
            block.mlp.down_proj.weight.zero_()
        block.mlp.requires_grad_(False)
    model.config._attn_implementation = "eager"  # for output_attentions
    return model


def training_batch(n: int, seed: int, length: int = TRAIN_LENGTH, k_range=TRAIN_K_RANGE):
    """Training sequences: per row a segment length k (uniform in k_range) and
    a filler length p (uniform in 0 .. length-1-2k); the row is
    ``[BOS] f1..fp t1..tk t1..tk g1..`` padded to `length` with more filler.
    All non-BOS tokens of a row are distinct (so copying is unambiguous).
    Returns (input_ids [n, length], labels [n, length]) with labels at the
    copy-predictable tokens (second copy of t2..tk), -100 elsewhere.

    The random k and p per row put the repeat at no fixed place, so that no
    positional shortcut solves the training data."""
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.rand(n, VOCAB_SIZE - 1, generator=gen).argsort(dim=1) + 1
    lo, hi = k_range
    k = torch.randint(lo, hi + 1, (n, 1), generator=gen)
    p = (torch.rand(n, 1, generator=gen) * (length - 2 * k)).long()  # 0 .. length-1-2k
    s = torch.arange(1, length)[None]
    idx = torch.where(s <= p, k + s - 1,
          torch.where(s <= p + k, s - p - 1,
          torch.where(s <= p + 2 * k, s - p - k - 1, s - k - 1)))
    body = perm.gather(1, idx)
    input_ids = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), body], dim=1)
    pos = torch.arange(length)[None]
    predictable = (pos >= p + k + 2) & (pos <= p + 2 * k)
    labels = torch.where(predictable, input_ids, torch.full_like(input_ids, -100))
    return input_ids, labels


def train(model, *, steps: int, batch_size: int, lr: float, seed: int, log_every: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    eval_batch = induction_batch(512, seed=EVAL_SEED, k=DEFAULT_K)
    model.train()
    start = time.time()
    for step in range(steps):
        input_ids, labels = training_batch(batch_size, seed=seed * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            acc = copying_accuracy(model, eval_batch)
            model.train()
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  "
                  f"task copying accuracy (k={DEFAULT_K}) {acc:.4f}  {time.time() - start:6.1f}s", flush=True)
    model.eval()
    for block in model.model.layers:
        assert block.mlp.down_proj.weight.abs().max() == 0, "the MLPs must stay dead"


def identify_heads(model, batch, threshold: float = 0.5) -> dict:
    """The heads of the mechanism: the best head of each kind, plus any other
    head of its layer whose score passes `threshold`."""
    scores = head_scores(model, batch)
    found = {}
    for kind, layer in (("previous_token", 0), ("induction", 1)):
        cands = {h: s for h, s in scores[kind].items() if h.startswith(f"a{layer}.")}
        best = max(cands, key=cands.get)
        found[kind] = sorted({best} | {h for h, s in cands.items() if s >= threshold},
                             key=lambda h: -cands[h])
    return {**found, "scores": scores}


def write_readme(path, *, args, n_params, accuracy, acc_by_k, heads, train_seconds, threads):
    sc = heads["scores"]
    rows = "\n".join(
        f"| `{h}` | {sc['previous_token'][h]:.3f} | {sc['induction'][h]:.3f} |" for h in sc["previous_token"])
    by_k = ", ".join(f"k={k}: {a:.4f}" for k, a in acc_by_k.items())
    prev, ind = heads["previous_token"], heads["induction"]
    text = f"""# induction-2l: fastedge's shipped model

A two-layer, attention-only transformer (Hugging Face `LlamaForCausalLM`) that learned **induction**:
on `[BOS] t1..tk t1..tk` (distinct random tokens from a vocabulary of {VOCAB_SIZE}, `BOS = {BOS}`)
it predicts every token of the second copy after the first by copying.
It is the default model of `fastedge prune`; `fastedge.shipped.load_shipped_model()` loads it and
`fastedge.shipped.induction_batch(n, seed)` draws its task (with the corruption used for pruning:
the first copy replaced by other tokens).

## Architecture

- Llama: 2 layers, 4 heads of dimension 16 (4 k/v heads), d_model 64, vocabulary {VOCAB_SIZE},
  rotary positions, RMSNorm, tied embeddings, no biases; {n_params:,} parameters.
  fastedge's graph: writers `embeds`, `a{{l}}.h{{i}}`, `m{{l}}`; 110 edges.
- Attention-only in effect: every Llama block has an MLP (`intermediate_size` 16 here), so each
  block's `mlp.down_proj` was set to zero and frozen. The MLP writers `m0`, `m1` output exactly 0.
- Why not GPT-2: with learned absolute positions and these short sequences, GPT-2 learned
  positional lookup tricks instead of induction (see `scripts/train_induction_model.py`).
  Rotary positions only let attention use relative positions.

## Training (`scripts/train_induction_model.py`)

- Data: rows of {TRAIN_LENGTH} tokens, `[BOS]`, a random-length filler, `t1..tk t1..tk`, more filler;
  k uniform in {TRAIN_K_RANGE[0]}..{TRAIN_K_RANGE[1]} per row; all tokens of a row distinct. Cross-entropy on
  the tokens copying predicts (second copy of t2..tk).
- {args.steps} steps, batch {args.batch_size}, AdamW (lr {args.lr}, betas (0.9, 0.98), weight decay 0.01
  on matrices), linear warm-up over 5% of the steps, cosine decay to 10%, gradient clipping 1.0,
  seed {args.seed}. CPU, {threads} threads, {train_seconds:.0f} s.

## Results (fresh task sequences, 512 per k)

- Copying accuracy (argmax at the k-1 predictable positions) at k={DEFAULT_K}: **{accuracy:.4f}**.
- By k: {by_k}.

## The mechanism

Attention averaged over the second copy's query positions `i = k+1..2k` (k={DEFAULT_K}):
previous-token score = attention from `i` to `i-1`; induction score = attention from `i` to
`i-k+1`, the token after the previous occurrence of the current token.

| head | previous-token | induction |
|---|---|---|
{rows}

- Previous-token head(s) in layer 0: {", ".join(f"`{h}`" for h in prev)}
- Induction head(s) in layer 1: {", ".join(f"`{h}`" for h in ind)}

The previous-token head writes each position's previous token into the residual stream; the
induction heads read it through their **key** input (K-composition: edges
{", ".join(f"`{prev[0]} -> {h}.k`" for h in ind)}), match it against the current token in their
queries, and copy the attended token through their values to the output.
These names are also in `heads.json` and `fastedge.shipped.IDENTIFIED_HEADS`.

## Edge pruning on it (measured once, `scripts/train_induction_model.py --prune-from <this folder>`)

Interchange ablation (`induction_batch`'s corruption), no node masks, KL(full || circuit) on the
target positions plus a Lagrangian on the expected edge sparsity (target raised to 1.0 over 600
steps), AdamW lr 0.1, batch 32, 1,000 steps (about 2 minutes on one CPU core): deterministic masks
above 0.5 keep 10 of 110 edges (sparsity 0.909), KL < 1e-4, copying accuracy 1.0 (empty circuit:
KL 19.0). The 10 edges are the mechanism and nothing else: `embeds -> a0.h2.v`,
`a0.h2 -> a1.h{{0,1,2}}.k`, `embeds -> a1.h{{0,1,2}}.v`, `a1.h{{0,1,2}} -> resid_post`.
With one induction head only (4 edges) the KL is 2.9 to 6.6: the induction heads add up.
"""
    with open(path, "w") as f:
        f.write(text)


# --- a throwaway feasibility check of edge pruning on the trained model --------------

def _drop_dangling(edges):
    """Drop edges into the readers of writers with no kept path to resid_post."""
    def writer_of(reader):  # "a1.h2.k" -> "a1.h2", "m0" -> "m0"
        return reader.rsplit(".", 1)[0] if reader.count(".") == 2 else reader
    live = {"resid_post"}
    changed = True
    while changed:
        changed = False
        for w, r in edges:
            if (r == "resid_post" or writer_of(r) in live) and w not in live:
                live.add(w)
                changed = True
    return [(w, r) for w, r in edges if r == "resid_post" or writer_of(r) in live]


def prune_experiment(model, heads, *, steps: int, lr: float, target: float, batch_size: int,
                     penalty: str = "expected", seed: int = 0) -> dict:
    """Train edge masks (fastedge.patch, interchange ablation, no node masks)
    to minimise KL(full || circuit) at the target positions plus a Lagrangian
    sparsity penalty ``l1 * (s - t) + l2 * (s - t)^2`` (multipliers by gradient
    ascent), the target t raised linearly over the first 60% of the steps;
    then fix the circuit at the deterministic masks > 0.5 and report.

    ``penalty="sampled"``: s from the sampled masks (``out.edge_sparsity``, as
    in docs/CONCEPTS.md section 3). ``penalty="expected"``: s = 1 - mean P(z != 0)
    (``hard_concrete_l0``), whose gradient does not vanish while the masks
    sit clamped at 1 (with log_alpha ~ 10 a sampled mask is clamped at 1
    unless u < 2e-4, so the sampled sparsity barely moves at first)."""
    import fastedge
    em = fastedge.patch(model, node_masks=False, seed=seed)
    g = em.graph
    # all masks 1 reproduces the model
    b = induction_batch(16, seed=EVAL_SEED + 1)
    em.set_circuit(g.edges())
    with torch.no_grad():
        full = model(b.input_ids).logits
        diff = (em(b.input_ids, b.corrupted_input_ids).logits - full).abs().max().item()
    print(f"[prune] all masks 1: max |logits - model logits| = {diff:.2e}  ({g.n_edges} edges)")
    em.reset_masks()

    lam = torch.zeros(2, requires_grad=True)
    opt = torch.optim.AdamW(list(em.parameters()), lr=lr, weight_decay=0.0)
    opt_lam = torch.optim.AdamW([lam], lr=lr, weight_decay=0.0)
    warm = int(0.6 * steps)
    em.train()
    t0 = time.time()
    for step in range(steps):
        batch = induction_batch(batch_size, seed=20_000_000 + step)
        with torch.no_grad():
            logp_full = torch.log_softmax(model(batch.input_ids).logits[batch.target_mask], -1)
        out = em(batch.input_ids, batch.corrupted_input_ids)
        logp = torch.log_softmax(out.logits[batch.target_mask], -1)
        kl = torch.nn.functional.kl_div(logp, logp_full, log_target=True, reduction="batchmean")
        t = target * min(1.0, step / warm)
        if penalty == "sampled":
            sparsity = out.edge_sparsity
        else:
            sparsity = 1 - sum(fastedge.hard_concrete_l0(p).sum() for p in em.edge_log_alpha) / g.n_edges
        gap = sparsity - t
        loss = kl + lam[0] * gap + lam[1] * gap ** 2
        opt.zero_grad(set_to_none=True)
        opt_lam.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lam.grad.neg_()  # gradient ascent on the multipliers
        opt_lam.step()
        if (step + 1) % 50 == 0:
            print(f"[prune] step {step + 1:4d}  kl {kl.item():.4f}  sparsity ({penalty}) {sparsity.item():.3f}  "
                  f"sampled {out.edge_sparsity.item():.3f}  target {t:.3f}  {time.time() - t0:.1f}s", flush=True)
    seconds = time.time() - t0
    em.eval()
    kept = []
    for gi, gr in enumerate(g.groups):
        keep = fastedge.hard_concrete_deterministic(em.edge_log_alpha[gi].detach()) > 0.5
        for r, w in keep.nonzero().tolist():
            kept.append((g.writers[w], g.readers[gr.first_reader + r]))
    ev = induction_batch(512, seed=EVAL_SEED + 2)
    m = ev.target_mask

    def kl_acc(edges):
        em.set_circuit(edges)
        with torch.no_grad():
            full = model(ev.input_ids).logits
            circ = em(ev.input_ids, ev.corrupted_input_ids).logits
        kl = torch.nn.functional.kl_div(torch.log_softmax(circ[m], -1), torch.log_softmax(full[m], -1),
                                        log_target=True, reduction="batchmean").item()
        acc = (circ[:, :-1].argmax(-1)[m[:, :-1]] == ev.input_ids[:, 1:][m[:, :-1]]).float().mean().item()
        return kl, acc

    kl, acc = kl_acc(kept)
    kl_empty, acc_empty = kl_acc([])
    pruned = _drop_dangling(kept)
    kl_pruned, acc_pruned = kl_acc(pruned)
    sparsity = 1 - len(kept) / g.n_edges
    mech = [(p, f"{i}.k") for p in heads["previous_token"] for i in heads["induction"]]
    has_mech = [e for e in mech if e in kept]
    print(f"[prune] {steps} steps, lr {lr}, target {target}, {penalty} sparsity penalty, {seconds:.0f}s: "
          f"circuit of {len(kept)}/{g.n_edges} edges, sparsity {sparsity:.3f}, "
          f"KL(full || circuit) {kl:.4f}, copying accuracy {acc:.4f} "
          f"(empty circuit: KL {kl_empty:.3f}, accuracy {acc_empty:.4f})")
    print(f"[prune] kept edges: {kept}")
    print(f"[prune] without dangling edges (docs/CONCEPTS.md section 4): {len(pruned)} edges, sparsity "
          f"{1 - len(pruned) / g.n_edges:.3f}, KL {kl_pruned:.4f}, copying accuracy {acc_pruned:.4f}")
    print(f"[prune] mechanism edge(s) kept: {has_mech or 'NONE'}")
    em.unpatch()
    return {"kept": kept, "sparsity": sparsity, "kl": kl, "accuracy": acc, "kl_empty": kl_empty,
            "pruned": pruned, "kl_pruned": kl_pruned,
            "mechanism_edges": has_mech, "seconds": seconds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=shipped.SHIPPED_MODEL_DIR)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--min-accuracy", type=float, default=0.95,
                   help="refuse to save a model below this copying accuracy")
    p.add_argument("--prune-experiment", action="store_true",
                   help="after training, try edge pruning on the model (a feasibility check)")
    p.add_argument("--prune-from", default=None,
                   help="skip training: run the pruning experiment on the model saved in this folder")
    p.add_argument("--prune-steps", type=int, default=1000)
    p.add_argument("--prune-lr", type=float, default=0.1)
    p.add_argument("--prune-target", type=float, default=1.0)
    p.add_argument("--prune-penalty", choices=("expected", "sampled"), default="expected")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prune_kw = dict(steps=args.prune_steps, lr=args.prune_lr, target=args.prune_target, batch_size=32,
                    penalty=args.prune_penalty)

    if args.prune_from:
        model = AutoModelForCausalLM.from_pretrained(args.prune_from, attn_implementation="eager").eval()
        with open(os.path.join(args.prune_from, "heads.json")) as f:
            heads = json.load(f)
        prune_experiment(model, heads, **prune_kw)
        return 0

    model = build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Llama, {ARCH['num_hidden_layers']} layers x {ARCH['num_attention_heads']} heads, "
          f"d_model {ARCH['hidden_size']}, vocab {VOCAB_SIZE}, dead MLPs: {n_params:,} parameters")
    t0 = time.time()
    train(model, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
          log_every=args.log_every)
    train_seconds = time.time() - t0

    acc_by_k = {k: copying_accuracy(model, induction_batch(512, seed=EVAL_SEED + k, k=k))
                for k in range(TRAIN_K_RANGE[0], TRAIN_K_RANGE[1] + 1, 2)}
    accuracy = copying_accuracy(model, induction_batch(512, seed=EVAL_SEED + 100, k=DEFAULT_K))
    heads = identify_heads(model, induction_batch(512, seed=EVAL_SEED + 200, k=DEFAULT_K))
    print(f"trained in {train_seconds:.1f}s; copying accuracy at k={DEFAULT_K}: {accuracy:.4f}")
    print("copying accuracy by k: " + ", ".join(f"{k}: {a:.4f}" for k, a in acc_by_k.items()))
    print("head      previous-token  induction")
    for h in heads["scores"]["previous_token"]:
        print(f"  {h:6s}  {heads['scores']['previous_token'][h]:14.3f}  {heads['scores']['induction'][h]:9.3f}")
    print(f"previous-token head(s): {heads['previous_token']}; induction head(s): {heads['induction']}")
    if accuracy < args.min_accuracy:
        print(f"copying accuracy {accuracy:.4f} is below {args.min_accuracy}: not saving", file=sys.stderr)
        return 1

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    gen_cfg = os.path.join(args.out, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)  # not a generation model
    with open(os.path.join(args.out, "heads.json"), "w") as f:
        json.dump({"previous_token": heads["previous_token"], "induction": heads["induction"],
                   "k": DEFAULT_K, "copying_accuracy": round(accuracy, 4),
                   "scores": {kind: {h: round(s, 4) for h, s in d.items()}
                              for kind, d in heads["scores"].items()}}, f, indent=2)
        f.write("\n")
    write_readme(os.path.join(args.out, "README.md"), args=args, n_params=n_params, accuracy=accuracy,
                 acc_by_k=acc_by_k, heads=heads, train_seconds=train_seconds, threads=torch.get_num_threads())
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved to {args.out} ({size / 1024:.0f} KiB): {sorted(os.listdir(args.out))}")

    if args.prune_experiment:
        prune_experiment(model, heads, **prune_kw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
