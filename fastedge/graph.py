"""The edge graph of a decoder-only transformer (docs/CONCEPTS.md section 1).

Writers, in order: the embeddings (`tok_embeds`, `pos_embeds` for learned
absolute positions; `embeds` for rotary models), then per layer `l` its
attention heads `a{l}.h{i}` (one per query head) and its MLP `m{l}`.
Readers, per layer: `a{l}.h{i}.q` for every query head, `a{l}.h{j}.k` and
`a{l}.h{j}.v` for every key/value head, and `m{l}`; then `resid_post`.

Every reader reads a *prefix* of the writer order: q/k/v readers of layer `l`
read every writer before layer `l`; a sequential block's MLP also reads its
own layer's heads; a parallel block's MLP reads what its heads read;
`resid_post` reads everything. The kernels consume readers in groups that
share a prefix (`ReaderGroup`): per layer the attention readers, then the MLP,
then `resid_post`.

Edges are numbered reader by reader, writers in order within each reader's
prefix: edge `(w, r)` has index `reader_edge_start[r] + w`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Optional


@dataclass(frozen=True)
class ReaderGroup:
    """Readers computed in one kernel call: all read writers [0, n_writers)."""
    kind: str            # "attn", "mlp" or "resid_post"
    layer: Optional[int]
    first_reader: int    # global index of the group's first reader (Philox reader_offset)
    n_readers: int
    n_writers: int       # the prefix length
    index: int = 0       # position in EdgeGraph.groups (and in EdgeModel.edge_log_alpha)

    @property
    def readers(self) -> range:
        return range(self.first_reader, self.first_reader + self.n_readers)


@dataclass
class EdgeGraph:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    embeddings: tuple = ("embeds",)
    parallel_blocks: bool = False
    model_type: str = ""
    writers: list = field(init=False, repr=False)
    readers: list = field(init=False, repr=False)
    groups: list = field(init=False, repr=False)

    def __post_init__(self):
        if self.n_layers < 1 or self.n_heads < 1 or self.n_kv_heads < 1:
            raise ValueError(f"an edge graph needs at least one layer, head and k/v head, got "
                             f"layers={self.n_layers}, heads={self.n_heads}, kv_heads={self.n_kv_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads cannot be grouped over "
                             f"{self.n_kv_heads} key/value heads")
        self.embeddings = tuple(self.embeddings)
        writers, readers, groups = list(self.embeddings), [], []
        for layer in range(self.n_layers):
            before_layer = len(writers)
            attn = ([f"a{layer}.h{i}.q" for i in range(self.n_heads)]
                    + [f"a{layer}.h{j}.k" for j in range(self.n_kv_heads)]
                    + [f"a{layer}.h{j}.v" for j in range(self.n_kv_heads)])
            groups.append(ReaderGroup("attn", layer, len(readers), len(attn), before_layer, len(groups)))
            readers += attn
            writers += [f"a{layer}.h{i}" for i in range(self.n_heads)]
            mlp_prefix = before_layer if self.parallel_blocks else len(writers)
            groups.append(ReaderGroup("mlp", layer, len(readers), 1, mlp_prefix, len(groups)))
            readers.append(f"m{layer}")
            writers.append(f"m{layer}")
        groups.append(ReaderGroup("resid_post", None, len(readers), 1, len(writers), len(groups)))
        readers.append("resid_post")
        self.writers, self.readers, self.groups = writers, readers, groups
        self.writer_index = {name: i for i, name in enumerate(writers)}
        self.reader_index = {name: i for i, name in enumerate(readers)}
        self.reader_prefix = [0] * len(readers)
        for g in groups:
            for r in g.readers:
                self.reader_prefix[r] = g.n_writers
        self.reader_edge_start = []
        total = 0
        for prefix in self.reader_prefix:
            self.reader_edge_start.append(total)
            total += prefix
        self.n_edges = total

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_config(cls, config) -> "EdgeGraph":
        """The graph of a Hugging Face causal LM config (no weights needed)."""
        from fastedge.architectures import describe_config
        return cls(**describe_config(config))

    # -- sizes and lookups -------------------------------------------------------

    @property
    def n_writers(self) -> int:
        return len(self.writers)

    @property
    def n_readers(self) -> int:
        return len(self.readers)

    def has_edge(self, writer: str, reader: str) -> bool:
        w, r = self._indices(writer, reader)
        return w < self.reader_prefix[r]

    def edge_index(self, writer: str, reader: str) -> int:
        w, r = self._indices(writer, reader)
        if w >= self.reader_prefix[r]:
            raise KeyError(f"no edge {writer} -> {reader}: {writer} is not upstream of {reader}")
        return self.reader_edge_start[r] + w

    def edge(self, index: int) -> tuple[str, str]:
        """(writer, reader) names of edge `index`."""
        if not 0 <= index < self.n_edges:
            raise IndexError(f"edge index {index} out of range [0, {self.n_edges})")
        import bisect
        r = bisect.bisect_right(self.reader_edge_start, index) - 1
        return self.writers[index - self.reader_edge_start[r]], self.readers[r]

    def edges(self) -> Iterator[tuple[str, str]]:
        for r, reader in enumerate(self.readers):
            for w in range(self.reader_prefix[r]):
                yield self.writers[w], reader

    def split_by_group(self, flat):
        """A ``[n_edges]`` tensor in graph edge order as one ``[R_g, W_g]``
        view per reader group (``groups`` order): the layout of an
        `EdgeModel`'s edge masks."""
        if tuple(flat.shape) != (self.n_edges,):
            raise ValueError(f"expected one value per edge ({self.n_edges}), got shape {list(flat.shape)}")
        sizes = [g.n_readers * g.n_writers for g in self.groups]
        return [block.view(g.n_readers, g.n_writers) for block, g in zip(flat.split(sizes), self.groups)]

    def group_of(self, reader: str) -> ReaderGroup:
        r = self.reader_index[reader]
        for g in self.groups:
            if r in g.readers:
                return g
        raise KeyError(reader)

    def _indices(self, writer: str, reader: str) -> tuple[int, int]:
        if writer not in self.writer_index:
            raise KeyError(f"unknown writer {writer!r} (writers look like "
                           f"{self.writers[0]!r}, 'a0.h0', 'm0')")
        if reader not in self.reader_index:
            raise KeyError(f"unknown reader {reader!r} (readers look like 'a0.h0.q', 'm0', 'resid_post')")
        return self.writer_index[writer], self.reader_index[reader]

    # -- serialisation -----------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": "fastedge.EdgeGraph/1", "model_type": self.model_type,
                "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "embeddings": list(self.embeddings), "parallel_blocks": self.parallel_blocks,
                "n_writers": self.n_writers, "n_readers": self.n_readers, "n_edges": self.n_edges}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "EdgeGraph":
        if d.get("format") != "fastedge.EdgeGraph/1":
            raise ValueError(f"not a serialised EdgeGraph (format {d.get('format')!r})")
        g = cls(n_layers=d["n_layers"], n_heads=d["n_heads"], n_kv_heads=d["n_kv_heads"],
                embeddings=tuple(d["embeddings"]), parallel_blocks=d["parallel_blocks"],
                model_type=d.get("model_type", ""))
        for key in ("n_writers", "n_readers", "n_edges"):
            if key in d and d[key] != getattr(g, key):
                raise ValueError(f"serialised graph says {key}={d[key]} but rebuilds to {getattr(g, key)}")
        return g

    @classmethod
    def from_json(cls, text: str) -> "EdgeGraph":
        return cls.from_dict(json.loads(text))

    def fingerprint(self) -> str:
        """A short stable hash of the graph's structure."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __eq__(self, other) -> bool:
        return isinstance(other, EdgeGraph) and self.to_dict() == other.to_dict()


# -- checking edges and nodes given by name ---------------------------------------------

def edge_pair(item, index: int, what: str = "edge") -> tuple[str, str]:
    """(writer, reader) of a [writer, reader] pair of names; a ValueError
    names the item and its position otherwise (a 3-tuple, a bare string)."""
    if (not isinstance(item, (list, tuple)) or len(item) != 2
            or not all(isinstance(x, str) for x in item)):
        raise ValueError(f"{what} {index} is {item!r}: expected a [writer, reader] pair of names")
    return item[0], item[1]


def edge_indices(pairs: Iterable, graph: EdgeGraph, what: str = "edge") -> list[int]:
    """Graph edge indices of (writer, reader) name pairs; a ValueError names the
    first bad pair and its position."""
    if isinstance(pairs, str):
        raise ValueError(f"{what}s must be a list of [writer, reader] pairs, got the string {pairs!r}")
    out = []
    for i, item in enumerate(pairs):
        w, r = edge_pair(item, i, what)
        wi = graph.writer_index.get(w)
        ri = graph.reader_index.get(r)
        if wi is None:
            raise ValueError(f"{what} {i} [{w!r}, {r!r}]: unknown writer {w!r} (writers are "
                             f"{', '.join(graph.embeddings)}, a{{l}}.h{{i}}, m{{l}} for "
                             f"{graph.n_layers} layers and {graph.n_heads} heads)")
        if ri is None:
            raise ValueError(f"{what} {i} [{w!r}, {r!r}]: unknown reader {r!r} (readers are "
                             f"a{{l}}.h{{i}}.q, a{{l}}.h{{j}}.k/.v, m{{l}}, resid_post for "
                             f"{graph.n_layers} layers, {graph.n_heads} query and "
                             f"{graph.n_kv_heads} key/value heads)")
        if wi >= graph.reader_prefix[ri]:
            raise ValueError(f"{what} {i} [{w!r}, {r!r}]: not an edge of the graph: "
                             f"{w} is not upstream of {r}")
        out.append(graph.reader_edge_start[ri] + wi)
    return out


def writer_indices(names: Iterable, graph: EdgeGraph, what: str = "node") -> list[int]:
    if isinstance(names, str):
        raise ValueError(f"{what}s must be a list of writer names, got the string {names!r}")
    out = []
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in graph.writer_index:
            raise ValueError(f"{what} {i} {name!r}: not a writer of the graph (writers are "
                             f"{', '.join(graph.embeddings)}, a{{l}}.h{{i}}, m{{l}})")
        out.append(graph.writer_index[name])
    return out
