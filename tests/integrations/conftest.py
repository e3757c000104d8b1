"""The real local receiver of tests/client, for the framework adapters' records."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()
