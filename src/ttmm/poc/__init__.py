"""``ttmm poc``: a proof of concept on a user's own corpus (design notes §1, adoption step 1).

It answers the three questions that decide adoption, in a time budget on the machine it runs
on: how much quality TTMM buys against fine-tuning and the base model (paired intervals), what
it adds to the cost of every answer (time, memory, money), and what the bank costs to build
and keep (time, compute, tokens, bytes, steps). Modules: :mod:`.config` (the settings),
:mod:`.plan` (rates and the plan), :mod:`.inference`, :mod:`.engineering`, :mod:`.verdict`,
:mod:`.summary` (``poc.json``), :mod:`.report` and :mod:`.plots` (the readable report),
:mod:`.runner` (the stages).
"""

from ttmm.poc.config import POC_CORPORA, PocConfig, PocError
from ttmm.poc.runner import run_poc

__all__ = ["POC_CORPORA", "PocConfig", "PocError", "run_poc"]
