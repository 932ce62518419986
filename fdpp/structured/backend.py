"""The grammar engine behind structured output: xgrammar.

One ``StructuredOutputBackend`` per engine. It compiles a request's constraint into a grammar
(cached by the constraint's text; refused, with the limit named, when the text is too large or the
compilation too slow), gives each constrained sequence its own matcher, and fills the per-step
token bitmask (one bit per vocabulary entry, 1 = allowed) that the sampler applies on the device.

Why xgrammar: vLLM and SGLang use it by default; it compiles a typical schema in milliseconds and
fills a mask in tens of microseconds (token classes are precomputed per grammar); its batch matcher
fills many rows on several threads; it ships manylinux wheels (x86-64 and aarch64, CPython 3.9+)
that need only numpy, pydantic, torch, transformers, triton and apache-tvm-ffi.

Thread safety: ``compile`` may be called from any thread (the server compiles off the engine
thread, so that the engine step never waits for a compilation); everything else runs on the
engine thread.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fdpp.errors import InvalidRequestError
from fdpp.structured.params import DEFAULT_COMPILE_TIMEOUT_S, DEFAULT_MAX_SPEC_BYTES, StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 512 << 20
# Longest run of whitespace between JSON tokens. NOTE: unbounded whitespace lets a model that has
# closed a value too early spin on newlines until max_tokens (seen with SmolLM2 here, and reported
# against vLLM and others); 8 still allows pretty-printing (a newline and an indent).
JSON_MAX_WHITESPACE = 8

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " (and sometimes a failed check).
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


class StructuredOutputBackend:
    """Compiles constraints (cached) and fills token bitmasks, with xgrammar.

    Args:
        tokenizer: the model's Hugging Face tokenizer (or ``None`` when ``tokenizer_info`` is given).
        vocab_size: the model's vocabulary (logits width), which may exceed the tokenizer's.
        stop_token_ids: the tokens that end a sequence; a finished grammar allows only these.
        tokenizer_info: an ``xgrammar.TokenizerInfo`` to use instead of building one from ``tokenizer``.
        compile_timeout_s / max_spec_bytes: limits; a request over them is refused with
            ``InvalidRequestError`` naming the limit.
        cache_bytes: memory budget of the compiled-grammar cache (least recently used are dropped).
        max_threads: threads that fill the bitmask rows of a batch ("auto": half the cores).
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        *,
        tokenizer_info: xgrammar.TokenizerInfo | None = None,
        compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
        max_spec_bytes: int = DEFAULT_MAX_SPEC_BYTES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_threads: int | str = "auto",
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self.compile_timeout_s = float(compile_timeout_s)
        self.max_spec_bytes = int(max_spec_bytes)
        self.cache_bytes = int(cache_bytes)
        self.max_threads = max_threads
        self._info = tokenizer_info
        self._compiler: Any = None
        self._batch_matcher: Any = None
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_used = 0
        self._lock = threading.Lock()
        self.num_compiles = 0  # compilations actually run (not cache hits)

    # ---- set-up (lazy: an engine that never sees a constraint never imports xgrammar) -------------
    def _xgr(self) -> Any:
        try:
            import xgrammar
        except ImportError as e:  # pragma: no cover - xgrammar is a dependency
            raise InvalidRequestError(
                f"structured outputs need the xgrammar package, which cannot be imported ({e}); "
                "pip install xgrammar"
            ) from e
        return xgrammar

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = self._xgr()
                if self._info is None:
                    if self.tokenizer is None:
                        raise InvalidRequestError(
                            "structured outputs need the model's tokenizer, and this model has none "
                            "(random weights): load a model with a tokenizer"
                        )
                    self._info = xgr.TokenizerInfo.from_huggingface(
                        self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                    )
                # NOTE: xgrammar's own cache is off: ours is keyed the same way and also spares the
                # compile thread (and its timeout) on a hit.
                self._compiler = xgr.GrammarCompiler(self._info, cache_enabled=False)
            return self._compiler

    @property
    def bitmask_width(self) -> int:
        """int32 words per bitmask row: ceil(vocab_size / 32)."""
        return (self.vocab_size + 31) // 32

    # ---- compilation ---------------------------------------------------------------------------
    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar of ``params`` (cached). Raises ``InvalidRequestError`` saying what is
        wrong with a bad schema / regex / grammar, or which limit a too large or slow one exceeds."""
        spec = params.spec_text()
        size = len(spec.encode("utf-8"))
        if size > self.max_spec_bytes:
            raise InvalidRequestError(
                f"structured_outputs: the {params.kind} constraint is {size} bytes, over the limit of "
                f"{self.max_spec_bytes} bytes (--structured-outputs-max-bytes); send a smaller one",
                param="structured_outputs")
        key = (params.kind, spec, bool(params.disable_any_whitespace))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiler = self._get_compiler()
        compiled = self._compile_with_timeout(lambda: self._compile_uncached(compiler, params), params.kind)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compiled
                self._cache_used += compiled.memory_size_bytes
                while self._cache_used > self.cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cache_used -= old.memory_size_bytes
            self.num_compiles += 1
        return compiled

    def _compile_uncached(self, compiler: Any, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        try:
            if kind in ("json", "json_object"):
                if kind == "json_object":
                    schema = '{"type": "object"}'
                else:
                    schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                if params.disable_any_whitespace:
                    return compiler.compile_json_schema(schema, any_whitespace=False)
                return compiler.compile_json_schema(schema, max_whitespace_cnt=JSON_MAX_WHITESPACE)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(params.choice))
            return compiler.compile_grammar(params.grammar)
        except RuntimeError as e:  # xgrammar reports every bad input as a RuntimeError
            what = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
                    "choice": "choice list", "grammar": "EBNF grammar"}[kind]
            raise InvalidRequestError(f"structured_outputs: invalid {what}: {_clean_error(e)}",
                                      param="structured_outputs") from None

    def _compile_with_timeout(self, fn: Any, kind: str) -> Any:
        """Run ``fn`` in a worker thread and wait at most ``compile_timeout_s``.

        NOTE: xgrammar's compilation cannot be cancelled; a timed-out one finishes in the background
        (it releases the GIL, so it only costs a core) and its result is dropped.
        """
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                box["error"] = e

        start = time.perf_counter()
        worker = threading.Thread(target=run, name="fdpp-grammar-compile", daemon=True)
        worker.start()
        worker.join(self.compile_timeout_s)
        if worker.is_alive():
            raise InvalidRequestError(
                f"structured_outputs: compiling the {kind} constraint took longer than the limit of "
                f"{self.compile_timeout_s:g} s (--structured-outputs-compile-timeout); simplify it",
                param="structured_outputs")
        if "error" in box:
            raise box["error"]
        logger.debug("compiled a %s constraint in %.1f ms", kind, 1e3 * (time.perf_counter() - start))
        return box["value"]

    # ---- per-sequence matchers and the bitmask -------------------------------------------------
    def new_matcher(self, compiled: Any) -> Any:
        """A fresh matcher (the state of one sequence) for a compiled grammar."""
        return self._xgr().GrammarMatcher(compiled)

    def fill_bitmask(self, matchers: Sequence[Any | None], out: torch.Tensor) -> bool:
        """Fill ``out[:len(matchers)]`` (int32 [rows, bitmask_width], CPU): each constrained row
        with its matcher's allowed tokens, the other rows with all ones. Returns False, touching
        nothing, when no row is constrained."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return False
        out[: len(matchers)].fill_(-1)
        if len(rows) == 1:
            matchers[rows[0]].fill_next_token_bitmask(out, rows[0])
        else:
            if self._batch_matcher is None:
                self._batch_matcher = self._xgr().BatchGrammarMatcher(self.max_threads)
            self._batch_matcher.batch_fill_next_token_bitmask([matchers[i] for i in rows], out, rows)
        return True


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices``."""
    # JSON string literals use the escapes xgrammar's EBNF strings accept (\", \\, \n, \uXXXX).
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _clean_error(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = _CPP_PREFIX.sub("", lines[0]) if lines else type(e).__name__
    return msg.strip()
