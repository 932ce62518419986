"""One embedded SmolLM2-135M-Instruct for every structured-output test (engine and server)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2(smollm2_llm):
    """The session's embedded model (tests/conftest.py): CPU, float32, loaded once."""
    return smollm2_llm
