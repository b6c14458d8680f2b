"""Evaluation (design notes §3): every method on a bank's held-out documents.

`harness` runs and caches them, `methods` names them, `ttt` and `ensemble` are the costly
baselines, `report` writes the results JSON, tables and plots.
"""
