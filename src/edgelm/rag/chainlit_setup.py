"""Where the Chainlit app keeps its files, and the command that starts it.

Chainlit writes ``.chainlit/config.toml``, 20-odd translation files and an upload folder
``.files/`` into its *app root* — by default the current directory, which would litter
whatever folder the user ran ``edgelm rag chat`` from (or the repository). edgelm points the
app root at ``$EDGELM_HOME/chainlit`` instead and writes the few settings it cares about
there; Chainlit fills in its defaults and translations at run time, so none of it is kept in
the repository.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from edgelm.errors import MissingExtra

CONFIG = """\
# Written by `edgelm rag chat` on every start; edit edgelm.rag.chainlit_setup instead.
[project]
allow_origins = ["*"]

[features]
unsafe_allow_html = false
latex = false

[features.spontaneous_file_upload]
enabled = true
# MIME type -> extensions: a browser that knows no type for ".md" still matches by extension
accept = { "text/plain" = [".txt", ".text", ".rst", ".md", ".markdown"], "text/markdown" = [".md", ".markdown"], "text/html" = [".html", ".htm"], "application/pdf" = [".pdf"] }
max_files = 20
max_size_mb = 50

[UI]
name = "edgelm RAG"
cot = "hidden"

[meta]
generated_by = "2.12.0"
"""

APP_FILE = Path(__file__).resolve().parent / "chainlit_app.py"


def app_root(home: Path) -> Path:
    """Prepare ``$EDGELM_HOME/chainlit`` with edgelm's Chainlit settings."""
    root = home / "chainlit"
    (root / ".chainlit").mkdir(parents=True, exist_ok=True)
    (root / ".chainlit" / "config.toml").write_text(CONFIG, encoding="utf-8")
    return root


def chainlit_command(port: int, host: str, headless: bool) -> list[str]:
    """``chainlit run`` for the RAG app, with the Chainlit of this Python environment."""
    chainlit = Path(sys.executable).parent / "chainlit"
    found = str(chainlit) if chainlit.exists() else shutil.which("chainlit")
    if not found:
        raise MissingExtra("chainlit", "ui")
    cmd = [found, "run", str(APP_FILE), "--host", host, "--port", str(port)]
    return [*cmd, "--headless"] if headless else cmd


def chainlit_env(home: Path, endpoint: str, collection: str) -> dict[str, str]:
    """The environment the app reads: where collections live and which service answers."""
    return {
        **os.environ,
        "CHAINLIT_APP_ROOT": str(app_root(home)),
        "EDGELM_HOME": str(home),
        "EDGELM_ENDPOINT": endpoint,
        "EDGELM_RAG_COLLECTION": collection,
    }
