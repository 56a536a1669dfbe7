"""The channel space: every index of every prunable tensor dimension, and how they couple.

Each dimension of each tensor in the graph gets one integer id per index (a
"channel id"). Op rules (``fxcompress.rules``) say which ids must be pruned
together (``couple``), which may never be pruned (``freeze``), and which
parameter slices read or write them (``add_slice``). ``solve`` then finds the
connected components of the coupling graph with scipy in time linear in the
number of ids and couplings: one component is one *channel* that is either
kept or removed everywhere at once.

Example: ``y = conv2(relu(bn(conv1(x)))) + x`` couples output channel ``c`` of
``conv1`` with channel ``c`` of ``bn`` and with input column ``c`` of ``conv2``,
and the residual add couples ``conv2``'s output channel ``c`` with channel ``c``
of ``x`` — which is a graph input, so the second component is frozen.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components

__all__ = ["Role", "ParamSlice", "ChannelSpace", "Solution", "distinct"]

Ids = np.ndarray


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an integer array, by sorting.

    What ``np.unique(values)`` returns; numpy 2.3+ computes that with a hash
    table, which on the ~10^5 ids of a CNN's analysis is 20x slower than a
    sort (15 ms against 0.7 ms).

    >>> distinct(np.array([3, 1, 3, 2]))
    array([1, 2, 3])
    """
    ordered = np.sort(values, axis=None)
    if ordered.size == 0:
        return ordered
    first = np.empty(ordered.shape, dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


class Role(enum.Enum):
    """How a parameter slice relates to the channels along its dimension."""

    #: Writes the channel's value (a conv's output rows, with its bias). A channel
    #: is pruned when all of its producer slices are masked.
    PRODUCER = "producer"
    #: Reads the channel (a conv's input columns). Zeroed with the channel.
    CONSUMER = "consumer"
    #: A per-channel affine parameter (norm weight and bias, layer scale).
    AFFINE = "affine"
    #: Per-channel state that is sliced but never masked (running statistics).
    BUFFER = "buffer"


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """One dimension of one parameter or buffer, with the channel id of each index."""

    owner: str  #: module path of the tensor's owner ("" is the root module)
    name: str  #: attribute name on the owner, e.g. "weight"
    dim: int
    ids: Ids = field(repr=False)
    role: Role
    maskable: bool = True  #: whether InsertMasks may put a mask on the tensor
    #: recorded by a ``get_attr`` read alone; the rule of the op that reads the tensor replaces it
    provisional: bool = False
    #: some use reads this dim as a layer's input channels, whatever ``role`` the strongest use gave it (a
    #: tied embedding produces the hidden channels that the output layer, the same tensor, consumes)
    consumed: bool = False

    @property
    def target(self) -> str:
        """The tensor's fully qualified name, as in ``state_dict``."""
        return f"{self.owner}.{self.name}" if self.owner else self.name


@dataclass
class Solution:
    """The channel components: ``labels[id]`` is the component of channel id ``id``."""

    labels: np.ndarray
    frozen: np.ndarray  #: bool per component
    reasons: list[str]  #: why a component is frozen, indexed by ``reason_of``
    reason_of: np.ndarray  #: per component, index into ``reasons`` or -1

    @property
    def num_components(self) -> int:
        return len(self.frozen)

    def reason(self, component: int) -> str | None:
        index = self.reason_of[component]
        return None if index < 0 else self.reasons[index]


_ROLE_STRENGTH = {Role.BUFFER: 0, Role.AFFINE: 1, Role.CONSUMER: 2, Role.PRODUCER: 3}


@dataclass(eq=False)
class _Reshape:
    """A dim that splits into (or merges from) several: which piece carries channels is decided later."""

    big: Ids  #: ids of the single dim, in row-major order over ``grid``
    grid: tuple[int, ...]
    pieces: list[Ids]  #: ids of each piece dim
    where: str

    def spread(self, k: int) -> Ids:
        """The ids of piece ``k`` broadcast over the grid: the channel of each index of the big dim."""
        shape = [-1 if axis == k else 1 for axis in range(len(self.grid))]
        return np.broadcast_to(self.pieces[k].reshape(shape), self.grid).ravel()


class _CarrierState:
    """Union-find over the components of a first solve, with frozen and chosen flags per root."""

    def __init__(self, first: Solution) -> None:
        self.labels = first.labels
        self.parent = np.arange(first.num_components)
        self.dead = first.frozen.copy()
        self.chosen = np.zeros_like(self.dead)

    def find(self, c: int) -> int:
        parent = self.parent
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    def roots(self, ids: Ids) -> np.ndarray:
        """``find`` of every id's component at once: path halving on whole arrays, O(depth) numpy steps."""
        parent, comps = self.parent, self.labels[ids]
        while True:
            up = parent[comps]
            if np.array_equal(up, comps):
                return comps
            grand = parent[up]
            parent[comps] = grand
            comps = grand

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.dead[a] |= self.dead[b]
            self.chosen[a] |= self.chosen[b]

    def alive(self, reshape: _Reshape) -> list[int]:
        return [k for k, p in enumerate(reshape.pieces) if not self.dead[self.roots(p)].all()]

    def matches_structure(self, reshape: _Reshape, k: int) -> bool:
        """Whether the big dim's components vary along piece ``k``'s axis only (and do vary)."""
        grid = self.roots(reshape.big).reshape(reshape.grid)
        for axis in range(len(reshape.grid)):
            constant = bool((grid == grid.take([0], axis=axis)).all())
            if constant == (axis == k):
                return False
        return True

    def certain_carrier(self, reshape: _Reshape) -> int | None:
        alive = self.alive(reshape)
        if len(alive) <= 1:
            return alive[0] if alive else self.largest_alive(reshape)
        for k in alive:
            if self.matches_structure(reshape, k):
                return k
        marked = [k for k in alive if self.chosen[self.roots(reshape.pieces[k])].any()]
        return marked[0] if marked else None

    def largest_alive(self, reshape: _Reshape) -> int:
        alive = self.alive(reshape) or list(range(len(reshape.pieces)))
        return max(alive, key=lambda k: (len(reshape.pieces[k]), -k))

    def record(self, reshape: _Reshape, carrier: int) -> None:
        for k, piece in enumerate(reshape.pieces):
            roots = self.roots(piece)  # repeats are harmless: these are boolean marks
            if k == carrier:
                self.chosen[roots] = True
            else:
                self.dead[roots] = True
        pairs = np.unique(np.stack([self.labels[reshape.big], self.labels[reshape.spread(carrier)]]), axis=1)
        for a, b in pairs.T:
            self.union(int(a), int(b))


class ChannelSpace:
    """Allocates channel ids and records couplings, freezes and parameter slices."""

    def __init__(self) -> None:
        self.size = 0
        self._edges_a: list[Ids] = []
        self._edges_b: list[Ids] = []
        self._freezes: list[tuple[Ids, str]] = []
        self.slices: list[ParamSlice] = []
        self._slice_by_key: dict[tuple[str, str, int], int] = {}
        self._reshapes: list[_Reshape] = []

    def fresh(self, n: int, frozen: str | None = None) -> Ids:
        """``n`` new ids; frozen from birth (with the reason given) when ``frozen`` is set."""
        ids = np.arange(self.size, self.size + n, dtype=np.int64)
        self.size += n
        if frozen is not None:
            self.freeze(ids, frozen)
        return ids

    def couple(self, a: Ids, b: Ids) -> None:
        """Index ``i`` of ``a`` and index ``i`` of ``b`` must be pruned together."""
        if a is b or len(a) == 0:
            return
        if a.shape != b.shape:
            raise ValueError(f"cannot couple {a.shape} ids with {b.shape} ids")
        self._edges_a.append(np.ascontiguousarray(a).ravel())
        self._edges_b.append(np.ascontiguousarray(b).ravel())

    def freeze(self, ids: Ids, reason: str) -> None:
        """These ids (and everything coupled to them) may never be pruned."""
        if len(ids) == 0:
            return
        self._freezes.append((ids, reason))

    def add_slice(
        self, owner: str, name: str, dim: int, ids: Ids, role: Role, maskable: bool = True, provisional: bool = False
    ) -> None:
        """Record that ``owner.name`` indexes channels ``ids`` along ``dim``.

        A tensor used twice (a module called twice, a shared weight) is recorded
        once, and the ids of its second use are coupled to those of the first.
        """
        key = (owner, name, dim)
        index = self._slice_by_key.get(key)
        if index is None:
            self._slice_by_key[key] = len(self.slices)
            self.slices.append(ParamSlice(owner, name, dim, ids, role, maskable, provisional, role is Role.CONSUMER))
            return
        seen = self.slices[index]
        self.couple(seen.ids, ids)
        consumed = seen.consumed or role is Role.CONSUMER
        # A get_attr read records a provisional slice; the rule of the op that reads the tensor
        # (F.linear's weight, F.batch_norm's running mean: a buffer) says what it is.
        if seen.provisional != provisional:
            replace = seen.provisional
        else:
            replace = _ROLE_STRENGTH[role] > _ROLE_STRENGTH[seen.role]
        if replace:
            self.slices[index] = ParamSlice(owner, name, dim, seen.ids, role, maskable, provisional, consumed)
        elif consumed != seen.consumed:
            self.slices[index] = ParamSlice(owner, name, dim, seen.ids, seen.role, seen.maskable, seen.provisional, True)

    def reshape(self, big: Ids, grid: tuple[int, ...], pieces: list[Ids], where: str) -> None:
        """Record that dim ``big`` is the row-major product of the ``pieces`` dims.

        Only one piece can carry prunable channels (removing index ``i`` of a
        piece removes a whole slab of the big dim). Which one is decided in
        :meth:`solve`, once the whole graph is known: a piece frozen elsewhere
        (a spatial dim, a contracted head dim) cannot carry, and pieces coupled
        to an already chosen carrier are preferred, so ``q``, ``k``, ``v`` and
        the output of an attention block agree on pruning heads.
        """
        self._reshapes.append(_Reshape(big, tuple(grid), list(pieces), where))

    def solve(self) -> Solution:
        """Decide the carriers of all recorded reshapes, then solve the final components."""
        if self._reshapes:
            self._decide_carriers(self._components())
            self._reshapes.clear()
        return self._components()

    def _decide_carriers(self, first: Solution) -> None:
        """Pick each reshape's carrier piece, most certain choices first.

        Works on the components of a first solve, merged (union-find) as
        decisions couple them. A reshape is decided when exactly one piece is
        still alive (the others are frozen), or when one alive piece matches
        the structure its big dim already has (a split that undoes an earlier
        merge), or when one is coupled to a piece chosen before; only when
        none of that applies does the first pending reshape take its largest
        piece.
        """
        state = _CarrierState(first)
        undecided = list(self._reshapes)
        while undecided:
            progress = False
            for reshape in list(undecided):
                carrier = state.certain_carrier(reshape)
                if carrier is None:
                    continue
                self._apply_carrier(state, reshape, carrier)
                undecided.remove(reshape)
                progress = True
            if not progress:
                reshape = undecided.pop(0)
                self._apply_carrier(state, reshape, state.largest_alive(reshape))

    def _apply_carrier(self, state: _CarrierState, reshape: _Reshape, carrier: int) -> None:
        for k, piece in enumerate(reshape.pieces):
            if k != carrier:
                self.freeze(piece, f"reshaped into another dim by {reshape.where}")
        self.couple(reshape.big, reshape.spread(carrier))
        state.record(reshape, carrier)

    def _components(self) -> Solution:
        """Connected components of the coupling graph, with frozen flags and reasons."""
        n = self.size
        if self._edges_a:
            a = np.concatenate(self._edges_a)
            b = np.concatenate(self._edges_b)
        else:
            a = b = np.zeros(0, dtype=np.int64)
        adjacency = scipy.sparse.coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
        count, labels = connected_components(adjacency, directed=False)
        frozen = np.zeros(count, dtype=bool)
        reason_of = np.full(count, -1, dtype=np.int64)
        reasons: list[str] = []
        for ids, reason in self._freezes:
            components = labels[ids]
            new = components[reason_of[components] < 0]
            if len(new):
                reason_of[new] = len(reasons)
                reasons.append(reason)
            frozen[components] = True
        return Solution(labels=labels, frozen=frozen, reasons=reasons, reason_of=reason_of)
