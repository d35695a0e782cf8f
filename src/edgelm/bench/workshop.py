"""The environment variables of the Foundry Local workshop's scripts, as edgelm reads them.

The workshop's benchmark and comparison sessions are configured by environment variables
(``BENCH_MODELS=… python bench.py``). ``edgelm bench`` and ``edgelm compare`` read the same
names, so a workshop's habits and scripts carry over: ``BENCH_MODELS=qwen2.5-0.5b edgelm
bench``. ``FOUNDRY_LOCAL_ENDPOINT`` is the workshop's way of naming the service; it is the
OpenAI base URL (``http://localhost:5273/v1``), edgelm's settings want the service's root.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgelm.errors import ConfigError

ENDPOINT_VARIABLE = "FOUNDRY_LOCAL_ENDPOINT"

# Every name the workshop's scripts set that edgelm reads (bench_cmd declares what each means).
VARIABLES = (
    "BENCH_MODELS",
    "BENCH_ROUNDS",
    "BENCH_PROMPT",
    "BENCH_MAX_TOKENS",
    "BENCH_STREAM",
    "SLM_ALIAS",
    "LLM_ALIAS",
    "COMPARE_PROMPT",
    ENDPOINT_VARIABLE,
)


def workshop_endpoint(env: Mapping[str, str]) -> str | None:
    """The service root named by ``FOUNDRY_LOCAL_ENDPOINT``, or None when it is not set."""
    url = env.get(ENDPOINT_VARIABLE, "").strip().rstrip("/")
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{ENDPOINT_VARIABLE} must be a URL such as http://127.0.0.1:5273/v1, got '{url}'"
        )
    return url[: -len("/v1")] if url.endswith("/v1") else url
