"""The money cap (SPEC §1.4): the most one request can cost, fixed before the upstream call.

A reservation only protects money if the provider cannot produce more than it. So the gateway
bounds both sides of the bill and makes the provider keep to them:

- **Output** is bounded by the cap field the endpoint's provider honours (chat:
  `max_completion_tokens`, else `max_tokens`; completions: `max_tokens`; responses:
  `max_output_tokens`), times the number of choices generated (`n`, `best_of`). The gateway
  writes its cap into that field of the forwarded body (and lowers any other cap field the
  client sent), so what the client asked for never decides what it may spend.
- **Input** is bounded by the UTF-8 bytes of the whole body: byte-level BPE never makes more
  tokens than bytes, and a JSON body is never shorter than the text it carries, so the body's
  length bounds the prompt whatever field carries it (messages, prompt lists, input,
  instructions, tools, schemas). Images and files referenced by URL or id get a per-part
  ceiling; a model's `context_window` caps the total.

`reserve.lua` then fits the output cap to the money left (`CostBound`), atomically.
Everything here is pure: request facts and policy in, numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc import config
from extproc.policy.model import Model

# The cap field each endpoint's provider honours, in order of precedence; the first is the one
# written when the client sent none. Embeddings produce no output tokens.
CAP_FIELDS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/embeddings": (),
}
ALL_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
# Tool types whose inputs are the client's own JSON; any other (web search, file search, code
# interpreter, ...) runs at the provider and adds prompt tokens the body does not carry.
CLIENT_TOOL_TYPES = frozenset({"function", "custom"})
FILE_PART_TYPES = frozenset({"file", "input_file"})


@dataclass(frozen=True)
class CostBound:
    """What `reserve.lua` needs to fit a request to the money left.

    The reservation for an output cap of `c` tokens per choice is
    ceil((input_tokens * input_price + c * choices * output_price) / 1e6) micro-USD."""

    input_tokens: int  # a true upper bound of the prompt tokens any candidate can bill
    rate_tokens: int  # a typical prompt estimate, for tokens-per-minute limits only
    output_tokens: int  # the output cap per choice the request may have (before money)
    min_output_tokens: int  # below this cap the request is refused rather than cut
    choices: int  # n / best_of: how many completions the provider generates
    input_price: int  # micro-USD per million tokens, the dearest candidate's
    output_price: int

    def cost_micro(self, output_tokens: int) -> int:
        """The reservation for an output cap (the same rounding as `Price.cost_micro`)."""
        nano = self.input_tokens * self.input_price + output_tokens * self.choices * self.output_price
        return -(-nano // 1_000_000)


def requested_output(path: str, body: dict[str, Any]) -> int | None:
    """The output cap the client asked for, read from the field the provider honours."""
    for f in CAP_FIELDS.get(path, ()):
        v = body.get(f)
        if v is not None:
            return int(v)
    return None


def choices_of(path: str, body: dict[str, Any]) -> int:
    """How many completions the provider generates (and bills): max(n, best_of), for each
    prompt of a completions request whose `prompt` is a list of prompts (strings or token
    lists; a flat list of token ids is one prompt)."""
    n = body.get("n")
    best_of = body.get("best_of")
    per_prompt = max(n if isinstance(n, int) else 1, best_of if isinstance(best_of, int) else 1)
    prompt = body.get("prompt")
    if path == "/v1/completions" and isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return per_prompt * len(prompt)
    return per_prompt


def media_parts(body: dict[str, Any]) -> tuple[int, int]:
    """(image parts, file parts) in the body's messages or input, wherever they nest."""
    images = files = 0
    stack: list[Any] = [body.get("messages"), body.get("input"), body.get("prompt")]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            kind = item.get("type")
            if kind in IMAGE_PART_TYPES:
                images += 1
            elif kind in FILE_PART_TYPES:
                files += 1
            content = item.get("content")
            if isinstance(content, list):
                stack.append(content)
    return images, files


