"""Merging LoRA experts into a model: ΔW = Σ_k w_k s_k B_k A_k (design notes §2, step 3).

The merge of n experts is one LoRA of rank Σ r_k with B' = [B_1 … B_n] and
A' = [w_1 s_1 A_1; …; w_n s_n A_n] (:mod:`ttmm.factors`). Two ways to run it:

- :meth:`ExpertMerger.fold`: W ← W + B'A' for the duration of a ``with`` block. Each merged
  weight is computed into an output tensor and swapped into the parameter; the original tensor
  is set aside untouched and swapped back on exit, so the restore is bitwise exact by
  construction (subtracting ΔW is not) and costs nothing. The outputs are kept buffers or
  fresh tensors, by memory policy (:mod:`ttmm.fold`). Layers of one shape are merged by one
  batched product.
- :meth:`ExpertMerger.lowrank`: W is never touched; forward hooks (:mod:`ttmm.lowrank`) add
  x A'ᵀ B'ᵀ, and every row of a batch may carry its own merge.

The factors are kept in ``lora_dtype``, the weights' dtype unless told otherwise (as vLLM's
``lora_dtype``). bfloat16 factors over float32 weights halve the factors' memory and what
low-rank mode reads per step, and the products B'A' and x A'ᵀ B'ᵀ run in bfloat16; they are
then added to the float32 weights or outputs, so only the update is rounded
(benchmarks/half_precision.py measures what of its effect remains). On a CPU with
AVX512-BF16 that makes the fold about twice as fast; low-rank's products of a few rows gain
nothing there (per-call costs of oneDNN's bfloat16 kernels; benchmarks/merge_overhead.py).

Experts are read through an LRU cache of their laid-out factors (:mod:`ttmm.expert_cache`):
without a budget every expert is read when the merger is built and a merge reads no disk;
with one (a bank of thousands of experts), a merge reads the experts it misses, and only
those. Layers are matched by module type (``nn.Linear``, and transformers' ``Conv1D``, a transposed
linear) and by module path; nothing depends on an architecture's parameter names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, MutableMapping, Sequence

import torch
from torch import nn

from ttmm.adapter import LoraAdapter, LoraLayer
from ttmm.cost import AdaptedShape
from ttmm.expert_cache import ExpertCache
from ttmm.expert_source import ExpertSource
from ttmm.factors import ExpertFactors, MergeError, PlanFactors, merge_group, union_group
from ttmm.fold import MEMORY_POLICIES, FoldGroup, FoldOutputs, default_memory, fold_product
from ttmm.lowrank import per_row_hook, shared_hook
from ttmm.routing import RoutingPlan

try:  # GPT-2 style models store linear weights transposed in a Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

_LINEAR_TYPES = (nn.Linear, Conv1D)

LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the factors may be kept in (``lora_dtype``)."""

__all__ = [
    "LORA_DTYPES",
    "ExpertMerger",
    "MergeError",
    "PlanFactors",
    "linear_modules",
]


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of the model (``nn.Linear`` or ``Conv1D``) by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _LINEAR_TYPES)}


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D weight is (d_in, d_out)
    return d_in, d_out


def _resolve(path: str, modules: dict[str, nn.Module], where: str) -> str:
    """The model's linear layer an adapter path names: exact, or a unique dotted-suffix match."""
    if path in modules:
        return path
    candidates = [
        name for name in modules if path.endswith("." + name) or name.endswith("." + path)
    ]
    if len(candidates) == 1:
        return candidates[0]
    sample = ", ".join(list(modules)[:6])
    if not candidates:
        raise MergeError(
            f"{where}: layer {path!r} matches no linear layer of the model "
            f"({len(modules)} linear layers, e.g. {sample}); the adapter was trained on "
            "another architecture or targets a non-linear module"
        )
    raise MergeError(f"{where}: layer {path!r} is ambiguous, it matches {candidates}")


