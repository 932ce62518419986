"""Tokenizers: loading (Hugging Face folder or GGUF metadata), chat templates, and incremental
(streaming) detokenization that never splits a character.

* ``load_tokenizer(source)`` -> a ``transformers`` fast tokenizer (``PreTrainedTokenizerBase``).
* ``apply_chat_template(tokenizer, messages, add_generation_prompt=True) -> list[int]``.
* ``IncrementalDetokenizer(tokenizer, ...)``: ``.add(token_id) -> str`` delta per sequence.

Nothing here touches the network.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from fdpp.errors import InvalidRequestError, ModelLoadError

__all__ = [
    "load_tokenizer",
    "tokenizer_from_gguf",
    "apply_chat_template",
    "render_chat_template",
    "IncrementalDetokenizer",
    "FALLBACK_CHAT_TEMPLATE",
]

logger = logging.getLogger(__name__)

# Used (with a warning) when a tokenizer has no chat template: "role: content" lines.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def load_tokenizer(source, *, trust_remote_code: bool = False):
    """Load the tokenizer of a ``fdpp.models.hf_loader.ModelSource`` (or a path / ``None``, which
    are resolved with ``resolve_model``).

    * HF folder: ``transformers.AutoTokenizer.from_pretrained(folder)`` (local files only).
    * GGUF with a byte-level BPE vocabulary (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Llama 3,
      Qwen2, ...): built with ``tokenizers`` from the vocabulary and merges of the already-open file.
      Other vocabularies: transformers' GGUF conversion (``from_pretrained(dir, gguf_file=name)``).
      The GGUF ``tokenizer.chat_template`` is set on the tokenizer either way.

    Raises ``ModelLoadError`` naming the folder/file when no tokenizer can be built.
    """
    from fdpp.models.hf_loader import ModelSource, resolve_model

    if not isinstance(source, ModelSource):
        path = os.path.expanduser(os.fspath(source)) if source is not None else None
        if path is not None and os.path.isdir(path) and any(
                os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
            source = ModelSource("hf", os.path.abspath(path))  # a tokenizer folder needs no config.json
        else:
            source = resolve_model(source)
    if source.kind == "gguf":
        return tokenizer_from_gguf(source.gguf_file)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(
            f"cannot load a tokenizer from {source.path!r} ({type(e).__name__}: {e}); the folder needs the "
            "model's tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json): copy them "
            "from the model's repository"
        ) from e
    return tok


def tokenizer_from_gguf(gguf_file: str):
    """Build a fast tokenizer from a GGUF file's ``tokenizer.*`` metadata (see ``load_tokenizer``)."""
    from fdpp.models.gguf_loader import open_gguf, read_gguf_metadata

    gguf_file = os.path.abspath(os.fspath(gguf_file))
    reader = open_gguf(gguf_file)  # clear errors for missing / corrupt files first
    meta = read_gguf_metadata(reader)
    if "tokenizer.ggml.model" not in meta:
        raise ModelLoadError(
            f"GGUF file {gguf_file!r} carries no tokenizer (no tokenizer.ggml.* metadata); use a GGUF "
            "converted with its tokenizer, or a Hugging Face folder"
        )
    if meta.get("tokenizer.ggml.model") == "gpt2":
        # NOTE: byte-level BPE is built from the reader already open (the model's weights come from it
        # too): transformers' GGUF path would parse the whole file a second time (seconds for a large
        # vocabulary) to produce the same tokenizer (tests/test_tokenizer.py compares the two).
        tok = _bpe_tokenizer_from_gguf(reader, meta, gguf_file)
    else:
        tok = _transformers_gguf_tokenizer(gguf_file)
    template = meta.get("tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


def _transformers_gguf_tokenizer(gguf_file: str):
    """transformers' GGUF tokenizer conversion (SentencePiece-style and other non-BPE vocabularies)."""
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(
                os.path.dirname(gguf_file), gguf_file=os.path.basename(gguf_file), local_files_only=True
            )
    except Exception as e:  # unsupported tokenizer type in transformers, old version, ...
        raise ModelLoadError(
            f"transformers could not build the tokenizer of GGUF file {gguf_file!r} ({type(e).__name__}: {e}); "
            "upgrade transformers or use a Hugging Face folder"
        ) from e


def _bpe_tokenizer_from_gguf(reader, meta: dict[str, Any], gguf_file: str):
    """Fallback: a byte-level BPE (``tokenizer.ggml.model == "gpt2"``) tokenizer from the GGUF
    tokens, merges and token types, wrapped in ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fdpp.models.gguf_loader import read_gguf_metadata

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"GGUF file {gguf_file!r} has a {kind!r} tokenizer; fdpp's own builder handles byte-level BPE "
            "('gpt2') only"
        )
    full = read_gguf_metadata(reader, include_vocab=True)
    tokens: list[str] = full["tokenizer.ggml.tokens"]
    merges: list[str] = full.get("tokenizer.ggml.merges") or []
    types: list[int] = full.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, ty in enumerate(types) if ty == 3])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, ty in enumerate(types) if ty == 4])

    def tok_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=tok_of("bos_token_id"),
        eos_token=tok_of("eos_token_id"),
        unk_token=tok_of("unknown_token_id"),
        pad_token=tok_of("padding_token_id"),
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------
# Chat templates


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("a conversation must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidRequestError(
                f"message {i} of the conversation is {m!r}; each message must be a dict with 'role' and 'content'"
            )
    return list(messages)


def render_chat_template(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                         **kwargs) -> str:
    """The prompt text of a conversation, through the tokenizer's chat template.

    Without a chat template, falls back (with a warning) to ``FALLBACK_CHAT_TEMPLATE`` ("role:
    content" lines). A template that rejects the conversation raises ``InvalidRequestError``.
    """
    messages = _check_messages(messages)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        warnings.warn(
            "the tokenizer has no chat template; using a plain 'role: content' format, which the model "
            "was probably not trained on (use a model/tokenizer with a chat template for good answers)",
            stacklevel=2,
        )
        template = FALLBACK_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as e:  # jinja2 TemplateError raised by the template itself, e.g. role order
        raise InvalidRequestError(f"the model's chat template rejected the conversation: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):  # some versions return a list for batched input
        text = text[0]
    return text


def apply_chat_template(tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                        **kwargs) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template (see
    ``render_chat_template``). The template supplies the special tokens (BOS, role markers), so
    the text is encoded with ``add_special_tokens=False``, as vLLM does."""
    text = render_chat_template(tokenizer, messages, add_generation_prompt, **kwargs)
    return list(tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------
# Incremental detokenization

_REPLACEMENT = "\ufffd"
# A UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens; past this many pending
# tokens a trailing U+FFFD is a real one (invalid bytes from the model) and is emitted.
_MAX_PENDING = 6
# Tokens of context decoded before the new ones so that word-initial spaces come out right.
_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas, vLLM-style.

    ``add(token_id)`` returns the new text (possibly ``""``). A delta never ends in a partial
    UTF-8 character: text whose decoding ends in U+FFFD is held back until the following tokens
    complete it. ``flush()`` returns whatever is held back (call it when the sequence finishes).
    The concatenation of all deltas plus ``flush()`` equals
    ``tokenizer.decode(generated_ids, skip_special_tokens=...)`` for byte-level BPE tokenizers
    (and in practice for SentencePiece ones).

    Cost per token: two ``decode`` calls over a window of a few tokens (``prefix_offset`` ..
    end), independent of the sequence length. ``prompt_token_ids`` (optional) only provide the
    initial context (e.g. a leading space after the prompt); they are never emitted.
    """

    def __init__(self, tokenizer, prompt_token_ids: Iterable[int] | None = None, *,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        ctx = list(prompt_token_ids or [])[-_CONTEXT:]
        self._ids: list[int] = ctx
        self.prefix_offset = 0  # start of the decode window (context)
        self.read_offset = len(ctx)  # text of ids[:read_offset] has been emitted
        self.text = ""  # all text emitted so far

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def add(self, token_id: int) -> str:
        """Append one generated token; return the newly completed text."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self._ids[self.prefix_offset:])
        pending = len(self._ids) - self.read_offset
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and pending < _MAX_PENDING):
            return ""  # nothing new yet (special token skipped, or an incomplete character)
        if not new_text.startswith(prefix_text):
            # Should not happen for well-behaved tokenizers; fall back to the longest common prefix.
            n = 0
            while n < min(len(prefix_text), len(new_text)) and prefix_text[n] == new_text[n]:
                n += 1
            delta = new_text[n:]
        else:
            delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        self._trim()
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit text still held back (e.g. a trailing invalid byte sequence) at the end of a sequence."""
        if self.read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self._ids[self.prefix_offset:])
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        self._trim()
        self.text += delta
        return delta

    def _trim(self) -> None:
        # keep only the window (context + pending) so memory does not grow with the sequence
        if self.prefix_offset > 0:
            drop = self.prefix_offset
            del self._ids[:drop]
            self.prefix_offset -= drop
            self.read_offset -= drop
