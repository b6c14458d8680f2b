"""Where a merger reads its experts from: adapters in memory, or a bank's folders on disk.

A merger needs, before it reads any expert, the layers the experts adapt (to group them) and
each expert's rank (to size its cache); then expert k's adapter when a merge first uses it.
:class:`ExpertSource` carries those three. A bank gives them from its manifest and reads an
expert's PEFT folder on demand (:meth:`ttmm.bank.Bank.read_expert`, which checks its files'
checksums on the first read), so opening a bank of 10,000 experts reads none of them.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ttmm.adapter import LoraAdapter


@dataclass(frozen=True)
class ExpertSource:
    """Experts 0..n-1: their adapted layers and ranks up front, each adapter on demand."""

    read: Callable[[int], LoraAdapter]
    """Expert k's adapter (read from disk, or held)."""
    layer_ranks: dict[str, int]
    """Every layer some expert adapts (as the adapters name it), with its largest rank."""
    ranks: tuple[int, ...]
    """Per expert, its largest rank over layers."""

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @classmethod
    def of(cls, experts: Sequence[LoraAdapter] | ExpertSource) -> ExpertSource:
        """``experts`` if a source already, else adapters held in memory."""
        return experts if isinstance(experts, ExpertSource) else cls.from_adapters(experts)

    @classmethod
    def from_adapters(cls, adapters: Sequence[LoraAdapter]) -> ExpertSource:
        """Adapters held in memory."""
        adapters = list(adapters)
        layers: dict[str, int] = {}
        for adapter in adapters:
            for path, layer in adapter.layers.items():
                layers[path] = max(layer.rank, layers.get(path, 0))
        return cls(adapters.__getitem__, layers, tuple(a.rank for a in adapters))

    @classmethod
    def from_bank(cls, bank) -> ExpertSource:
        """A bank's experts, each read from its folder on first use."""
        layers = bank.layer_ranks()
        widest = max(layers.values(), default=0)
        ranks = tuple(info.rank or widest for info in bank.manifest.experts)

        def read(k: int) -> LoraAdapter:
            # in the file's dtype: the merger converts each group once as it lays it out
            return bank.read_expert(k, dtype=None)

        return cls(read, layers, ranks)

    @classmethod
    def concat(cls, *sources: ExpertSource) -> ExpertSource:
        """The experts of ``sources`` one after another: the second's expert 0 is id K of
        the first's K, and so on (a rollout's control arm beside the candidate's bank)."""
        sources = tuple(s for s in sources if s.num_experts)
        if len(sources) == 1:
            return sources[0]
        layers: dict[str, int] = {}
        for source in sources:
            for path, rank in source.layer_ranks.items():
                layers[path] = max(rank, layers.get(path, 0))
        starts = [0]
        for source in sources:
            starts.append(starts[-1] + source.num_experts)

        def read(k: int) -> LoraAdapter:
            i = bisect_right(starts, k) - 1
            return sources[i].read(k - starts[i])

        return cls(read, layers, tuple(r for source in sources for r in source.ranks))
