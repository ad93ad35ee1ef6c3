"""Schemathesis over the gateway's OpenAPI schema: no input makes it answer 5xx or crash.

The gateway runs in process (ASGI) on the fake backend of tests/test_gateway_api.py, so
this checks the API layer's handling of every generated body, fast and without a stack.
"""

from __future__ import annotations

from types import SimpleNamespace

import schemathesis
from hypothesis import HealthCheck, settings

from services.gateway.http_api import create_app
from shared.models.tokenizer import train_tokenizer
from tests.test_gateway_api import CORPUS, FakeBackend, make_settings

APP = create_app(make_settings(), SimpleNamespace(backend=FakeBackend(train_tokenizer(CORPUS, 300, threads=1)), nc=None))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, (case.path, case.body, response.status_code, response.text[:300])
