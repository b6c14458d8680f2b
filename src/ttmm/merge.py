"""Merging LoRA experts into a model: ΔW = Σ_k w_k s_k B_k A_k (design notes §2, step 3).

The merge of n experts is one LoRA of rank Σ r_k with B' = [B_1 … B_n] and
A' = [w_1 s_1 A_1; …; w_n s_n A_n] (:mod:`ttmm.factors`). Two ways to run it:

- :meth:`ExpertMerger.fold`: W ← W + B'A' for the duration of a ``with`` block. Each merged
  weight is computed into an output tensor and swapped into the parameter; the original tensor
  is set aside untouched and swapped back on exit, so the restore is bitwise exact by
  construction (subtracting ΔW is not) and costs nothing. The outputs are kept buffers or
  fresh tensors, by memory policy (:mod:`ttmm.fold`). Layers of one shape adapted by the same
  experts are merged by one batched product.
- :meth:`ExpertMerger.lowrank`: W is never touched; forward hooks (:mod:`ttmm.lowrank`) add
  x A'ᵀ B'ᵀ, and every row of a batch may carry its own merge.

The factors are kept in ``lora_dtype``, the weights' dtype unless told otherwise (as vLLM's
``lora_dtype``). bfloat16 factors over float32 weights halve the factors' memory and what
low-rank mode reads per step, and the products B'A' and x A'ᵀ B'ᵀ run in bfloat16; they are
then added to the float32 weights or outputs, so only the update is rounded
(benchmarks/half_precision.py measures what of its effect remains). On a CPU with
AVX512-BF16 that makes the fold about twice as fast; low-rank's products of a few rows gain
nothing there (per-call costs of oneDNN's bfloat16 kernels; benchmarks/merge_overhead.py).

Adapters are stacked per layer in memory when the merger is built, so a merge reads no disk.
Layers are matched by module type (``nn.Linear``, and transformers' ``Conv1D``, a transposed
linear) and by module path; nothing depends on an architecture's parameter names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ttmm.adapter import LoraAdapter
from ttmm.cost import AdaptedShape
from ttmm.factors import MergeError, merged_factors, row_selection, union_selection
from ttmm.fold import MEMORY_POLICIES, FoldGroup, FoldOutputs, default_memory, fold_product
from ttmm.lowrank import per_row_hook, shared_hook
from ttmm.routing import RoutingPlan

try:  # GPT-2 style models store linear weights transposed in a Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

_LINEAR_TYPES = (nn.Linear, Conv1D)

PlanFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""A plan's merged (A', B') by layer path, for the layers it adapts (or, for a fold, stacked
by group of layers)."""

