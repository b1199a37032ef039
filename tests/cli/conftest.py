from __future__ import annotations

import pytest


@pytest.fixture
def storage_uri(
    request: pytest.FixtureRequest, redis_server, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The session's Redis, in the database the test module names (``DB``), emptied; set as
    ``PLANGATE_STORAGE``, as a deployment sets it (it beats the config's ``storage:``)."""
    db = request.module.DB
    uri = f"redis://127.0.0.1:{redis_server.port}/{db}"
    with redis_server.client() as client:
        client.select(db)
        client.flushdb()
    monkeypatch.setenv("PLANGATE_STORAGE", uri)
    return uri
