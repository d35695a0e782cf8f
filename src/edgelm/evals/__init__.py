"""Evaluation: shipped question sets, metrics, an LLM judge, a resumable harness and reports.

Submodules are imported by name (``from edgelm.evals.metrics import token_f1``) so that using
the light parts (datasets, metrics) never pulls matplotlib or the HTTP client.
"""
