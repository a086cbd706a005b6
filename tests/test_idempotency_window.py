"""The idempotency window bounds what a served request leaves in Redis: its request-id marker
(`tollgate:{c:C}:req:<id>`) and its explain index (`{tollgate:usage}:request:<id>`) expire after
`settings.idempotency_window_s` (default 24 h), set by policy or `tollgate serve --idempotency-window`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from extproc.cli import build_parser
from extproc.policy import PolicyError, load_policy
from extproc.server import IDEMPOTENCY_ENV, idempotency_window
from tests.conftest import Stack, running_stack

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
DAY_S = 86400


def _policy_with(policy_dir: Path, settings: object) -> Path:
    """A copy of the test policy with a `settings:` file added."""
    d = Path(tempfile.mkdtemp(prefix="tollgate-test-window-"))
    for f in policy_dir.iterdir():
        shutil.copy(f, d / f.name)
    (d / "05-settings.yaml").write_text(yaml.safe_dump({"settings": settings}))
    return d


def _serve_one(stack: Stack, customer: str) -> tuple[str, str, int, int]:
    """One served request; returns its id, the key's secret and the TTLs (s) of its marker and
    explain index."""
    _, secret = stack.create_key(customer, plan="premium")
    raw = stack.client(secret).chat.completions.with_raw_response.create(model="support_draft", messages=MESSAGES)
    assert raw.http_response.status_code == 200
    request_id = raw.headers["x-request-id"]
    stack.settled(customer)
    r = stack.redis_sync()
    return request_id, secret, r.ttl(f"tollgate:{{c:{customer}}}:req:{request_id}"), r.ttl(f"{{tollgate:usage}}:requests:{request_id}")


def test_default_window_is_24_hours(policy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(IDEMPOTENCY_ENV, raising=False)
    assert idempotency_window(load_policy([policy_dir])) == DAY_S


def test_policy_setting_sets_the_window(policy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(IDEMPOTENCY_ENV, raising=False)
    policy = load_policy([_policy_with(policy_dir, {"idempotency_window_s": 3600})])
    assert idempotency_window(policy) == 3600


def test_command_line_overrides_the_policy_setting(policy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "--policy", "p.yaml", "--idempotency-window", "600"])
    assert args.idempotency_window == 600
    monkeypatch.setenv(IDEMPOTENCY_ENV, "600")  # what `serve` hands its workers
    assert idempotency_window(load_policy([_policy_with(policy_dir, {"idempotency_window_s": 3600})])) == 600


@pytest.mark.parametrize("value", [0, -5, "1d", 1.5])
def test_window_that_is_not_a_positive_whole_number_is_refused(policy_dir: Path, value: object) -> None:
    with pytest.raises(PolicyError, match=r"settings\.idempotency_window_s"):
        load_policy([_policy_with(policy_dir, {"idempotency_window_s": value})])


def test_served_request_keys_expire_after_the_default_window(stack: Stack, customer: str) -> None:
    _, _, marker_ttl, index_ttl = _serve_one(stack, customer)
    assert DAY_S - 60 < marker_ttl <= DAY_S
    assert DAY_S - 60 < index_ttl <= DAY_S


def test_served_request_keys_expire_after_the_policy_window(fakes: dict, policy_dir: Path, customer: str) -> None:  # type: ignore[type-arg]
    with running_stack(fakes, _policy_with(policy_dir, {"idempotency_window_s": 900}), workers=1, name="window") as s:
        request_id, secret, marker_ttl, index_ttl = _serve_one(s, customer)
        assert 840 < marker_ttl <= 900
        assert 840 < index_ttl <= 900
        # Within the window the id stays spent.
        with pytest.raises(openai.ConflictError, match="already used"):
            s.client(secret).chat.completions.create(model="support_draft", messages=MESSAGES,
                                                     extra_headers={"x-request-id": request_id})
