"""Fixtures for the client tests: a real local HTTP receiver standing in for the collector."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()
