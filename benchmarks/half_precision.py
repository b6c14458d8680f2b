"""How much of a trained adapter's effect survives bfloat16: in the weights (issue 12), or in
the experts' factors over float32 weights (``lora_dtype``, issue 11).

A fold writes W + ΔW back into the weights' dtype. In bfloat16 (8 bits of mantissa) the small
updates that trained LoRA experts make are often below the rounding step of W, so they vanish;
low-rank mode never writes W and adds x A'ᵀ B'ᵀ to the layer's output instead. bfloat16
factors over float32 weights round the update itself (A, B and B'A') but never W. This measures,
on real trained experts and SmolLM2-135M, the effect of a merge on the logits (merged minus
base) in each mode, against the float32 merge as the reference:

- ``retained``: 1 - ||effect - reference|| / ||reference||  (1 = all of it, 0 = none);
- ``cosine``: the direction of the effect against the reference;
- ``nll shift``: the change of the mean next-token NLL on the texts, merged minus base.

    .venv/bin/python benchmarks/half_precision.py --adapters BANK/experts/00{0,1,2}

The first two adapters are merged alone, and all of them together (equal weights; give up to
ten for a merge of ten). Writes
``benchmarks/results/half_precision.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ttmm.adapter import load_adapter
from ttmm.assets import DEFAULT_BASE_MODEL, load_base_model
from ttmm.merge import ExpertMerger
from ttmm.model import continuation_nll, right_pad
from ttmm.routing import RoutingPlan

HERE = Path(__file__).resolve().parent
TEXTS = [
    "The French Revolution was a period of political and societal change in France that began "
    "with the Estates General of 1789 and ended with the coup of 18 Brumaire in 1799.",
    "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"
    "    parser.add_argument('path')\n    args = parser.parse_args(argv)\n    return 0\n",
    "Photosynthesis is a system of biological processes by which photosynthetic organisms, "
    "such as most plants, algae and cyanobacteria, convert light energy into chemical energy.",
    "class Cache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n"
    "        self.items = {}\n\n    def get(self, key):\n        return self.items.get(key)\n",
]


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    ids, mask = batch
    return model(input_ids=ids, attention_mask=mask).logits.float()


@torch.no_grad()
def measure(model, merger: ExpertMerger, plan: RoutingPlan, batch, mode: str):
    base = logits(model, batch)
    if mode == "fold":
        with merger.fold(plan):
            merged = logits(model, batch)
    else:
        with merger.lowrank([plan] * batch[0].shape[0]):
            merged = logits(model, batch)
    return base, merged


def nll(all_logits: torch.Tensor, batch) -> float:
    ids, mask = batch
    pairs = continuation_nll(all_logits, ids, mask, 1)
    return sum(n for n, _ in pairs) / sum(t for _, t in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapters", type=Path, nargs="+", required=True, help="three or more trained LoRA folders"
    )
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="their base model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "half_precision.json")
    args = parser.parse_args(argv)
    if len(args.adapters) < 3:
        parser.error("--adapters needs at least three LoRA folders")
    torch.set_num_threads(args.threads)
    adapters = [load_adapter(path) for path in args.adapters]
    n = len(adapters)
    plans = {
        "expert 0": RoutingPlan.explicit({0: 1.0}),
        "expert 1": RoutingPlan.explicit({1: 1.0}),
        f"experts 0..{n - 1}": RoutingPlan.explicit({k: 1 / n for k in range(n)}),
    }
    name = args.base_model
    models = {
        dtype: load_base_model(name, dtype=dtype, device="cpu") for dtype in ("float32", "bfloat16")
    }
    tokenizer = models["float32"][1]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    batch = right_pad(ids, tokenizer.pad_token_id)
    rows = []
    reference = {}
    for dtype, (model, _) in models.items():
        mergers = {dtype: ExpertMerger(model, adapters)}
        if dtype == "float32":
            mergers["bfloat16"] = ExpertMerger(model, adapters, lora_dtype=torch.bfloat16)
        for (factors, merger), (label, plan), mode in itertools.product(
            mergers.items(), plans.items(), ("fold", "lowrank")
        ):
            base, merged = measure(model, merger, plan, batch, mode)
            effect = merged - base
            if dtype == factors == "float32" and mode == "fold":
                reference[label] = effect
            ref = reference[label]
            rows.append(
                {
                    "weights": dtype,
                    "factors": factors,
                    "mode": mode,
                    "merge": label,
                    "retained": float(1 - (effect - ref).norm() / ref.norm()),
                    "cosine": float(
                        torch.nn.functional.cosine_similarity(
                            effect.flatten(), ref.flatten(), dim=0
                        )
                    ),
                    "effect_norm_ratio": float(effect.norm() / ref.norm()),
                    "nll_shift": nll(merged, batch) - nll(base, batch),
                }
            )
    table = Table(title="effect of a merge on the logits, against the float32 fold")
    columns = ("weights", "factors", "mode", "merge", "retained", "cosine", "|effect| ratio")
    for column in (*columns, "NLL shift"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["weights"],
            r["factors"],
            r["mode"],
            r["merge"],
            f"{r['retained']:.3f}",
            f"{r['cosine']:.3f}",
            f"{r['effect_norm_ratio']:.3f}",
            f"{r['nll_shift']:+.4f}",
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "adapters": [str(p) for p in args.adapters],
        "base_model": name,
        "texts": len(TEXTS),
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
