"""fdpp: a fast LLM inference engine implementing FlashDecoding++ in Triton."""
from fdpp.outputs import CompletionOutput, RequestOutput
from fdpp.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it on first use so `fdpp --help` stays fast.
    if name == "LLM":
        from fdpp.llm import LLM

        return LLM
    raise AttributeError(name)
