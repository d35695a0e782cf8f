"""Property-based fuzzing of the HTTP API from its own OpenAPI schema: no input may cause a 5xx.

Every operation is fed generated requests (valid and invalid bodies, paths, parameters); the
only check is the one that matters for a service: it answers, and never with a server error.
The case count is printed so runs can be compared.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgelm.catalog import Catalog
from edgelm.errors import EdgelmError
from edgelm.server.app import create_app
from edgelm.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from edgelm.settings import load_settings
from tests.unit.conftest import fake_entry


def _app(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("fuzz-home")
    settings = load_settings(env={"EDGELM_HOME": str(home)})
    catalog = Catalog(
        [fake_entry("fake-a"), fake_entry("fake-broken", fail_load="corrupt")],
        user_file=home / "models.toml",
    )
    return create_app(settings, catalog=catalog)


def test_no_server_errors(tmp_path_factory: pytest.TempPathFactory) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", _app(tmp_path_factory))
    counts: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        counts[label] = 0

        def make_check(operation, label: str):  # binds this operation for the closure
            @given(case=operation.as_strategy())
            @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                counts[label] += 1
                response = case.call()
                assert response.status_code < 500, f"{label}: {response.text[:300]}"
                if response.status_code >= 400:  # every refusal is an OpenAI-style error body
                    assert set(response.json()["error"]) >= {"message", "type", "code"}

            return check

        make_check(operation, label)()
    assert len(counts) >= 8
    print(f"fuzz: {sum(counts.values())} cases over {len(counts)} operations: {counts}")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | st.just("fake-a"),
        "messages": json_values
        | st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "x"]), "content": json_values}
            ),
            max_size=3,
        ),
        "prompt": json_values,
        "input": json_values,
        "temperature": json_values,
        "max_tokens": json_values,
        "stop": json_values,
        "logprobs": json_values,
        "top_logprobs": json_values,
        "response_format": json_values,
        "stream": json_values,
    },
)


@given(request_like)
@settings(max_examples=300, deadline=None)
def test_request_parsing_never_fails_unexpectedly(body: dict) -> None:
    """Any JSON body either parses into a request or fails with a validation/request error."""
    json.dumps(body)  # only JSON-representable input matters
    for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest):
        try:
            parsed = model.model_validate(body)
        except ValidationError:
            continue
        if hasattr(parsed, "to_generation"):
            try:
                parsed.to_generation()
            except EdgelmError as exc:
                assert 400 <= exc.status < 500
