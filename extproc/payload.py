"""What Tollgate reads from OpenAI request and response bodies (pure, no I/O).

Validation is deliberately shallow: the gateway checks what it needs to route, estimate and
bill (`model`, the endpoint's required input, `stream`, token limits) and leaves the rest to
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


def usage_from_json(obj: Any) -> Usage | None:
    """`usage` of a chat/completions/embeddings/responses body or stream event, if any."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict) and isinstance(obj.get("response"), dict):
        usage = obj["response"].get("usage")  # responses API: response.completed event
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(max(0, prompt), max(0, completion))


def estimated_usage(prompt_estimate: int, text_bytes: int) -> Usage:
    """Usage of a served answer that came without it: the prompt's typical size and the
    generated text at BYTES_PER_TOKEN (never 0 for a served answer)."""
    return Usage(prompt_estimate, -(-text_bytes // config.BYTES_PER_TOKEN))


def usage_from_metadata(fields: dict[str, Any]) -> Usage | None:
    """Usage that Envoy's json_to_metadata read from a JSON answer (numbers arrive as floats):
    the same fields as `usage_from_json` reads; None when absent or not whole numbers, so
    the caller reads the body itself."""
    prompt = fields.get("prompt_tokens", fields.get("input_tokens"))
    completion = fields.get("completion_tokens", fields.get("output_tokens"))
    if prompt is None and completion is None:
        return None
    counts = []
    for v in (prompt or 0, completion or 0):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or abs(v) > 2**53:
            return None
        counts.append(max(0, int(v)))
    return Usage(counts[0], counts[1])
