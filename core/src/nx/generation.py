"""Host-side generation settings: HF's knob names, validated early with clear errors.

`GenerationOptions` is the one schema of the options `NxModel.generate` / `stream` take: each
field's type and range is declared once (a strict pydantic model: no silent coercion of ``"0.9"``
to 0.9 or of 1.5 to 1) and every violation becomes an `nx.InputError` naming the option, the value
given and what is allowed. `SamplingParams` (what the compiled programs need) is derived from it.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nx.errors import InputError

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1

#: A token id as an option value (an EOS, a pad or a stop token): a non-negative int64.
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Defaults follow Hugging Face's ``GenerationConfig``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validated(self) -> SamplingParams:
        """These settings checked by `GenerationOptions` (raises `InputError`), as plain Python values."""
        return GenerationOptions.check(**dataclasses.asdict(self)).sampling

    def seed_or_random(self) -> int:
        return self.seed if self.seed is not None else secrets.randbits(31)


def _plain(value: Any) -> Any:
    """numpy / torch scalars and arrays, and tuples, as the Python ints, floats and lists the strict
    schema checks (a prompt's EOS id often comes from a tokenizer or a tensor)."""
    if isinstance(value, (str, bytes, dict)):
        return value
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch scalars and arrays
        try:
            value = value.tolist()
        except (TypeError, ValueError, RuntimeError):
            return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class GenerationOptions(BaseModel):
    """The options of `NxModel.generate` / `stream`, each with its type and range (the field's
    description is the rule an error message quotes). Build it with `check`."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", arbitrary_types_allowed=True)

    max_new_tokens: Annotated[int, Field(ge=1, le=INT32_MAX, description="a positive int")] = 32
    min_new_tokens: Annotated[int, Field(ge=0, le=INT32_MAX, description="an int in [0, max_new_tokens]")] = 0
    do_sample: Annotated[bool, Field(description="a bool")] = False
    temperature: Annotated[
        float, Field(allow_inf_nan=False, description="a finite number (> 0 when sampling)")
    ] = 1.0
    top_k: Annotated[
        int | None, Field(ge=1, le=INT32_MAX, description="an int >= 1 (or None to disable)")
    ] = 50
    top_p: Annotated[
        float, Field(gt=0, le=1, allow_inf_nan=False, description="in (0, 1] (a number; 1 disables nucleus sampling)")
    ] = 1.0
    repetition_penalty: Annotated[
        float, Field(gt=0, allow_inf_nan=False, description="> 0 (a finite number; 1 disables it)")
    ] = 1.0
    seed: Annotated[
        int | None,
        Field(ge=-(2**63), le=INT64_MAX, description="an int in [-2**63, 2**63 - 1] (or None for a random seed)"),
    ] = None
    eos_token_id: Annotated[
        TokenId | list[TokenId] | None, Field(description="a token id (an int >= 0), a list of them, or None")
    ] = None
    pad_token_id: Annotated[TokenId | None, Field(description="a token id (an int >= 0) or None")] = None
    stop: Annotated[
        list[TokenId] | list[list[TokenId]] | None,
        Field(description="a list of token ids (one stop sequence), a list of such lists, or None"),
    ] = None
    streamer: Annotated[
        Any, Field(description="an object with put() and end() (a transformers streamer) or None")
    ] = None
    decode_steps: Annotated[
        int | None, Field(ge=1, le=INT32_MAX, description="an int >= 1 (or None for the model's decode_steps)")
    ] = None
    output_scores: Annotated[bool, Field(description="a bool")] = False
    return_dict: Annotated[bool, Field(description="a bool")] = False

    @model_validator(mode="before")
    @classmethod
    def _plain_values(cls, data: Any) -> Any:
        return {k: _plain(v) for k, v in data.items()} if isinstance(data, dict) else data

    @field_validator("streamer")
    @classmethod
    def _streamer_api(cls, value: Any) -> Any:
        if value is not None and not all(callable(getattr(value, m, None)) for m in ("put", "end")):
            raise ValueError("no put() / end()")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GenerationOptions:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be an int in [0, max_new_tokens], got {self.min_new_tokens} "
                f"with max_new_tokens={self.max_new_tokens}"
            )
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature!r}; use do_sample=False for greedy"
            )
        if self.stop and isinstance(self.stop[0], list) and not all(self.stop):
            raise ValueError("stop sequences must not be empty; drop the empty one from stop")
        return self

    @classmethod
    def check(cls, **options: Any) -> GenerationOptions:
        """`options` validated, or an `InputError` naming each bad option, its value and the rule."""
        try:
            return cls(**options)
        except ValidationError as exc:
            raise InputError(_describe(exc, options)) from None

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.do_sample, self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)

    @property
    def stops(self) -> list[tuple[int, ...]]:
        """`stop` as a list of token-id sequences (a flat list of ints is one sequence)."""
        if not self.stop:
            return []
        if isinstance(self.stop[0], int):
            return [tuple(self.stop)]
        return [tuple(s) for s in self.stop]


def _describe(exc: ValidationError, given: dict[str, Any]) -> str:
    """One clause per bad option: ``top_p must be in (0, 1] (...), got '0.9'``."""
    clauses: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        if not err["loc"]:  # a cross-field rule (`_consistent`) words its own message
            clauses.setdefault("", str(err.get("ctx", {}).get("error", err["msg"])))
            continue
        name = str(err["loc"][0])
        field = GenerationOptions.model_fields.get(name)
        if field is None:
            clauses.setdefault(name, f"{name} is not an option of generate() / stream()")
        else:
            clauses.setdefault(name, f"{name} must be {field.description}, got {_short(given.get(name))}")
    return "; ".join(clauses.values())


def _short(value: Any, limit: int = 80) -> str:
    """`value`'s repr, cut to `limit` characters (a bad option may be a whole tensor)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hits_stop(row: list[int], stops: list[tuple[int, ...]]) -> bool:
    """Whether generated tokens `row` end with any stop sequence."""
    return any(len(row) >= len(s) and tuple(row[-len(s) :]) == s for s in stops)
