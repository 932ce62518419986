"""The small endpoints: /health, /ping, /version, /v1/models, /tokenize, /detokenize."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fdpp.server.chat import render_chat_prompt
from fdpp.server.errors import APIError, bad_request, error_response
from fdpp.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from fdpp.server.state import state_of
from fdpp.server.validation import check_ids, check_model, check_text, encode, parse_body

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    aeng = state_of(request).async_engine
    if aeng.is_running:
        return JSONResponse({"status": "ok"})
    return error_response(503, aeng._dead_reason(), code="engine_unavailable", type="service_unavailable")


@router.get("/ping")
async def ping(request: Request) -> Response:
    return await health(request)


@router.get("/version")
async def version() -> JSONResponse:
    from fdpp import __version__

    return JSONResponse({"version": __version__})


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    st = state_of(request)
    cards = [ModelCard(id=n, root=st.root, max_model_len=st.max_model_len) for n in st.served_model_names]
    return JSONResponse(ModelList(data=cards).model_dump())


@router.get("/v1/models/{model_id:path}")
async def model_card(request: Request, model_id: str) -> JSONResponse:
    st = state_of(request)
    if model_id not in st.served_model_names:
        raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return JSONResponse(ModelCard(id=model_id, root=st.root, max_model_len=st.max_model_len).model_dump())


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    st = state_of(request)
    req: TokenizeRequest = await parse_body(request, TokenizeRequest)
    check_model(st, req.model)
    if st.tokenizer is None:
        raise bad_request("this model has no tokenizer", code="no_tokenizer")
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        ids = render_chat_prompt(st, req.messages, req.add_generation_prompt is not False)
    else:
        check_text(req.prompt, "prompt")
        if req.add_special_tokens is False:
            ids = list(st.tokenizer.encode(req.prompt, add_special_tokens=False))
        else:
            ids = await encode(st, req.prompt)
    return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=st.max_model_len, tokens=ids).model_dump())


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    st = state_of(request)
    req: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
    check_model(st, req.model)
    if st.tokenizer is None:
        raise bad_request("this model has no tokenizer", code="no_tokenizer")
    check_ids(st, req.tokens, "tokens")
    return JSONResponse(DetokenizeResponse(prompt=st.tokenizer.decode(req.tokens)).model_dump())