LORA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the factors may be kept in (``lora_dtype``)."""

__all__ = [
    "LORA_DTYPES",
    "ExpertMerger",
    "MergeError",
    "PlanFactors",
    "linear_modules",
    "merged_factors",
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


@dataclass(eq=False)
class _Layout:
    """Where each expert's rows sit in a layer's stacked factors, and its scale s_k there.

    Layers adapted by the same experts with the same ranks and scales share one layout, so
    a plan's rows are selected once per layout (typically once), not once per layer.
    """

    spans: dict[int, tuple[int, int]]  # expert id → rows [start, end) in the stacked factors
    scales: dict[int, float]  # expert id → s_k


@dataclass
class _StackedLayer:
    """All experts' factors of one linear layer, stacked so a merge is an index + one GEMM."""

    module: nn.Module
    transposed: bool  # Conv1D: weight is (d_in, d_out)
    A_all: torch.Tensor  # (Σ_k r_k, d_in): every adapting expert's A, stacked on rows
    B_t_all: torch.Tensor  # (Σ_k r_k, d_out): every adapting expert's B, transposed, stacked
    layout: _Layout
    half_step: float | None = None  # half the rounding step of mean |W| (half precision)
    update_bounds: dict[int, float] | None = None  # per expert, a bound on max |ΔW_k|

    def factors(
        self, plan: RoutingPlan, selection: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A', B') of this layer for a plan, or None if no expert of the plan adapts it.

        ``selection`` is the plan's :func:`row_selection` for this layer's layout, if known.
        """
        if selection is None:
            selection = row_selection(self.layout.spans, self.layout.scales, plan)
        if selection is None:
            return None
        rows, row_scale = selection  # built on the CPU; the scale moves to the stacks' device
        return merged_factors(
            self.A_all, self.B_t_all, rows, row_scale.to(self.A_all.device, self.A_all.dtype)
        )


class ExpertMerger:
    """Holds a bank's adapters stacked per layer and executes routing plans on one model.

    ``memory`` is the fold's memory policy, ``"buffer"``, ``"swap"`` or ``"auto"`` (see
    :mod:`ttmm.fold`); :attr:`memory` says which one runs. ``grouped`` merges layers of one
    shape with one batched product (faster on the measured machine; ``False`` runs one product
    per layer). ``lora_dtype`` is the dtype the factors are kept and multiplied in (None: the
    weights' dtype; see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Sequence[LoraAdapter],
        memory: str = "auto",
        grouped: bool = True,
        lora_dtype: torch.dtype | None = None,
    ):
        if not adapters:
            raise MergeError("no adapters to merge")
        if memory not in MEMORY_POLICIES:
            raise MergeError(f"memory={memory!r} is unknown; choose one of {MEMORY_POLICIES}")
        if lora_dtype is not None and lora_dtype not in LORA_DTYPES:
            raise MergeError(
                f"lora_dtype={lora_dtype} is not supported; use one of "
                f"{', '.join(str(d) for d in LORA_DTYPES)}, or None for the weights' dtype"
            )
        self.model = model
        self.num_experts = len(adapters)
        modules = linear_modules(model)
        per_layer: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
        for expert_id, adapter in enumerate(adapters):
            where = f"expert {expert_id}"
            for path, layer in adapter.layers.items():
                name = _resolve(path, modules, where)
                d_in, d_out = _in_out(modules[name])
                if layer.A.shape[1] != d_in or layer.B.shape[0] != d_out:
                    raise MergeError(
                        f"{where}: layer {name} has A {tuple(layer.A.shape)} and B "
                        f"{tuple(layer.B.shape)}, but the model's layer maps {d_in} → {d_out} "
                        "features; the adapter was trained on another base model"
                    )
                per_layer.setdefault(name, []).append((expert_id, layer.A, layer.B, layer.scale))
        tied = _tied_weights(model)
        self.layers: dict[str, _StackedLayer] = {}
        layouts: dict[tuple, _Layout] = {}
        for name, entries in per_layer.items():
            spans, offset = {}, 0
            for expert_id, A, _, _ in entries:
                spans[expert_id] = (offset, offset + A.shape[0])
                offset += A.shape[0]
            scales = {expert_id: s for expert_id, _, _, s in entries}
            layout_key = (tuple(spans.items()), tuple(scales.items()))
            layout = layouts.setdefault(layout_key, _Layout(spans=spans, scales=scales))
            module = modules[name]
            weight = module.weight  # the stacks live where the layer's weight does
            dtype = lora_dtype or weight.dtype
            self.layers[name] = _StackedLayer(
                module=module,
                transposed=not isinstance(module, nn.Linear),
                A_all=torch.cat([A for _, A, _, _ in entries]).to(weight.device, dtype),
                B_t_all=torch.cat([B for _, _, B, _ in entries], dim=1)
                .T.contiguous()
                .to(weight.device, dtype),
                layout=layout,
            )
        self.tied_layers = sorted(name for name in self.layers if id(modules[name].weight) in tied)
        members: dict[tuple, list[_StackedLayer]] = {}
        for name, stacked in self.layers.items():
            weight = stacked.module.weight
            key = (id(stacked.layout), stacked.transposed, weight.shape, weight.dtype)
            members.setdefault(key if grouped else (name,), []).append(stacked)
        self.groups = [FoldGroup.stack(layers) for layers in members.values()]
        if memory == "auto":
            weights = [stacked.module.weight for stacked in self.layers.values()]
            adapted_bytes = sum(w.numel() * w.element_size() for w in weights)
            memory = default_memory(adapted_bytes, weights[0].device)
        self.memory = memory
        """The fold's memory policy that runs: ``"buffer"`` or ``"swap"``."""
        self._outputs = FoldOutputs(memory)
        self._open_folds = 0  # folds of this merger whose block is running
        self.factor_cache: MutableMapping[tuple, PlanFactors] | None = None
        """Optional store of each plan's (A', B') per layer by ``plan.key()`` (e.g. the server's
        LRU): stacking A' and B' over ~200 layers costs about as much as a few decoding steps."""

    @property
    def n_parameters(self) -> int:
        return sum(s.A_all.numel() + s.B_t_all.numel() for s in self.layers.values())

    @property
    def lora_dtype(self) -> torch.dtype:
        """The dtype the factors are kept and multiplied in."""
        return next(iter(self.layers.values())).A_all.dtype

    @property
    def factor_bytes(self) -> int:
        """Bytes of the stacked factors (every expert's A and B), held for the merger's life."""
        return self.n_parameters * self.lora_dtype.itemsize

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
        sizes = [_in_out(s.module) for s in self.layers.values()]  # (d_in, d_out)
        return AdaptedShape(
            layers=len(sizes),
            weights=sum(d_in * d_out for d_in, d_out in sizes),
            fan_sum=sum(d_in + d_out for d_in, d_out in sizes),
        )

    def plan_rank(self, plan: RoutingPlan) -> int:
        """R = Σ r_k of the plan's experts (the largest over layers), 0 for the base model."""
        selections = self._selections(plan).values()
        return max((len(sel[0]) for sel in selections if sel is not None), default=0)

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
        layers = list(self.layers.values())
        if not layers or layers[0].module.weight.dtype not in (torch.bfloat16, torch.float16):
            return True
        weights = dict(zip(plan.expert_ids, plan.weights))
        lossy = adapted = 0
        for stacked in layers:
            bounds = self._update_bounds(stacked)
            bound = sum(abs(w) * bounds[k] for k, w in weights.items() if k in bounds)
            if bound == 0:
                continue
            adapted += 1
            lossy += bound < self._half_step(stacked)
        return adapted == 0 or lossy * 2 <= adapted

    @staticmethod
    def _half_step(stacked: _StackedLayer) -> float:
        weight = stacked.module.weight
        if stacked.half_step is None:
            eps = torch.finfo(weight.dtype).eps  # relative spacing of the weights' values
            stacked.half_step = float(weight.detach().abs().float().mean()) * eps / 2
        return stacked.half_step

    @staticmethod
    def _update_bounds(stacked: _StackedLayer) -> dict[int, float]:
        """Per expert, s_k max_i ||B_k[i, :]|| max_j ||A_k[:, j]|| (>= max |ΔW_k|)."""
        if stacked.update_bounds is None:
            bounds = {}
            for expert_id, (start, end) in stacked.layout.spans.items():
                A = stacked.A_all[start:end].float()  # (r_k, d_in)
                B_t = stacked.B_t_all[start:end].float()  # (r_k, d_out)
                scale = abs(float(stacked.layout.scales[expert_id]))
                bounds[expert_id] = scale * float(B_t.norm(dim=0).max() * A.norm(dim=0).max())
            stacked.update_bounds = bounds
        return stacked.update_bounds

    def check_plan(self, plan: RoutingPlan) -> None:
        bad = [k for k in plan.expert_ids if not 0 <= k < self.num_experts]
        if bad:
            raise MergeError(
                f"unknown expert id(s) {bad}; the bank has experts 0..{self.num_experts - 1}"
            )

    def _selections(self, plan: RoutingPlan) -> dict[int, tuple[torch.Tensor, torch.Tensor] | None]:
        """The plan's :func:`row_selection` for each distinct layout, by ``id(layout)``."""
        selections = {}
        for stacked in self.layers.values():
            layout = stacked.layout
            if id(layout) not in selections:
                selections[id(layout)] = row_selection(layout.spans, layout.scales, plan)
        return selections

    def plan_factors(self, plan: RoutingPlan) -> PlanFactors:
        """(A', B') of every layer the plan adapts, from ``factor_cache`` when it holds the plan."""
        cache, key = self.factor_cache, plan.key()
        if cache is not None and (hit := cache.get(key)) is not None:
            return hit
        selections = self._selections(plan)
        factors = {}
        for name, stacked in self.layers.items():
            selection = selections[id(stacked.layout)]
            if selection is not None:
                factors[name] = stacked.factors(plan, selection)
        if cache is not None:
            cache[key] = factors
        return factors

    def _group_factors(self, plan: RoutingPlan) -> PlanFactors:
        """(A', B') stacked per group of layers ("group i"), B' contiguous, from
        ``factor_cache`` when it holds the plan."""
        cache, key = self.factor_cache, ("fold groups", *plan.key())
        if cache is not None and (hit := cache.get(key)) is not None:
            return hit
        selections = self._selections(plan)
        factors = {}
        for number, group in enumerate(self.groups):
            if (selection := selections[id(group.layout)]) is None:
                continue
            rows, row_scale = selection
            A, B = merged_factors(
                group.A_all,
                group.B_t_all,
                rows,
                row_scale.to(group.A_all.device, group.A_all.dtype),
            )
            # B' (L, d_out, Σr) contiguous: faster in the batched product than a view
            factors[f"group {number}"] = (A, B.contiguous())
        if cache is not None:
            cache[key] = factors
        return factors

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
                factors = self._group_factors(plan)
                for number, group in enumerate(self.groups):
                    if (pair := factors.get(f"group {number}")) is None:
                        continue
                    A, B = pair  # (L, Σr, d_in), (L, d_out, Σr)
                    weights = [module.weight for module in group.modules]
                    out = self._outputs.get(number, (len(weights), *weights[0].shape), weights[0])
                    fold_product(out, [w.data for w in weights], A, B, group.transposed)
                    for weight, merged in zip(weights, out):
                        set_aside.append((weight, weight.data))
                        weight.data = merged
            yield
        finally:
            for weight, original in set_aside:
                weight.data = original
            set_aside.clear()
            self._open_folds -= 1

    @contextlib.contextmanager
    def lowrank(self, plans: Sequence[RoutingPlan]) -> Iterator[None]:
        """Add x A'ᵀ B'ᵀ to each adapted layer's output, row i of the batch using ``plans[i]``.

        The base weights are never written; forward calls inside the block must have a batch
        of exactly ``len(plans)`` rows.
        """
        plans = list(plans)
        for plan in plans:
            self.check_plan(plan)
        if len({plan.key() for plan in plans}) == 1:  # one merge for every row
            factors = self.plan_factors(plans[0])
            hooks = {name: shared_hook(*pair) for name, pair in factors.items()}
        else:
            per_row = [self._selections(plan) for plan in plans]
            unions = {  # one union of experts and row-scale matrix S per layout
                layout: union_selection([selections[layout] for selections in per_row])
                for layout in per_row[0]
            }
            hooks = {
                name: per_row_hook(stacked, *unions[id(stacked.layout)])
                for name, stacked in self.layers.items()
                if unions[id(stacked.layout)] is not None
            }
        handles = []
        try:
            for name, hook in hooks.items():
                handles.append(self.layers[name].module.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}