class ExpertMerger:
    """Executes routing plans on one model with a bank's experts, read through an LRU cache.

    ``experts`` are adapters held in memory, or an :class:`~ttmm.expert_source.ExpertSource`
    (a bank read from disk). ``cache_bytes`` bounds the bytes of laid-out experts held at once
    (:mod:`ttmm.expert_cache`): a merge reads the experts it misses and evicts the least
    recently used; None holds every expert, all read when the merger is built. ``memory`` is
    the fold's memory policy, ``"buffer"``, ``"swap"`` or ``"auto"`` (see :mod:`ttmm.fold`);
    :attr:`memory` says which one runs. ``grouped`` merges layers of one shape with one batched
    product (faster on the measured machine; ``False`` runs one product per layer).
    ``lora_dtype`` is the dtype the factors are kept and multiplied in (None: the weights'
    dtype; see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[LoraAdapter] | ExpertSource,
        memory: str = "auto",
        grouped: bool = True,
        lora_dtype: torch.dtype | None = None,
        cache_bytes: int | None = None,
    ):
        if memory not in MEMORY_POLICIES:
            raise MergeError(f"memory={memory!r} is unknown; choose one of {MEMORY_POLICIES}")
        if lora_dtype is not None and lora_dtype not in LORA_DTYPES:
            raise MergeError(
                f"lora_dtype={lora_dtype} is not supported; use one of "
                f"{', '.join(str(d) for d in LORA_DTYPES)}, or None for the weights' dtype"
            )
        source = ExpertSource.of(experts)
        if not source.num_experts:
            raise MergeError("no adapters to merge")
        self.model = model
        self.source = source
        self.num_experts = source.num_experts
        modules = linear_modules(model)
        self._layer_of = {
            path: _resolve(path, modules, "the experts") for path in source.layer_ranks
        }
        order = {name: i for i, name in enumerate(modules)}
        adapted = sorted(set(self._layer_of.values()), key=order.__getitem__)
        members: dict[tuple, list[str]] = {}
        for name in adapted:
            weight = modules[name].weight
            key = (
                weight.shape,
                weight.dtype,
                weight.device,
                not isinstance(modules[name], nn.Linear),
            )
            members.setdefault(key if grouped else (name,), []).append(name)
        self.groups: list[FoldGroup] = []
        self._position: dict[str, tuple[int, int]] = {}  # layer → (group, index in the group)
        for names in members.values():
            d_in, d_out = _in_out(modules[names[0]])
            for i, name in enumerate(names):
                self._position[name] = (len(self.groups), i)
            self.groups.append(
                FoldGroup(
                    names=names,
                    modules=[modules[n] for n in names],
                    transposed=not isinstance(modules[names[0]], nn.Linear),
                    d_in=d_in,
                    d_out=d_out,
                )
            )
        self._dtypes = [lora_dtype or g.modules[0].weight.dtype for g in self.groups]
        self._group_ranks = [0] * len(self.groups)  # the largest rank any expert gives a group
        for path, rank in source.layer_ranks.items():
            g, _ = self._position[self._layer_of[path]]
            self._group_ranks[g] = max(self._group_ranks[g], rank)
        tied = _tied_weights(model)
        self.tied_layers = [name for name in adapted if id(modules[name].weight) in tied]
        if memory == "auto":
            weights = [modules[name].weight for name in adapted]
            adapted_bytes = sum(w.numel() * w.element_size() for w in weights)
            memory = default_memory(adapted_bytes, weights[0].device)
        self.memory = memory
        """The fold's memory policy that runs: ``"buffer"`` or ``"swap"``."""
        self._outputs = FoldOutputs(memory)
        self._open_folds = 0  # folds of this merger whose block is running
        self._half_steps: dict[tuple[int, int], float] = {}
        self.experts = ExpertCache(
            self._lay_out, [self.expert_bytes(k) for k in range(self.num_experts)], cache_bytes
        )
        """The laid-out experts held, an LRU bounded by ``cache_bytes``."""
        if cache_bytes is None:
            self.experts.get(range(self.num_experts))  # every expert now, checked up front
        self.factor_cache: MutableMapping[tuple, PlanFactors] | None = None
        """Optional store of each plan's merged factors by ``plan.key()`` (e.g. the server's
        LRU): stacking A' and B' over ~200 layers costs about as much as a few decoding steps."""

    # -- sizes --------------------------------------------------------------------------

    @property
    def lora_dtype(self) -> torch.dtype:
        """The dtype the factors are kept and multiplied in."""
        return self._dtypes[0]

    def expert_bytes(self, expert_id: int) -> int:
        """Bytes of expert ``expert_id`` laid out (its rank in every group it may adapt;
        exact for the experts of a ttmm bank, an upper bound for others until read)."""
        rank = self.source.ranks[expert_id]
        return sum(
            len(g.modules) * min(rank, r) * (g.d_in + g.d_out) * dtype.itemsize
            for g, r, dtype in zip(self.groups, self._group_ranks, self._dtypes)
        )

    def smallest_cache_bytes(self, max_active: int) -> int:
        """The smallest cache that holds any merge of ``max_active`` experts (the largest)."""
        largest = sorted(self.experts.sizes, reverse=True)[:max_active]
        return self.experts.smallest_budget([]) + sum(largest)

    @property
    def factor_bytes(self) -> int:
        """Bytes of the laid-out experts held now (all of them without a cache budget)."""
        return self.experts.nbytes

    @property
    def n_parameters(self) -> int:
        """Factor entries held now (padding of experts that skip layers included)."""
        return self.factor_bytes // self.lora_dtype.itemsize

    @property
    def buffer_bytes(self) -> int:
        """Bytes of merged-weight buffers held at rest (0 under the ``swap`` policy)."""
        return self._outputs.nbytes

    def release_buffers(self) -> None:
        """Free the ``buffer`` policy's kept buffers; the next fold allocates them again."""
        self._outputs.release()

    @functools.cached_property
    def adapted_shape(self) -> AdaptedShape:
        """The adapted layers' sizes, as the fold/low-rank cost model needs them."""
        return AdaptedShape(
            layers=sum(len(g.modules) for g in self.groups),
            weights=sum(len(g.modules) * g.d_in * g.d_out for g in self.groups),
            fan_sum=sum(len(g.modules) * (g.d_in + g.d_out) for g in self.groups),
        )

    # -- experts ------------------------------------------------------------------------

    def _lay_out(self, expert_id: int) -> ExpertFactors:
        """Read expert ``expert_id`` and lay its factors out by group (see :mod:`ttmm.factors`)."""
        adapter = self.source.read(expert_id)
        where = f"expert {expert_id}"
        by_group: dict[int, dict[int, LoraLayer]] = {}
        for path, layer in adapter.layers.items():
            name = self._layer_of.get(path)
            if name is None:
                raise MergeError(
                    f"{where}: adapts layer {path!r}, which the bank's manifest does not list "
                    "among its adapted layers; the manifest is stale: rebuild the bank"
                )
            g, i = self._position[name]
            group = self.groups[g]
            if layer.A.shape[1] != group.d_in or layer.B.shape[0] != group.d_out:
                raise MergeError(
                    f"{where}: layer {name} has A {tuple(layer.A.shape)} and B "
                    f"{tuple(layer.B.shape)}, but the model's layer maps {group.d_in} → "
                    f"{group.d_out} features; the adapter was trained on another base model"
                )
            by_group.setdefault(g, {})[i] = layer
        A: list[torch.Tensor | None] = [None] * len(self.groups)
        B_t: list[torch.Tensor | None] = [None] * len(self.groups)
        for g, layers in by_group.items():
            group = self.groups[g]
            device = group.modules[0].weight.device
            rank = max(layer.rank for layer in layers.values())
            if len(layers) == len(group.modules) and all(l.rank == rank for l in layers.values()):
                # one stack, conversion and scaling per group (not per layer: an expert of
                # SmolLM2 has 210 layers, and a small op costs as much as a large one)
                ordered = [layers[i] for i in range(len(group.modules))]
                scales = torch.tensor([l.scale for l in ordered]).view(-1, 1, 1)
                A_g = torch.stack([l.A for l in ordered]).float().mul_(scales)
                B_g = torch.stack([l.B.T for l in ordered]).float()
            else:  # zeros where a layer is not adapted, or past its own rank
                A_g = torch.zeros(len(group.modules), rank, group.d_in)
                B_g = torch.zeros(len(group.modules), rank, group.d_out)
                for i, l in layers.items():
                    A_g[i, : l.rank] = l.A.float() * l.scale
                    B_g[i, : l.rank] = l.B.float().T
            A[g] = A_g.to(device, self._dtypes[g])
            B_t[g] = B_g.to(device, self._dtypes[g])
        return ExpertFactors(A, B_t)

    def prefetch(self, plans: Sequence[RoutingPlan]) -> None:
        """Read the plans' experts into the cache ahead of their merge (as far as it fits)."""
        self.experts.prefetch(k for plan in plans for k in plan.expert_ids)

    # -- plans --------------------------------------------------------------------------

    def plan_rank(self, plan: RoutingPlan) -> int:
        """R = Σ r_k of the plan's experts (the largest over groups), 0 for the base model;
        from the bank's ranks, reading no expert (exact for a ttmm bank, an upper bound where
        an expert skips a group)."""
        ranks = [self.source.ranks[k] for k in plan.expert_ids]
        return max((sum(min(r, top) for r in ranks) for top in self._group_ranks), default=0)

    def fold_keeps_update(self, plan: RoutingPlan) -> bool:
        """Whether folding the plan into the weights keeps its update, in their dtype.

        In float32 it always does. In bfloat16 or float16, W + ΔW is rounded to the weights'
        precision, and an update smaller than half the rounding step of the weights it is added
        to vanishes (low-rank mode, which never writes W, keeps it). This is False when, in most
        adapted layers, even an upper bound of the plan's largest update entry,
        Σ_k |w_k| s_k max_i ||B_k[i, :]|| max_j ||A_k[:, j]||, lies below half the rounding step
        of the layer's mean |W|. (Measured on experts trained by ttmm, the fold keeps their
        effect: benchmarks/half_precision.py; this guards against much smaller updates.)
        """
        if not self.groups or self.groups[0].modules[0].weight.dtype not in (
            torch.bfloat16,
            torch.float16,
        ):
            return True
        entries = self.experts.get(plan.expert_ids)
        lossy = adapted = 0
        for g, group in enumerate(self.groups):
            for i, module in enumerate(group.modules):
                bound = sum(
                    abs(w) * e.update_bounds(g)[i]
                    for e, w in zip(entries, plan.weights)
                    if e.A[g] is not None
                )
                if bound == 0:
                    continue
                adapted += 1
                lossy += bound < self._half_step(g, i, module.weight)
        return adapted == 0 or lossy * 2 <= adapted

    def _half_step(self, g: int, i: int, weight: torch.Tensor) -> float:
        if (g, i) not in self._half_steps:
            eps = torch.finfo(weight.dtype).eps  # relative spacing of the weights' values
            self._half_steps[g, i] = float(weight.detach().abs().float().mean()) * eps / 2
        return self._half_steps[g, i]

    def check_plan(self, plan: RoutingPlan) -> None:
        bad = [k for k in plan.expert_ids if not 0 <= k < self.num_experts]
        if bad:
            raise MergeError(
                f"unknown expert id(s) {bad}; the bank has experts 0..{self.num_experts - 1}"
            )

    def plan_factors(self, plan: RoutingPlan, for_fold: bool = False) -> PlanFactors:
        """The plan's merged factors by group, from ``factor_cache`` when it holds the plan.
        ``for_fold`` also makes each group's contiguous B' (the fold's batched product wants
        it; low-rank does not), under its own cache key so the cache counts its bytes."""
        cache, key = self.factor_cache, (("fold",) if for_fold else ()) + plan.key()
        if cache is not None and (hit := cache.get(key)) is not None:
            return hit
        entries = self.experts.get(plan.expert_ids)
        factors = {}
        for g in range(len(self.groups)):
            if (merged := merge_group(entries, plan.weights, g)) is not None:
                if for_fold:
                    merged.B  # noqa: B018 - made now, before the cache sizes the entry
                factors[g] = merged
        if cache is not None:
            cache[key] = factors
        return factors

    # -- running merges -----------------------------------------------------------------

    @contextlib.contextmanager
    def fold(self, plan: RoutingPlan) -> Iterator[None]:
        """W ← W + ΔW inside the block; the original weights, never written, are back on exit.

        Under the ``buffer`` policy the folds of one merger do not nest (they share its
        buffers); folds of two mergers do.
        """
        self.check_plan(plan)
        if plan.is_base:
            yield
            return
        if self.tied_layers:
            raise MergeError(
                f"layers {self.tied_layers} share their weight with another module (tied "
                "embeddings); folding would change both. Use mode='lowrank'."
            )
        if self._open_folds and self.memory == "buffer":
            raise MergeError(
                "this merger's buffers already hold a fold: leave that block first, or use "
                "another ExpertMerger (or memory='swap') for a fold inside a fold"
            )
        set_aside: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._open_folds += 1
        try:
            with torch.no_grad():
                for g, merged in self.plan_factors(plan, for_fold=True).items():
                    group = self.groups[g]
                    weights = [module.weight for module in group.modules]
                    out = self._outputs.get(g, (len(weights), *weights[0].shape), weights[0])
                    fold_product(
                        out, [w.data for w in weights], merged.A, merged.B, group.transposed
                    )
                    for weight, new in zip(weights, out):
                        set_aside.append((weight, weight.data))
                        weight.data = new
            yield
        finally:
            for weight, original in set_aside:
                weight.data = original
            set_aside.clear()
            self._open_folds -= 1

    def _union_factors(
        self, plans: Sequence[RoutingPlan]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group, the union of the rows' experts stacked with their row weights
        (:func:`ttmm.factors.union_group`). A union larger than the adapter cache is stacked
        run by run of experts that fit (:meth:`ExpertCache.chunks`), concatenated after:
        the same tensors, with the cache within its budget."""
        union = sorted({k for plan in plans for k in plan.expert_ids})
        parts: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        for run in self.experts.chunks(union):
            entries = self.experts.get(run)
            at = {k: j for j, k in enumerate(run)}
            row_weights = [
                {at[k]: w for k, w in zip(plan.expert_ids, plan.weights) if k in at}
                for plan in plans
            ]
            for g in range(len(self.groups)):
                if (stacked := union_group(entries, row_weights, g)) is not None:
                    parts.setdefault(g, []).append(stacked)
            del entries  # evictable while the next run is read
        return {g: _joined(runs) for g, runs in parts.items()}

    @contextlib.contextmanager
    def lowrank(self, plans: Sequence[RoutingPlan]) -> Iterator[None]:
        """Add x A'ᵀ B'ᵀ to each adapted layer's output, row i of the batch using ``plans[i]``.

        The base weights are never written; forward calls inside the block must have a batch
        of exactly ``len(plans)`` rows.
        """
        plans = list(plans)
        for plan in plans:
            self.check_plan(plan)
        hooks = {}
        if len({plan.key() for plan in plans}) == 1:  # one merge for every row
            for g, merged in self.plan_factors(plans[0]).items():
                for i, module in enumerate(self.groups[g].modules):
                    hooks[module] = shared_hook(merged.A[i], merged.B_t[i])
        else:
            for g, (A_U, B_U_t, S) in self._union_factors(plans).items():
                for i, module in enumerate(self.groups[g].modules):
                    hooks[module] = per_row_hook(A_U[i], B_U_t[i], S)
        handles = []
        try:
            for module, hook in hooks.items():
                handles.append(module.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _joined(runs: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """A union's runs, stacked apart, joined along the rank: A and Bᵀ on dim 1, S on dim 2."""
    if len(runs) == 1:
        return runs[0]
    A, B_t, S = zip(*runs)
    return torch.cat(A, 1), torch.cat(B_t, 1), torch.cat(S, 2)


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}
