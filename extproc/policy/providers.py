"""`providers:` entries: one upstream endpoint each (an Envoy cluster), with its time bounds,
credentials, circuit thresholds and the headers and query parameters it is sent."""

from __future__ import annotations

import re
from typing import Any

from extproc import config
from extproc.policy.checker import Checker, boolean, is_number, seconds, whole
from extproc.policy.model import Provider
from extproc.policy.yamlpos import LocDict

FIELDS = {"address", "tls", "api_key_env", "api_key_file", "timeout_s", "tokens_per_s", "ttfb_timeout_s",
          "idle_timeout_s", "circuit", "headers", "query_params"}
CIRCUIT_FIELDS = {"failures", "failure_rate", "customers", "window_s", "cooldown_s"}
MAX_SECONDS = 3600.0  # the largest time bound a policy may set
MAX_TOKENS_PER_S = 1_000_000.0
_ADDRESS = re.compile(r"^\[?([A-Za-z0-9.:-]+?)\]?:(\d{1,5})$")
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")


def parse_provider(c: Checker, name: str, pd: LocDict, key: str) -> Provider | None:
    c.known_keys(pd, key, FIELDS)
    address = _address(c, pd, key)
    if address is None:
        return None
    host, port = address
    return Provider(
        name=name,
        host=host,
        port=port,
        tls=boolean(c, pd, key, "tls", port == 443),
        timeout_s=seconds(c, pd, key, "timeout_s", config.PROVIDER_TIMEOUT_S, MAX_SECONDS) or config.PROVIDER_TIMEOUT_S,
        tokens_per_s=seconds(c, pd, key, "tokens_per_s", config.PROVIDER_TOKENS_PER_S, MAX_TOKENS_PER_S)
        or config.PROVIDER_TOKENS_PER_S,
        ttfb_timeout_s=seconds(c, pd, key, "ttfb_timeout_s", None, MAX_SECONDS),
        idle_timeout_s=seconds(c, pd, key, "idle_timeout_s", None, MAX_SECONDS),
        api_key_env=_string(c, pd, key, "api_key_env"),
        api_key_file=_string(c, pd, key, "api_key_file"),
        headers=_headers(c, pd, key),
        query_params=_query_params(c, pd, key),
        **_circuit(c, pd, key),
    )


def _address(c: Checker, pd: LocDict, key: str) -> tuple[str, int] | None:
    address = pd.get("address")
    m = _ADDRESS.match(address) if isinstance(address, str) else None
    if m is None or not 0 < int(m.group(2)) < 65536:
        c.error(pd.at("address"), f"{key}.address", f"must be host:port, got {address!r}")
        return None
    return m.group(1), int(m.group(2))


def _string(c: Checker, pd: LocDict, key: str, field: str) -> str | None:
    v = pd.get(field)
    if v is not None and not isinstance(v, str):
        c.error(pd.at(field), f"{key}.{field}", f"must be a string, got {v!r}")
        return None
    return v


def _circuit(c: Checker, pd: LocDict, key: str) -> dict[str, Any]:
    """The `circuit:` thresholds given, as `Provider` keyword arguments (the rest default)."""
    if "circuit" not in pd:
        return {}
    cd = c.mapping(pd["circuit"], pd.at("circuit"), f"{key}.circuit")
    if cd is None:
        return {}
    c.known_keys(cd, f"{key}.circuit", CIRCUIT_FIELDS)
    out: dict[str, Any] = {}
    for f in ("failures", "customers", "window_s", "cooldown_s"):
        v = whole(c, cd, f"{key}.circuit", f, 1)
        if v is not None:
            out[f"circuit_{f}"] = v
    rate = cd.get("failure_rate")
    if rate is not None:
        if not is_number(rate) or not 0 < rate <= 1:
            c.error(cd.at("failure_rate"), f"{key}.circuit.failure_rate", f"must be a share between 0 and 1, got {rate!r}")
        else:
            out["circuit_failure_rate"] = str(rate)
    return out


def _headers(c: Checker, pd: LocDict, key: str) -> tuple[tuple[str, str], ...]:
    """`headers:` of a provider: name -> value, printable ASCII; never credentials or framing."""
    from extproc.edge import RESERVED_HEADERS

    if "headers" not in pd:
        return ()
    hd = c.mapping(pd["headers"], pd.at("headers"), f"{key}.headers")
    if hd is None:
        return ()
    out: list[tuple[str, str]] = []
    for name, value in hd.items():
        lname = name.lower()
        if not _TOKEN.match(name) or lname in RESERVED_HEADERS or lname.startswith(("x-tollgate-", "x-envoy-")):
            c.error(hd.at(name), f"{key}.headers.{name}", "not a header name the policy may set (credentials, framing and "
                    "x-tollgate-*/x-envoy-* are the gateway's)")
        elif not isinstance(value, (str, int)) or isinstance(value, bool) or not _PRINTABLE.match(str(value)):
            c.error(hd.at(name), f"{key}.headers.{name}", f"must be a printable ASCII string, got {value!r}")
        else:
            out.append((lname, str(value)))
    return tuple(out)


def _query_params(c: Checker, pd: LocDict, key: str) -> tuple[str, ...]:
    """`query_params:` of a provider: the query parameter names a client may pass on."""
    raw = pd.get("query_params")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(n, str) and _TOKEN.match(n) for n in raw):
        c.error(pd.at("query_params"), f"{key}.query_params", f"must be a list of parameter names, got {raw!r}")
        return ()
    return tuple(raw)
