"""What the published JSON Schemas take, the gate takes: a partner validating its events with
them in another language is not refused for what they let through — but for the rules JSON
Schema cannot state, each named in `tests.schemas.strategies.UNSTATABLE`."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

from schemas import registry
from tests.schemas.strategies import UNSTATABLE, catalog_data


@pytest.mark.parametrize("type_", registry.event_types())
def test_data_the_json_schema_takes_is_taken_by_the_gate(type_: str) -> None:
    adapter = registry.spec_for(type_).adapter

    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=catalog_data(type_))
    def check(data: dict[str, Any]) -> None:
        try:
            adapter.validate_python(data)
        except ValidationError as refused:
            unexpected = [error for error in refused.errors() if not any(rule in error["msg"] for rule in UNSTATABLE)]
            assert not unexpected, f"the schema takes what the gate refuses: {unexpected}"

    check()
