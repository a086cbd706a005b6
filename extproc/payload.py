"""What Tollgate reads from OpenAI request and response bodies (pure, no I/O).

Validation is deliberately shallow: the gateway checks what it needs to route, estimate and
bill (`model`, the endpoint's required input, `stream`, token limits), the types of a few
standard fields (a message's `role`, the sampling numbers), and leaves the rest to
the provider, like OpenAI-compatible proxies do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from extproc import config, jsonsafe
from extproc.caps import write_cap
from extproc.errors import ApiError, invalid_request

ENDPOINTS = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
    "/v1/responses": None,
}
MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# OpenAI's numeric sampling parameters: a wrong type is the client's 400 (SPEC §4), not the provider's.
NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class ParsedRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    body_bytes: int  # the body's size: it bounds the prompt tokens (caps.py)

    @property
    def wants_usage_chunk(self) -> bool:
        """Whether the client itself asked for a stream's usage chunk."""
        options = self.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True


def parse_request(path: str, raw: bytes) -> ParsedRequest | ApiError:
    """The body of a POST to one of ENDPOINTS, or the 400 that explains what is wrong."""
    try:
        body = jsonsafe.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return invalid_request(f"The request body is not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}.")
    if not isinstance(body, dict):
        return invalid_request("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        model = ""  # absent: the route header or the key's default route decides (decide.resolve_route)
    elif not isinstance(model, str) or not model:
        return invalid_request("'model' must be a non-empty string.", param="model")
    required = ENDPOINTS.get(path)
    if required is not None:
        value = body.get(required)
        if value is None:
            return invalid_request(f"Missing required parameter: '{required}'.", param=required)
        if required == "messages":
            if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
                return invalid_request("'messages' must be a non-empty array of message objects.", param="messages")
            for i, m in enumerate(value):
                if not isinstance(m.get("role"), str):
                    return invalid_request(f"'messages[{i}].role' must be a string.", param=f"messages[{i}].role")
        elif not isinstance(value, (str, list)):
            return invalid_request(f"'{required}' must be a string or an array.", param=required)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        return invalid_request("'stream' must be a boolean.", param="stream")
    if stream and path == "/v1/embeddings":
        return invalid_request("Embeddings cannot be streamed.", param="stream")
    for f in MAX_TOKEN_FIELDS:
        v = body.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            return invalid_request(f"'{f}' must be a positive integer.", param=f)
    for f in NUMBER_FIELDS:
        v = body.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return invalid_request(f"'{f}' must be a number.", param=f)
    for f in ("n", "best_of"):
        v = body.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= config.MAX_CHOICES):
            return invalid_request(f"'{f}' must be an integer from 1 to {config.MAX_CHOICES}.", param=f)
    return ParsedRequest(body, model, stream, len(raw))


def rewrite_body(parsed: ParsedRequest, path: str, upstream_model: str, output_cap: int) -> bytes:
    """The body the provider gets: its own model name, the gateway's output cap (caps.py);
    streams ask for the final usage chunk. `model` comes first, so a later attempt's model is
    a rewrite of the body's head (`envoy_config.MODEL_REWRITE_LUA`), not a re-parse."""
    body = {"model": upstream_model, **{k: v for k, v in parsed.body.items() if k != "model"}}
    write_cap(path, body, output_cap)
    if parsed.stream and path in ("/v1/chat/completions", "/v1/completions"):
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def model_head(upstream_model: str) -> str:
    """How a body from `rewrite_body` begins: `{"model":"<upstream model>"`."""
    return '{"model":' + json.dumps(upstream_model, ensure_ascii=False)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def usage_from_json(obj: Any, output_required: bool = False) -> Usage | None:
    """`usage` of a chat/completions/embeddings/responses body or stream event, if any.
    `output_required`: an answer that generates text must say how much (not embeddings)."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict) and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")  # responses API: response.completed event
    if not isinstance(usage, dict):
        return None
    return _usage(usage, output_required)


MAX_COUNT = 2**53  # json_to_metadata reads numbers as doubles: past this they are not exact


def _count(v: Any) -> int | None:
    """A token count as both parsers (Envoy's and this one) must read it: a whole number,
    not negative (a bool is no count; clamping -5 to 0 would bill below the usage)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_COUNT or v != int(v):
        return None
    return int(v)


def _usage(fields: dict[str, Any], output_required: bool) -> Usage | None:
    """The counts of a `usage` object (JSON null = absent, as json_to_metadata cannot tell
    them apart); None when unreadable, so the answer is billed from an estimate."""
    def first(*names: str) -> Any:
        return next((fields[n] for n in names if fields.get(n) is not None), None)

    prompt, completion = first("prompt_tokens", "input_tokens"), first("completion_tokens", "output_tokens")
    if prompt is None or (completion is None and output_required):
        return None
    p, c = _count(prompt), _count(0 if completion is None else completion)
    return None if p is None or c is None else Usage(p, c)


def estimated_usage(prompt_estimate: int, text_bytes: int) -> Usage:
    """Usage of a served answer that came without it: the prompt's typical size and the
    generated text at BYTES_PER_TOKEN (never 0 for a served answer)."""
    return Usage(prompt_estimate, -(-text_bytes // config.BYTES_PER_TOKEN))


def usage_from_metadata(fields: dict[str, Any], output_required: bool = False) -> Usage | None:
    """Usage that Envoy's json_to_metadata read from a JSON answer (numbers arrive as floats,
    other JSON values keep their type): read exactly as `usage_from_json` reads the body;
    None when absent or unreadable, so the caller reads the body itself."""
    return _usage(fields, output_required)
