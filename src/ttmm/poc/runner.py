"""``ttmm poc``: from a corpus to the three numbers that decide adoption, in a time budget.

Stages, each timed, each resumable (a finished stage's output is a file under ``out/stages``,
so a killed run continues where it stopped, with the plan it made):

1. ``plan``: load the model, read the corpus, measure this machine (:mod:`.plan`), plan;
2. ``build``: ``ttmm build`` with the fine-tuning baseline (itself resumable) into ``out/bank``,
   CPU seconds counted around it; skipped when ``--bank`` is given;
3. ``evaluate``: the evaluation harness (itself resumable) into ``out/eval``, sized again to
   the time actually left;
4. ``inference``: memory and batched throughput in a fresh process (:mod:`.inference`);
5. ``engineering``: the bank's build cost and the operator's steps (:mod:`.engineering`);
6. ``report``: ``poc.json``, ``report.md``, ``report.html``, ``rollout.yaml`` and the plots.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from ttmm.atomic import atomic_write_json
from ttmm.poc.config import PocConfig, PocError
from ttmm.poc.plan import (
    CHEAP_METHODS,
    MIN_EVAL_DOCS,
    SAFETY,
    TIMED_METHODS,
    CorpusFacts,
    EvalPlan,
    Plan,
    Rates,
    choose_test_fraction,
    inference_seconds,
    measure_rates,
    plan_evaluation,
    plan_run,
)

logger = logging.getLogger(__name__)

STATE_NAME = ".ttmm-poc.json"


def _defaults():
    """The build's and the evaluation's defaults, which a PoC runs with (each has one home)."""
    from ttmm.build.config import BuildConfig
    from ttmm.eval.harness import EvalConfig

    return BuildConfig(), EvalConfig()


class PocRun:
    """One PoC folder: its state file, its stages, and the models while they are loaded."""

    def __init__(self, config: PocConfig, out: str | Path, progress: bool = True):
        self.config = config
        self.out = Path(out).expanduser()
        self.progress = progress
        self.state = self._open()
        self.started = time.perf_counter()
        self.spent_before = sum(s["seconds"] for s in self.state["stages"].values())
        self.loaded = None  # (model, tokenizer, encoder) while this process holds them
        self.stage_started = self.started

    # -- the folder ------------------------------------------------------------------------

    def _open(self) -> dict:
        out, digest = self.out, self.config.content_hash()
        if out.exists() and not out.is_dir():
            raise PocError(f"--out {out} is a file; choose a new or empty folder")
        state_path = out / STATE_NAME
        if out.is_dir() and any(out.iterdir()):
            if not state_path.is_file():
                raise PocError(
                    f"--out {out} is not empty and holds no ttmm PoC; choose a new or empty folder"
                )
            state = json.loads(state_path.read_text())
            if state.get("config_hash") != digest:
                raise PocError(
                    f"--out {out} holds a PoC of other settings ({state.get('config', {})}); "
                    "rerun with those settings to resume it, or choose another --out"
                )
            return state
        return {"config_hash": digest, "config": self.config.to_dict(), "stages": {}}

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / STATE_NAME, self.state, indent=1)

    def stage_file(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def read_stage(self, name: str) -> dict:
        return json.loads(self.stage_file(name).read_text())

    def elapsed(self) -> float:
        """Seconds this PoC has run, over every process that worked on it."""
        return self.spent_before + time.perf_counter() - self.started

    @property
    def bank_path(self) -> Path:
        return Path(self.config.bank).expanduser() if self.config.bank else self.out / "bank"

    def run(self) -> dict:
        stages = {
            "plan": self.plan,
            "build": self.build,
            "evaluate": self.evaluate,
            "inference": self.inference,
            "engineering": self.engineering,
            "report": self.report,
        }
        todo = [
            name
            for name in stages
            if not (name in self.state["stages"] and self.stage_file(name).is_file())
            and not (name == "build" and self.config.bank)
        ]
        bar = tqdm(
            total=len(stages),
            initial=len(stages) - len(todo),
            desc="poc",
            unit="stage",
            disable=not self.progress,
        )
        for name in todo:
            stage = stages[name]
            bar.set_postfix_str(name)
            self.stage_started = time.perf_counter()
            logger.info("poc stage %s ...", name)
            result = stage()
            seconds = time.perf_counter() - self.stage_started
            self.state["stages"][name] = {"seconds": round(seconds, 3)}
            self.stage_file(name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.stage_file(name), result)
            self._save()
            bar.update()
        bar.close()
        return self.read_stage("report")

    # -- stages ----------------------------------------------------------------------------

    def _load(self):
        if self.loaded is None:
            from ttmm.assets import load_base_model
            from ttmm.embed import Encoder

            c = self.config
            model, tokenizer = load_base_model(c.base_model, dtype=c.dtype, device=c.device)
            self.loaded = (model, tokenizer, Encoder(c.encoder, device=c.device))
        return self.loaded

    def plan(self) -> dict:
        from ttmm.build.config import BuildConfig

        self.out.mkdir(parents=True, exist_ok=True)
        self._save()
        started = time.perf_counter()
        model, tokenizer, encoder = self._load()
        load_seconds = time.perf_counter() - started
        if self.config.bank:
            facts, texts = self._bank_facts(tokenizer)
        else:
            facts, texts = self._corpus_facts(tokenizer)
        train = BuildConfig(device=self.config.device, dtype=self.config.dtype).resolved().train
        rates = measure_rates(model, tokenizer, encoder, texts, train, load_seconds)
        plan = plan_run(
            rates,
            facts,
            self.config.budget_minutes,
            elapsed_seconds=self.elapsed(),
            experts=self.config.experts,
            max_docs=self.config.max_docs,
            build=self.config.bank is None,
        )
        for reason in plan.reasons:
            logger.info("plan: %s", reason)
        return {"rates": rates.to_dict(), "facts": facts.to_dict(), "plan": plan.to_dict()}

    def _corpus_facts(self, tokenizer) -> tuple[CorpusFacts, list[str]]:
        from ttmm.build.corpus import (
            chunk_documents,
            domain_counts,
            read_corpora,
            split_documents,
        )

        documents, _ = read_corpora(self.config.corpora)
        if not documents:
            raise PocError(
                f"the corpus {list(self.config.corpora)} holds no document; point --corpus at "
                "text (a jsonl file, a folder of files, wiki or stdlib)"
            )
        counts = domain_counts(documents)
        if sum(counts.values()) < 2:
            raise PocError(
                f"the corpus holds {sum(counts.values())} document: a PoC trains on some "
                "documents and measures on others it never saw; give at least a few dozen"
            )
        fraction = choose_test_fraction(counts, self.config.max_docs)
        split = split_documents(documents, fraction, self.config.seed)
        build, _ = _defaults()
        chunks = chunk_documents(
            split.train,
            tokenizer,
            window=build.window,
            min_tokens=build.min_tokens,
            max_chunks_per_document=build.max_chunks_per_document,
        )
        if not chunks:
            raise PocError(
                f"the training documents give no chunk of at least {build.min_tokens} tokens; "
                "add longer documents"
            )
        return self._facts(
            tokenizer,
            counts,
            split.test,
            len(chunks),
            sum(len(c.token_ids) for c in chunks),
            fraction,
        ), [c.text for c in chunks[:: max(1, len(chunks) // 16)][:16]]

    def _bank_facts(self, tokenizer) -> tuple[CorpusFacts, list[str]]:
        from ttmm.bank import Bank
        from ttmm.build.chunks import ChunkIndex
        from ttmm.eval.documents import held_out_documents

        bank = Bank.load(self.bank_path)
        index = ChunkIndex.load(bank.path)
        texts = index.texts[:: max(1, len(index.texts) // 16)][:16]
        data = bank.manifest.data
        counts = {d: sum(v.values()) for d, v in data.get("documents", {}).items()}
        chunks = sum(data.get("chunks_per_domain", {}).values())
        return self._facts(
            tokenizer,
            counts,
            held_out_documents(bank),
            chunks,
            chunks * data.get("window", _defaults()[0].window),
            (bank.manifest.build or {}).get("config", {}).get("test_fraction", 0.15),
        ), texts

    def _facts(self, tokenizer, counts, held_out_docs, n_chunks, n_tokens, fraction) -> CorpusFacts:
        held_out, doc_tokens = _held_out(tokenizer, held_out_docs, sorted(counts))
        return CorpusFacts(
            domains=tuple(sorted(counts)),
            documents=dict(counts),
            held_out=held_out,
            train_chunks=n_chunks,
            train_tokens=n_tokens,
            window=_defaults()[0].window,
            test_fraction=fraction,
            doc_tokens=doc_tokens,
        )

    def build(self) -> dict:
        from ttmm.build.config import BuildConfig
        from ttmm.build.pipeline import run_build
        from ttmm.poc.engineering import cpu_seconds

        plan = Plan.from_dict(self.read_stage("plan")["plan"])
        c = self.config
        config = BuildConfig(
            corpora=c.corpora,
            experts=plan.experts,
            base_model=c.base_model,
            encoder=c.encoder,
            test_fraction=plan.test_fraction,
            split_seed=c.seed,
            seed=c.seed,
            with_finetune=True,
            budget_tokens=plan.budget_tokens,
            device=c.device,
            dtype=c.dtype,
        )
        cpu, wall = cpu_seconds(), time.perf_counter()
        result = run_build(config, self.bank_path, progress=self.progress)
        return {  # a resumed build counts the resumed part only (its manifest has the rest)
            "wall_seconds": time.perf_counter() - wall,
            "cpu_seconds": cpu_seconds() - cpu,
            "resumed_adapters": result.reused,
            "config": config.to_dict(),
        }

    def _engine(self):
        from ttmm.bank import Bank
        from ttmm.model import TTMM

        model, tokenizer, encoder = self._load()
        return TTMM(model, tokenizer, encoder, Bank.load(self.bank_path))

    def evaluate(self) -> dict:
        from ttmm.eval.documents import held_out_documents
        from ttmm.eval.harness import EvalConfig, evaluate
        from ttmm.eval.ttt import TTTConfig

        stored = self.read_stage("plan")
        rates = Rates.from_dict(stored["rates"])
        engine = self._engine()
        if "eval_plan" not in self.state:  # planned once, from the time actually left
            facts = CorpusFacts.from_dict(stored["facts"])  # the bank's split, after dedup:
            held_out, doc_tokens = _held_out(
                engine.tokenizer, held_out_documents(engine.bank), facts.domains
            )
            facts = replace(facts, held_out=held_out, doc_tokens=doc_tokens)
            budget = SAFETY * self.config.budget_minutes * 60
            left = round(budget - self.elapsed() - inference_seconds(rates), 1)
            plan = plan_evaluation(rates, facts, left, self.config.max_docs)
            notes = []
            if plan.docs < MIN_EVAL_DOCS:
                notes.append(
                    f"the build left {max(left, 0):.0f} s for the evaluation: it was cut to "
                    f"{MIN_EVAL_DOCS} documents a domain and will overrun the budget"
                )
                plan = EvalPlan(MIN_EVAL_DOCS, 0, plan.neighbours, 1, plan.new_tokens, plan.seconds)
            self.state["eval_plan"] = plan.to_dict() | {
                "notes": notes,
                "seconds_left": left,
            }
            self._save()
        plan = EvalPlan.from_dict(self.state["eval_plan"])
        methods = CHEAP_METHODS + (("ttt",) if plan.ttt_docs else ())
        config = EvalConfig(
            methods=methods,
            docs=plan.docs,
            ttt_docs=plan.ttt_docs or None,
            seed=self.config.seed,
            timing_prompts=plan.timing_prompts,
            new_tokens=plan.new_tokens,
            timed_methods=TIMED_METHODS,
            ttt=TTTConfig(neighbours=plan.neighbours),
        )
        evaluate({"bank": engine}, self.out / "eval", config, progress=self.progress)
        return {"config": config.to_dict(), "results": str(self.out / "eval" / "results.json")}

    def inference(self) -> dict:
        import torch

        from ttmm.eval.documents import held_out_documents
        from ttmm.poc.inference import measure_serving_in_subprocess

        self.loaded = None  # free the models: the measurement runs in a process of its own
        report = json.loads((self.out / "eval" / "results.json").read_text())
        by_id = {d.id: d for d in held_out_documents(_bank(self.bank_path))}
        prompts = [by_id[i].text for i in report["banks"]["bank"]["documents"] if i in by_id]
        return measure_serving_in_subprocess(
            str(self.bank_path),
            prompts[:: max(1, len(prompts) // 8)][:8],
            self.config.device,
            self.config.dtype,
            torch.get_num_threads(),
        )

    def engineering(self) -> dict:
        from ttmm.poc.engineering import engineering_cost

        build = self.read_stage("build") if self.stage_file("build").is_file() else None
        return engineering_cost(self.bank_path, build, str(self.out / "rollout.yaml"))

    def report(self) -> dict:
        from ttmm.poc.summary import assemble

        return assemble(self, self.stage_started)


def _held_out(tokenizer, documents, domains) -> tuple[dict[str, int], float]:
    """Held-out documents a domain long enough to score (more tokens than the routing prefix
    and the shortest scored continuation), and their mean tokens read (at most max_tokens)."""
    _, evaluation = _defaults()
    shortest = evaluation.prefix_tokens + evaluation.min_scored_tokens + 1
    lengths: dict[str, list[int]] = {d: [] for d in domains}
    ids = tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]
    for doc, row in zip(documents, ids):
        if len(row) >= shortest:
            lengths.setdefault(doc.domain, []).append(min(len(row), evaluation.max_tokens))
    every = [n for v in lengths.values() for n in v]
    if not every:
        raise PocError(
            f"no held-out document has more than {shortest - 1} tokens: quality is measured on "
            "documents the bank never trained on; add more (or longer) documents"
        )
    return {d: len(lengths.get(d, [])) for d in domains}, float(statistics.mean(every))


def _bank(path: Path):
    from ttmm.bank import Bank

    return Bank.load(path, verify=False)


def run_poc(config: PocConfig, out: str | Path, progress: bool = True) -> dict:
    """Run (or resume) a PoC into ``out``; returns the ``poc.json`` object."""
    return PocRun(config, out, progress).run()