def unseen_context(body: dict[str, Any]) -> bool:
    """Whether the provider adds prompt tokens the body does not carry: an earlier response or
    conversation (Responses API), a stored prompt, or tools the provider runs itself."""
    if body.get("previous_response_id") or body.get("conversation") or isinstance(body.get("prompt"), dict):
        return True
    if body.get("web_search_options") is not None:
        return True
    tools = body.get("tools")
    return isinstance(tools, list) and any(isinstance(t, dict) and t.get("type", "function") not in CLIENT_TOOL_TYPES for t in tools)


def input_bound(body_bytes: int, images: int, files: int, candidates: list[Model], unseen: bool = False) -> int:
    """Prompt tokens no candidate can exceed: the body's bytes plus a ceiling per media part
    (and a whole context of tokens when the provider adds context the body does not carry),
    capped by each candidate's context window where the policy gives one."""
    bound = 0
    for m in candidates:
        own = body_bytes + images * m.image_part_tokens + files * m.file_part_tokens
        if unseen:
            own += m.context_window or config.UNSEEN_CONTEXT_TOKENS
        if m.context_window is not None:
            own = min(own, m.context_window)
        bound = max(bound, own)
    return bound


def cost_bound(path: str, body: dict[str, Any], body_bytes: int, default_output: int, candidates: list[Model]) -> CostBound:
    """The bound of one request on a route whose attempts may end on any of `candidates`."""
    images, files = media_parts(body)
    limits = [m.max_output_tokens for m in candidates if m.max_output_tokens is not None]
    if path == "/v1/embeddings":
        wanted = 0
    else:
        wanted = requested_output(path, body) or default_output
        wanted = min([wanted, config.MAX_OUTPUT_TOKENS, *limits])
    return CostBound(
        input_tokens=input_bound(body_bytes, images, files, candidates, unseen_context(body)),
        rate_tokens=-(-body_bytes // config.BYTES_PER_TOKEN),
        output_tokens=wanted,
        min_output_tokens=min(wanted, config.MIN_USEFUL_OUTPUT_TOKENS),
        choices=choices_of(path, body),
        input_price=max(m.price.input_micro_per_mtok for m in candidates),
        output_price=max(m.price.output_micro_per_mtok for m in candidates),
    )


def write_cap(path: str, body: dict[str, Any], cap: int) -> None:
    """Make the forwarded body keep to `cap` output tokens per choice: the honoured field gets
    the cap; any other cap field the client sent is lowered to it (whatever a provider reads,
    it reads no more than the cap)."""
    fields = CAP_FIELDS.get(path, ())
    if not fields:
        return
    honoured = next((f for f in fields if body.get(f) is not None), fields[0])
    body[honoured] = cap
    for f in ALL_CAP_FIELDS:
        v = body.get(f)
        if f != honoured and isinstance(v, int) and v > cap:
            body[f] = cap


def answer_bytes_bound(path: str, body: dict[str, Any], output_cap: int, choices: int, body_bytes: int) -> int:
    """At most how many bytes a non-stream answer to this request can be (a deliberately
    generous bound, see config): whether Envoy may buffer it whole."""
    if path == "/v1/embeddings":
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
        return config.ANSWER_OVERHEAD_BYTES + count * config.ANSWER_BYTES_PER_EMBEDDING
    logprobs = bool(body.get("logprobs")) or bool(body.get("top_logprobs")) or "logprobs" in str(body.get("include", ""))
    per_token = config.ANSWER_BYTES_PER_TOKEN_WITH_LOGPROBS if logprobs else config.ANSWER_BYTES_PER_TOKEN
    echoed = 6 * body_bytes if body.get("echo") else 0  # completions can echo the prompt, JSON-escaped
    return config.ANSWER_OVERHEAD_BYTES + echoed + output_cap * choices * per_token
