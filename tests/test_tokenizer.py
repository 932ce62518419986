"""Tokenizers: the SmolLM2 GGUF tokenizer, chat templates, incremental detokenization."""
from __future__ import annotations

import json
import warnings

import pytest

from fdpp.errors import InvalidRequestError, ModelLoadError
from fdpp.models.default_model import default_model_path
from fdpp.models.gguf_loader import open_gguf, read_gguf_metadata
from fdpp.models.hf_loader import resolve_model
from fdpp.tokenizer import (
    IncrementalDetokenizer,
    _bpe_tokenizer_from_gguf,
    _transformers_gguf_tokenizer,
    apply_chat_template,
    load_tokenizer,
    render_chat_template,
)

TEXTS = [
    "Hello world! The capital of France is Paris.",
    "Emoji: 😀👍🏽🇫🇷👨‍👩‍👧 and CJK: 日本語のテキスト、中文字符，한국어.",
    "  leading spaces, tabs\tand\nnewlines\n\n  x = f(3.14159) // ünïcödé ✓ €",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tok(gguf_path):
    return load_tokenizer(resolve_model(gguf_path))


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    """transformers' own GGUF conversion: the yardstick for fdpp's single-parse builder."""
    return _transformers_gguf_tokenizer(gguf_path)


def test_gguf_tokenizer_round_trip(tok):
    assert len(tok) == 49152
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_gguf_tokenizer_matches_transformers_conversion(tok, hf_tok):
    """fdpp builds the GGUF's BPE tokenizer from the open file; transformers re-parses the file for
    the same result: encodings, decodings (with and without special tokens) and special tokens agree."""
    import random

    for text in TEXTS + ["<|endoftext|>hi <|im_end|> ", "a" * 50]:
        for special in (False, True):
            assert tok.encode(text, add_special_tokens=special) == hf_tok.encode(text, add_special_tokens=special)
        assert tok.decode(hf_tok.encode(text, add_special_tokens=False)) == text
    rng = random.Random(0)
    for _ in range(50):
        ids = rng.sample(range(len(hf_tok)), 20)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_ids"):
        assert getattr(tok, attr) == getattr(hf_tok, attr), attr
    assert tok.added_tokens_decoder == hf_tok.added_tokens_decoder
    assert tok.chat_template == hf_tok.chat_template


def test_chat_template_smollm2_format(tok, gguf_path):
    assert tok.chat_template == read_gguf_metadata(gguf_path)["tokenizer.chat_template"]
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = apply_chat_template(tok, msgs)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids) and ids[0] == 1
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat_template(tok, msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_template_fallback_and_bad_messages(tok, gguf_path):
    reader = open_gguf(gguf_path)
    no_template_tok = _bpe_tokenizer_from_gguf(reader, read_gguf_metadata(reader), gguf_path)
    assert not no_template_tok.chat_template
    with pytest.warns(UserWarning, match="no chat template"):
        text = render_chat_template(no_template_tok, [{"role": "user", "content": "hi"}])
    assert text == "user: hi\nassistant: "
    for bad in ([], "hello", [{"content": "no role"}], [("user", "hi")]):
        with pytest.raises(InvalidRequestError):
            apply_chat_template(tok, bad)


def _stream(tok, ids, **kw):
    d = IncrementalDetokenizer(tok, **kw)
    deltas = [d.add(i) for i in ids]
    deltas.append(d.flush())
    assert "".join(deltas) == d.text
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_multibyte(tok, skip):
    ids = [1]
    for text in TEXTS[:3]:
        ids += tok.encode(text, add_special_tokens=False) + [2, 198]
    deltas = _stream(tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)
    # multi-token characters were held back: some tokens produced no text
    assert deltas.count("") > 0


def _byte_level_chars() -> dict[int, str]:
    """GPT-2 byte-level BPE's byte -> printable character map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def test_incremental_detokenizer_holds_partial_utf8(tok):
    b2u = _byte_level_chars()
    text = "a😀b日"
    byte_ids = [tok.convert_tokens_to_ids(b2u[b]) for b in text.encode("utf-8")]  # one token per byte
    deltas = _stream(tok, byte_ids)
    assert deltas == ["a", "", "", "", "😀", "b", "", "", "日", ""]
    # an incomplete character at the very end is only released by flush(), as U+FFFD
    deltas = _stream(tok, byte_ids[:3])
    assert deltas[:3] == ["a", "", ""] and deltas[-1] == "\ufffd"
    assert "".join(deltas) == tok.decode(byte_ids[:3])


def test_incremental_detokenizer_with_prompt_context(tok):
    prompt = tok.encode("The answer is", add_special_tokens=False)
    out = tok.encode(" forty-two 🙂 — 四十二.", add_special_tokens=False)
    deltas = _stream(tok, out, prompt_token_ids=prompt)
    assert "".join(deltas) == tok.decode(out)
    assert not any("\ufffd" in d for d in deltas)


def test_hf_folder_tokenizer(tok, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(resolve_model(tmp_path))
    tok.save_pretrained(tmp_path)
    hf_tok = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_chat_template(hf_tok, [{"role": "user", "content": "Hi"}]) == apply_chat_template(
            tok, [{"role": "user", "content": "Hi"}]
        )
