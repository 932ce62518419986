"""Test set-up. Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, before anything else imports fdpp."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # NOTE: the README's command runs the suite in 2 pytest-xdist workers on a 2-core machine; one
    # intra-op thread each keeps them from oversubscribing the cores (2 x 2 threads ran 2x slower).
    torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random-weight Llama checkpoint (vocab 128, 2 layers, context 256), written once per session."""
    from tests.helpers import write_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    write_tiny_llama(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    """One engine on the tiny checkpoint (CPU, float32) shared by every test that only adds requests.

    Tests that use it must leave it empty (every request finished or aborted)."""
    from fdpp import LLM

    llm = LLM(tiny_llama_dir, dtype="float32", device="cpu", show_progress=False, calibration="off",
              num_blocks=64, block_size=16)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def smollm2_llm():
    """The embedded SmolLM2-135M-Instruct on the CPU, loaded once for the whole session (loading takes
    seconds: the GGUF header, 272 tensors, the tokenizer). Tests must leave it without requests."""
    from fdpp import LLM
    from fdpp.errors import ModelLoadError

    try:
        # NOTE: dequantized at load (quantization="none"): these tests are about the engine, and
        # dense fp32 matmuls decode ~2.5x faster on the CPU than the Q4_1 reference path. The Q4_1
        # default itself is tested in tests/quant/test_quant_smollm2.py.
        llm = LLM(dtype="float32", device="cpu", show_progress=False, quantization="none")
    except ModelLoadError as e:
        pytest.skip(str(e))
    yield llm
    llm.close()
