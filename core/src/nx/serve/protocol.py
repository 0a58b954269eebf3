"""OpenAI request bodies (pydantic) and the error type the HTTP layer turns into 4xx answers.

Bodies are validated strictly from the JSON text (``model_validate_json(..., strict=True)``):
no string-to-number coercion, unknown top-level fields rejected, so a client's typo is an
answer it can read rather than a silently ignored option.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An OpenAI-style error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields completions and chat share: OpenAI's, plus vLLM's extensions top_k, min_tokens,
    repetition_penalty and ignore_eos. Fields nx cannot honour are accepted only at their
    neutral value (see `unsupported`)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = 1
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False

    def unsupported(self) -> None:
        """Raise `ApiError` 400 for options this server does not implement (rather than ignore)."""
        if self.n not in (None, 1):
            raise ApiError(400, f"n={self.n} is not supported: nx serve returns one choice per request (n=1)", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ApiError(
                    400, f"{name} is not supported by nx serve (only 0); use repetition_penalty instead", name
                )
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by nx serve", "logit_bias")
        if self.top_k is not None and self.top_k < -1:
            raise ApiError(400, f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}", "top_k")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if any(not s for s in stops):
                raise ApiError(400, "stop sequences must be non-empty strings", "stop")
            if len(stops) > 16:
                raise ApiError(400, f"at most 16 stop sequences are supported, got {len(stops)}", "stop")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def engine_options(self) -> dict[str, Any]:
        """The keyword options of `nx.Engine.submit` (max_new_tokens aside)."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": None if self.top_k in (None, 0, -1) else self.top_k,
            "min_new_tokens": self.min_tokens,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: `prompt` is a string, a list of one string, or a list of token ids."""

    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs is not None:
            raise ApiError(400, "logprobs is not supported by nx serve", "logprobs")
        if self.echo:
            raise ApiError(400, "echo is not supported by nx serve", "echo")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported by nx serve (only 1)", "best_of")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by nx serve", "suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ApiError(
                400, f"a batch of {len(self.prompt)} prompts is not supported: send one prompt per request", "prompt"
            )


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message; fields other than role/content (name, tool_call_id, ...) are passed to
    the chat template as they are."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def for_template(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            out["content"] = "".join(p.text for p in self.content)
        return out


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs or self.top_logprobs is not None:
            raise ApiError(400, "logprobs is not supported by nx serve", "logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tools and tool_choice are not supported by nx serve", "tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, "response_format other than {'type': 'text'} is not supported by nx serve",
                           "response_format")


_PARAM_HINTS = {
    "prompt": "prompt must be a string, a list of one string or a list of token ids",
    "stop": "stop must be a string or a list of strings",
}


def parse(model: type[_Strict], body: bytes) -> Any:
    """Validate a JSON body into `model`, or raise `ApiError` 400 naming the offending field."""
    try:
        return model.model_validate_json(body or b"", strict=True)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        kind, loc = err["type"], err["loc"]
        if kind == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON ({err['msg']})", None, "invalid_json") from None
        if not loc:
            raise ApiError(400, f"the request body must be a JSON object ({err['msg']})") from None
        param = str(loc[0])
        if kind == "extra_forbidden":
            if len(loc) == 1:
                msg = f"unknown field {param!r}: nx serve does not recognize it (see README for the supported fields)"
            else:
                msg = f"unknown field {'.'.join(map(str, loc))!r}"
            raise ApiError(400, msg, param, "unknown_field") from None
        if kind == "missing":
            raise ApiError(400, f"{'.'.join(map(str, loc))} is required", param, "missing_field") from None
        where = ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int"))))
        msg = _PARAM_HINTS.get(param) if kind.endswith("_type") and len(exc.errors()) > 1 else None
        raise ApiError(400, msg or f"{where}: {err['msg']}", param, "invalid_value") from None
