"""What one request costs the processor (issue 12): one ext_proc message on the normal path,
one Redis round trip of its own, and settlements (from Envoy's access log) that share round
trips under load.

Counted where they happen: Envoy's own ext_proc statistics (messages it sent to the
processor: the request-side filter's and the answer processor's) and the processor's
`tollgate_redis_round_trips_total`."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request

from tests.conftest import Stack, post_raw

MESSAGES = [{"role": "user", "content": "hello"}]


def envoy_counter(stack: Stack, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.envoy.admin_port}/stats?filter=^{re.escape(name)}$", timeout=5) as r:
        text = r.read().decode()
    match = re.search(rf"^{re.escape(name)}: (\d+)$", text, re.M)
    return int(match.group(1)) if match else 0


def processor_counter(stack: Stack, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.processor.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


MESSAGES_SENT = "http.tollgate.ext_proc.stream_msgs_sent"
ANSWER_MESSAGES_SENT = "http.tollgate.ext_proc.answer.stream_msgs_sent"
ROUND_TRIPS = "tollgate_redis_round_trips_total"


def messages(stack: Stack) -> int:
    """Every message Envoy sent a processor: the request side's and the answer processor's."""
    return envoy_counter(stack, MESSAGES_SENT) + envoy_counter(stack, ANSWER_MESSAGES_SENT)


def chat(stack: Stack, secret: str, route: str = "support_draft", **extra: object) -> tuple[int, object]:
    body = json.dumps({"model": route, "messages": MESSAGES, **extra}).encode()
    return post_raw(f"{stack.base_url}/chat/completions", body, secret)


def test_a_served_request_costs_one_processor_message(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer)
    chat(stack, secret)  # the key is now cached
    before = messages(stack)
    status, _ = chat(stack, secret)
    assert status == 200
    # the request body (with the headers as attributes); Envoy prices the answer itself
    assert messages(stack) - before == 1


def test_a_refused_request_costs_one_processor_message(stack: Stack, customer: str) -> None:
    _, secret = stack.create_key(customer, plan="embeddings_only")
    before = messages(stack)
    status, _ = chat(stack, secret, route="legal_summary")
    assert status == 403
    assert messages(stack) - before == 1


def test_a_served_request_costs_at_most_two_redis_round_trips_alone(stack: Stack, customer: str) -> None:
    """Reserve, then settle: one each when nothing else is in flight (the key is cached). The
    counter is the process's: a reaper pass (every 2 s) that falls in the window adds its own
    round trip, so the fewest of three tries counts."""
    _, secret = stack.create_key(customer)
    chat(stack, secret)
    stack.settled(customer)
    counts = []
    for _ in range(3):
        before = processor_counter(stack, ROUND_TRIPS)
        assert chat(stack, secret)[0] == 200
        stack.settled(customer)
        counts.append(processor_counter(stack, ROUND_TRIPS) - before)
    assert min(counts) <= 2, counts


def test_concurrent_requests_cost_at_most_two_redis_round_trips_each(stack: Stack, customer: str) -> None:
    """40 requests at once: reserve + settle, at most, each (they share pipelines when they
    overlap in the processor; how much depends on load, see tests/test_store.py). The
    reapers' own passes may add a few."""
    from extproc.fakeprovider import Reply

    _, secret = stack.create_key(customer)
    chat(stack, secret)
    stack.fakes["p1"].default = Reply(delay_s=0.5)
    start = threading.Barrier(40)
    statuses: list[int] = []

    def one() -> None:
        start.wait()
        statuses.append(chat(stack, secret)[0])

    stack.settled(customer)
    before = processor_counter(stack, ROUND_TRIPS)
    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 40
    stack.settled(customer)
    assert processor_counter(stack, ROUND_TRIPS) - before <= 2 * 40 + 6


def test_a_json_answer_with_a_charset_is_billed_from_its_usage_in_one_message(stack: Stack, customer: str) -> None:
    """Many providers send `application/json; charset=utf-8`: Envoy still reads the usage."""
    from extproc.fakeprovider import Reply

    _, secret = stack.create_key(customer)
    chat(stack, secret)
    stack.fakes["p1"].default = Reply(completion_tokens=7, prompt_tokens=11, content_type="application/json; charset=utf-8")
    before = messages(stack)
    status, answer = chat(stack, secret)
    assert status == 200 and isinstance(answer, dict) and answer["usage"]["completion_tokens"] == 7
    assert messages(stack) - before == 1


def test_an_answer_without_usage_costs_two_answer_processor_messages_to_read_its_text(stack: Stack, customer: str) -> None:
    """No usage for Envoy to read: the answer processor gets the headers, asks for the body and
    estimates from it."""
    from extproc.fakeprovider import Reply

    _, secret = stack.create_key(customer)
    chat(stack, secret)
    stack.fakes["p1"].default = Reply(completion_tokens=4, usage=False)
    before = messages(stack)
    status, _ = chat(stack, secret)
    assert status == 200
    assert messages(stack) - before == 3


def test_an_answer_that_might_not_fit_the_buffer_keeps_its_content_type_and_is_billed_from_its_usage(
        stack: Stack, customer: str) -> None:
    """max_tokens 40,000 at up to 256 bytes a token could exceed the 8 MiB buffer: the answer is
    hidden from json_to_metadata (renamed content type, restored) and the processor reads it."""
    from extproc.fakeprovider import Reply

    _, secret = stack.create_key(customer)
    chat(stack, secret)
    stack.fakes["p1"].default = Reply(completion_tokens=9, prompt_tokens=5)
    body = json.dumps({"model": "support_draft", "messages": MESSAGES, "max_tokens": 40_000}).encode()
    req = urllib.request.Request(f"{stack.base_url}/chat/completions", data=body, method="POST",
                                 headers={"authorization": f"Bearer {secret}", "content-type": "application/json"})
    before = messages(stack)
    with urllib.request.urlopen(req, timeout=30) as r:
        headers = {k.lower(): v for k, v in r.headers.items()}
        answer = json.loads(r.read())
    assert headers["content-type"] == "application/json" and "x-tollgate-content-type" not in headers
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    # (5 x 150,000 + 9 x 600,000) / 1e6 = 6.15 -> 7 micro-USD
    assert headers["x-tollgate-cost-usd"] == "0.000007"
    assert messages(stack) - before == 3  # request body; the answer processor's headers and body


def test_a_post_without_a_body_is_refused_400_in_openai_shape_and_reaches_no_provider(stack: Stack, customer: str) -> None:
    """No body, no body message: Envoy's apply filter refuses it before any route is chosen."""
    _, secret = stack.create_key(customer)
    calls = sum(f.calls() for f in stack.fakes.values())
    req = urllib.request.Request(f"{stack.base_url}/chat/completions", data=b"", method="POST",
                                 headers={"authorization": f"Bearer {secret}", "content-type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("expected a 400")
    except urllib.error.HTTPError as exc:
        status, err = exc.code, json.loads(exc.read())
    assert status == 400 and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["code"] == "invalid_request_error" and "body" in err["error"]["message"]
    assert sum(f.calls() for f in stack.fakes.values()) == calls
