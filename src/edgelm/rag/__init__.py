"""Local retrieval-augmented generation: ingest documents, retrieve, answer with citations.

The ``rag.*`` settings are part of the one schema (:class:`edgelm.settings.RagSettings`);
the types the steps share are in :mod:`edgelm.rag.types`. Kept import-light: nothing here
pulls in the server, SQLite stores or HTTP clients at import time.
"""
