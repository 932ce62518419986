"""One embedded SmolLM2-135M-Instruct for every structured-output test (engine and server)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The embedded model on the CPU in float32, loaded once per test session."""
    from fdpp import LLM

    llm = LLM(dtype="float32", device="cpu", show_progress=False)
    yield llm
    llm.close()
