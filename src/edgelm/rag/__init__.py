"""Local retrieval-augmented generation: ingest documents, retrieve, answer with citations.

Kept import-light on purpose: ``edgelm.settings`` may import :mod:`edgelm.rag.config`, so
nothing here may pull in the server, SQLite stores or HTTP clients at import time.
"""
