"""/openapi.json is true: a bounded schemathesis run over the studio's routes (issue 20.5).

Every answer, errors included (the 422 body, /v1's 400 and 404 bodies), must match what the schema documents for
its status and content type, and no input may cause a 5xx. Schema-valid input may still be refused (a step count
over one model's cap cannot be written in a shared schema), so "positive data acceptance" is not checked. Routes
that change the model store (adding, removing, downloading models; adapter cards) and video jobs (background work
that outlives the request) are left out; video generation is slow, so its cases are few."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (ignored_auth, missing_required_header, negative_data_rejection,  # noqa: E402
                                 positive_data_acceptance, unsupported_method)

from conftest import tiny_studio  # noqa: E402

EXAMPLES = 12  # per operation: about 200 cases in all
NOT_CHECKED = [positive_data_acceptance, negative_data_rejection, missing_required_header, unsupported_method,
               ignored_auth]


def test_answers_match_the_schema(tmp_path):
    from fastapi import FastAPI
    from hypothesis import given

    from studio.server import app_kwargs

    app = FastAPI(**app_kwargs(tiny_studio(tmp_path / "logs")))
    schema = (schemathesis.openapi.from_asgi("/openapi.json", app)
              .exclude(path_regex=r"^/models").exclude(path_regex=r"^/v1/videos").exclude(path_regex=r"^/loras/"))
    failures, operations = {}, 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def check(case):
            if case.path == "/generate/video" and isinstance(case.body, dict):  # a short, small clip
                case.body.update(frames=2, steps=1, width=64, height=64)
            case.call_and_validate(excluded_checks=NOT_CHECKED)

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - every operation's finding is collected and reported
            failures[operation.label] = str(exc)[:2000]
    assert operations >= 15 and not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
