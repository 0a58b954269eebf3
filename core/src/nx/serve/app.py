"""The ASGI app of ``nx serve``: OpenAI's completions, chat, models and error format over an
`nx.Engine`, plus ``/health`` and Prometheus ``/metrics``.

`create_app` only builds the app (nothing starts until an ASGI server runs its lifespan), so the
app can be imported and served by any ASGI server. It uses nothing of the engine but its public
interface: ``submit``, ``start``, ``shutdown``, ``stats``, ``model`` and the returned requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nx.engine import EngineClosedError, QueueFullError
from nx.errors import BucketError, InputError, NxError
from nx.serve.metrics import CONTENT_TYPE, Metrics
from nx.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse
from nx.serve.text import Detokenizer, StopMatcher
from nx.version import __version__

logger = logging.getLogger("nx.serve")


def create_app(engine: Any, model_name: str, *, shutdown_timeout: float | None = 30.0) -> FastAPI:
    """An OpenAI-compatible app serving `engine` under the model id `model_name`.

    Its lifespan starts the engine and, at shutdown (uvicorn's graceful SIGTERM), drains it:
    ``engine.shutdown(drain=True, timeout=shutdown_timeout)``.
    """
    state: dict[str, Any] = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            logger.info("shutting down: draining the engine")
            await asyncio.to_thread(engine.shutdown, drain=True, timeout=shutdown_timeout)
            logger.info("engine stopped")

    app = FastAPI(title="nx serve", version=_nx_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    metrics = Metrics(engine)
    model = engine.model
    tokenizer = model.tokenizer
    max_positions = model.config.max_positions
    vocab = model.spec.vocab_size
    created = int(time.time())
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, model_name

    # ---- errors ------------------------------------------------------------------------------
    def error_response(err: ApiError) -> JSONResponse:
        metrics.rejected.labels(str(err.status)).inc()
        logger.info("rejected %d %s: %s", err.status, err.code or err.type, err.message)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, "the request is malformed", None, "invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", None, code))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:  # a bug: logged, no traceback sent
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "internal server error (see the server log)", None, None, "server_error"))

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(
                404, f"The model {name!r} does not exist: this server serves {model_name!r}", "model", "model_not_found"
            )

    def fit(prompt_ids: list[int], max_tokens: int | None, param: str, name: str = "max_tokens") -> int:
        """`max_tokens`, or everything left when None; 400 when the request cannot fit."""
        if len(prompt_ids) >= max_positions:
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens long, but this model serves at most {max_positions} positions "
                "(prompt plus completion); shorten the prompt",
                param,
                "context_length_exceeded",
            )
        if max_tokens is None:
            return max_positions - len(prompt_ids)
        if len(prompt_ids) + max_tokens > max_positions:
            raise ApiError(
                400,
                f"{name}={max_tokens} plus the prompt's {len(prompt_ids)} tokens is more than the "
                f"{max_positions} positions this model serves; lower {name} to at most "
                f"{max_positions - len(prompt_ids)}",
                name,
                "context_length_exceeded",
            )
        return max_tokens

    def submit(endpoint: str, prompt_ids: list[int], max_tokens: int, body: Any) -> _Generation:
        options = body.engine_options()
        try:
            req = engine.submit(prompt_ids, max_new_tokens=max_tokens, **options)
        except QueueFullError as exc:
            retry = max(1, math.ceil(getattr(exc, "retry_after", 1.0) or 1.0))
            raise ApiError(
                429, f"the server is busy: {exc}", None, "rate_limit_exceeded", "rate_limit_error",
                {"Retry-After": str(retry)},
            ) from None
        except EngineClosedError as exc:
            raise ApiError(503, f"the server is shutting down: {exc}", None, None, "server_error") from None
        except BucketError as exc:
            raise ApiError(400, str(exc), "max_tokens", "context_length_exceeded") from None
        except InputError as exc:
            raise ApiError(400, str(exc), None, "invalid_value") from None
        return _Generation(endpoint, req, tokenizer, body.stop_strings(), metrics)

    # ---- routes ------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not state["ready"]:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nx", "max_model_len": max_positions}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = parse(CompletionRequest, await request.body())
        check_model(body.model)
        body.unsupported()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = list(tokenizer(prompt)["input_ids"]) if prompt else []
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt",
                               "invalid_value")
        if not ids:
            raise ApiError(400, "the prompt is empty; give at least one token", "prompt", "invalid_value")
        gen = submit("completions", ids, fit(ids, body.max_tokens, "prompt"), body)
        rid, model_id = f"cmpl-{uuid.uuid4().hex}", model_name
        gen.id = rid

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            out = {
                "id": rid, "object": "text_completion", "created": gen.created, "model": model_id,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }
            if body.include_usage:
                out["usage"] = None
            return out

        if body.stream:
            async def events() -> AsyncIterator[str]:
                async for piece in gen.pieces():
                    yield _sse(chunk(piece, None))
                yield _sse(chunk("", gen.finish_reason))
                if body.include_usage:
                    yield _sse({**chunk("", None), "choices": [], "usage": gen.usage()})

            return _stream(gen, events())
        text = await gen.collect(request)
        out = chunk(text, gen.finish_reason)
        out["usage"] = gen.usage()
        return JSONResponse(out)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body: ChatCompletionRequest = parse(ChatCompletionRequest, await request.body())
        check_model(body.model)
        body.unsupported()
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages",
                           "invalid_value")
        messages = [m.for_template() for m in body.messages]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            ids = list(ids["input_ids"])
        except Exception as exc:  # noqa: BLE001 - jinja raises what the template says (e.g. roles must alternate)
            raise ApiError(400, f"the chat template rejected the messages: {exc}", "messages", "invalid_value") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        n = fit(ids, max_tokens, "messages", param)
        gen = submit("chat", ids, n, body)
        rid, model_id = f"chatcmpl-{uuid.uuid4().hex}", model_name
        gen.id = rid

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            out = {
                "id": rid, "object": "chat.completion.chunk", "created": gen.created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if body.include_usage:
                out["usage"] = None
            return out

        if body.stream:
            async def events() -> AsyncIterator[str]:
                yield _sse(chunk({"role": "assistant", "content": ""}, None))
                async for piece in gen.pieces():
                    yield _sse(chunk({"content": piece}, None))
                yield _sse(chunk({}, gen.finish_reason))
                if body.include_usage:
                    yield _sse({**chunk({}, None), "choices": [], "usage": gen.usage()})

            return _stream(gen, events())
        text = await gen.collect(request)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": gen.created, "model": model_id,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": gen.finish_reason,
            }],
            "usage": gen.usage(),
        })

    return app


class _Generation:
    """One engine request seen as text: pieces as they complete, the finish reason, usage, and
    the request's log line and metrics when it ends (however it ends)."""

    def __init__(self, endpoint: str, req: Any, tokenizer: Any, stops: list[str], metrics: Metrics) -> None:
        self.endpoint, self.req, self.tokenizer, self.stops, self.metrics = endpoint, req, tokenizer, stops, metrics
        self.id = req.id
        self.t0 = time.perf_counter()
        self.created = int(time.time())
        self.finish_reason: str | None = None
        self.closed = False

    async def pieces(self) -> AsyncIterator[str]:
        """The completion's text, piece by piece; a text stop sequence cancels the engine request."""
        dec, stop = Detokenizer(self.tokenizer), StopMatcher(self.stops)
        last = None
        async for token in self.req:
            now = time.perf_counter()
            if last is None:
                self.metrics.ttft.observe(now - self.t0)
            else:
                self.metrics.itl.observe(now - last)
            last = now
            out, hit = stop.feed(dec.push(token))
            if out:
                yield out
            if hit:
                self.req.cancel()
                self.finish_reason = "stop"
                return
        out, hit = stop.feed(dec.flush())
        if not hit:
            out += stop.flush()
        if out:
            yield out
        if self.req.finish_reason == "error":
            raise ApiError(500, f"generation failed: {self.req.error}", None, None, "server_error")
        self.finish_reason = "stop" if hit else self.req.finish_reason

    async def collect(self, request: Request) -> str:
        """All the text (non-streaming answers); a client that disconnects first cancels the request."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.req.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return "".join([p async for p in self.pieces()])
        finally:
            watcher.cancel()
            self.close()

    def usage(self) -> dict[str, int]:
        p, c = self.req.prompt_tokens, len(self.req.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def close(self) -> None:
        """Cancel the engine request if it still runs (client gone), then log and count it once."""
        if self.closed:
            return
        self.closed = True
        if not self.req.done:
            self.req.cancel()
        if self.finish_reason is None:
            self.finish_reason = self.req.finish_reason or "cancelled"
        duration = time.perf_counter() - self.t0
        self.metrics.requests.labels(self.endpoint, self.finish_reason).inc()
        self.metrics.duration.observe(duration)
        self.metrics.prompt_tokens.inc(self.req.prompt_tokens)
        logger.info(
            "%s %s prompt_tokens=%d completion_tokens=%d duration=%.3fs finish_reason=%s",
            self.id, self.endpoint, self.req.prompt_tokens, len(self.req.tokens), duration, self.finish_reason,
        )


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _stream(gen: _Generation, events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events ending in ``data: [DONE]``. A client that disconnects cancels the
    stream's task (or its next write fails); either way `gen.close()` cancels the engine request."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except ApiError as exc:  # the engine failed after the 200 went out: say so in the stream
            yield _sse(exc.body())
        except NxError as exc:
            yield _sse(ApiError(500, str(exc), None, None, "server_error").body())
        finally:
            gen.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _nx_version() -> str:
    return __version__
