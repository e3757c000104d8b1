"""schemathesis against the collector's OpenAPI spec, on a live collector per backend.

Every operation the spec lists gets schema-valid requests (path parameters often set to the
seeded runs, alerts, silences, receivers, so reads hit real data) and schema-invalid ones.
Checks: never a 5xx; status codes, content types, headers and bodies as the spec documents
them; schema-invalid requests rejected with a 4xx. Schema-valid requests may still be refused
(an unknown run, a layer count that does not match the run): that is checked by the wire
format fuzzing in test_wire.py, not here.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.generation import GenerationMode

from server.app import create_app
from server.settings import Settings
from tests.fuzz.conftest import AUTH_HEADERS, FuzzCollector

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
EXAMPLES = {"positive": 12, "negative": 8}


def _negatable(operation: dict[str, Any]) -> bool:
    """Whether a request can break the spec: a body, or a parameter that is not free text
    (a path or query string of any content is always valid)."""
    if "requestBody" in operation:
        return True
    for param in operation.get("parameters", []):
        schema = {k: v for k, v in param["schema"].items() if k not in ("title", "description")}
        for option in schema.get("anyOf", [schema]):
            if option != {"type": "string"} and option.get("type") != "null":
                return True
    return False


def _operations() -> list[tuple[str, str]]:
    """(label, mode) for every operation of the spec, labels as schemathesis writes them
    ("GET /api/v1/runs"); schema-invalid requests only where there can be any."""
    spec = create_app(Settings(database_url="sqlite:///:memory:")).openapi()
    out = []
    for path, ops in spec["paths"].items():
        for method, operation in ops.items():
            label = f"{method.upper()} {path}"
            out.append((label, "positive"))
            if _negatable(operation):
                out.append((label, "negative"))
    return out


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def api_schema(fuzz_collector: FuzzCollector) -> Any:
    """The spec as the live collector serves it."""
    return schemathesis.openapi.from_url(
        f"{fuzz_collector.url}/openapi.json", headers=AUTH_HEADERS, timeout=30
    )


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    served = {op.ok().label for op in api_schema.get_all_operations()}
    assert served == {label for label, _ in OPERATIONS} and len(served) >= 20
    assert sum(mode == "negative" for _, mode in OPERATIONS) >= 12


@pytest.mark.parametrize(("label", "mode"), OPERATIONS)
def test_operation(fuzz_collector: FuzzCollector, api_schema: Any, label: str, mode: str) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    seeded = st.fixed_dictionaries(
        {name: st.sampled_from([None, *values]) for name, values in fuzz_collector.seeds.items()}
    )

    @given(case=strategy, seed=seeded)
    @settings(max_examples=EXAMPLES[mode], deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.function_scoped_fixture])
    def fuzz(case: Any, seed: dict[str, object]) -> None:
        if mode == "positive":  # a real run, alert... in place of a random name, at times
            for name, value in seed.items():
                if value is not None and name in (case.path_parameters or {}):
                    case.path_parameters[name] = value
        response = case.call(base_url=fuzz_collector.url, headers=AUTH_HEADERS, timeout=30)
        case.validate_response(response, checks=CHECKS, headers=AUTH_HEADERS)

    fuzz()
