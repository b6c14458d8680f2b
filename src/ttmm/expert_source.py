"""Where a merger reads its experts from: adapters in memory, or a bank's folders on disk.

A merger needs, before it reads any expert, the layers the experts adapt (to group them) and
each expert's rank (to size its cache); then expert k's adapter when a merge first uses it.
:class:`ExpertSource` carries those three. A bank gives them from its manifest and reads an
expert's PEFT folder on demand (:meth:`ttmm.bank.Bank.read_expert`, which checks its files'
checksums on the first read), so opening a bank of 10,000 experts reads none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ttmm.adapter import LoraAdapter
from ttmm.factors import MergeError


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
    def from_adapters(cls, adapters: Sequence[LoraAdapter]) -> ExpertSource:
        """Adapters held in memory."""
        adapters = list(adapters)
        if not adapters:
            raise MergeError("no adapters to merge")
        layers: dict[str, int] = {}
        for adapter in adapters:
            for path, layer in adapter.layers.items():
                layers[path] = max(layer.rank, layers.get(path, 0))
        return cls(adapters.__getitem__, layers, tuple(a.rank for a in adapters))

    @classmethod
    def from_bank(cls, bank, extra: Sequence[LoraAdapter] = ()) -> ExpertSource:
        """A bank's experts, read from its folders on first use, then ``extra`` adapters held
        in memory as ids K, K + 1, ... (a rollout's control arm beside the bank's experts)."""
        K, extra = bank.num_experts, list(extra)
        layers = bank.layer_ranks()
        for adapter in extra:
            for path, layer in adapter.layers.items():
                layers[path] = max(layer.rank, layers.get(path, 0))
        widest = max(layers.values(), default=0)
        ranks = [info.rank or widest for info in bank.manifest.experts]

        def read(k: int) -> LoraAdapter:
            # in the file's dtype: the merger converts each group once as it lays it out
            return bank.read_expert(k, dtype=None) if k < K else extra[k - K]

        return cls(read, layers, (*ranks, *(a.rank for a in extra)))
