"""`tollgate admin`: the admin HTTP API for a product's backend (keys, credits, limits, reports).

Starlette on uvicorn: a small, maintained ASGI stack (Encode; the base of FastAPI) with no
code generation or ORM to drag in, and async like the rest of Tollgate, so it uses the same
redis-py asyncio client as the processor. Every endpoint except `/healthz` and
`/openapi.json` needs `Authorization: Bearer <admin token>` (from $TOLLGATE_ADMIN_TOKEN or
`--token-file`); errors use OpenAI's shape. Credits are idempotent by `reference` (or the
`Idempotency-Key` header): a payment webhook delivered twice credits once.
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from extproc import errors, invoice
from extproc.credits import add_credit
from extproc.errors import ApiError
from extproc.keys import KeyStore
from extproc.money import usd_to_micro
from extproc.quota import Quota, valid_id
from extproc.store import RedisLike, redis_client
from extproc.store import close as close_client

TOKEN_ENV = "TOLLGATE_ADMIN_TOKEN"
Handler = Callable[[Request], Awaitable[Response]]


class Refused(Exception):
    """An OpenAI-shaped refusal raised from inside a handler."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def error_response(err: ApiError) -> Response:
    return Response(err.body(), status_code=err.status, media_type="application/json", headers=err.headers)


class AdminApi:
    def __init__(self, redis_url: str, token: str, ledger_url: str | None) -> None:
        if not token:
            raise ValueError("the admin API needs a token")
        self.redis_url, self.token, self.ledger_url = redis_url, token, ledger_url
        self.redis: RedisLike | None = None

    # --- plumbing -------------------------------------------------------------------------

    @property
    def r(self) -> RedisLike:
        assert self.redis is not None
        return self.redis

    def authorized(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def guarded(self, handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            if not self.authorized(request):
                return error_response(errors.invalid_api_key("Missing or wrong admin token. Pass 'Authorization: Bearer <token>'."))
            try:
                return await handler(request)
            except Refused as exc:
                return error_response(exc.error)
            except ValueError as exc:
                return error_response(errors.invalid_request(str(exc)))

        return run

    @staticmethod
    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise Refused(errors.invalid_request("The body must be a JSON object.")) from None
        if not isinstance(data, dict):
            raise Refused(errors.invalid_request("The body must be a JSON object."))
        return data

    @staticmethod
    def field(data: dict[str, Any], name: str, kind: type, required: bool = True) -> Any:
        value = data.get(name)
        if value is None:
            if required:
                raise Refused(errors.invalid_request(f"Missing required field {name!r}.", param=name))
            return None
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise Refused(errors.invalid_request(f"{name!r} must be an integer.", param=name))
        if kind is str and not isinstance(value, str):
            raise Refused(errors.invalid_request(f"{name!r} must be a string.", param=name))
        return value

    # --- keys -----------------------------------------------------------------------------

    async def create_key(self, request: Request) -> Response:
        d = await self.body(request)
        created = await KeyStore(self.r).create(
            self.field(d, "customer", str), self.field(d, "workspace", str), self.field(d, "plan", str),
            self.field(d, "default_route", str, False), self.field(d, "rpm", int, False), self.field(d, "tpm", int, False))
        i = created.info
        return JSONResponse({"key_id": i.key_id, "secret": created.secret, "customer": i.customer, "workspace": i.workspace,
                             "plan": i.plan, "default_route": i.default_route}, status_code=201)

    async def list_keys(self, request: Request) -> Response:
        customer = request.query_params.get("customer")
        data = [{"key_id": k.key_id, "customer": k.customer, "workspace": k.workspace, "plan": k.plan,
                 "default_route": k.default_route, "status": "active" if k.active else "revoked"}
                for k in await KeyStore(self.r).list() if customer is None or k.customer == customer]
        return JSONResponse({"object": "list", "data": data})

    async def revoke_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        if not await KeyStore(self.r).revoke(key_id):
            raise Refused(ApiError(404, "not_found", f"Unknown key id {key_id!r}.", param="key_id"))
        return JSONResponse({"key_id": key_id, "status": "revoked"})

    # --- money ----------------------------------------------------------------------------

    def customer(self, request: Request) -> str:
        customer = str(request.path_params["customer"])
        if not valid_id(customer):
            raise Refused(errors.invalid_request("Invalid customer id.", param="customer"))
        return customer

    async def add_credit(self, request: Request) -> Response:
        customer = self.customer(request)
        d = await self.body(request)
        reference = d.get("reference") or request.headers.get("idempotency-key")
        if not isinstance(reference, str) or not reference:
            raise Refused(errors.invalid_request("A 'reference' (payment id) or an Idempotency-Key header is required.", param="reference"))
        amount = d.get("usd")
        if amount is None:
            raise Refused(errors.invalid_request("Missing required field 'usd' (a decimal string such as \"25.00\").", param="usd"))
        try:
            micro = usd_to_micro(amount)
        except ValueError as exc:
            raise Refused(errors.invalid_request(str(exc), param="usd")) from None
        credit = await add_credit(self.r, customer, micro, reference, source="admin-api")
        return JSONResponse({"customer": customer, "reference": credit.reference, "credited": credit.credited,
                             "amount_micro_usd": micro, "record_id": credit.record_id, "balance_micro_usd": credit.balance_micro},
                            status_code=201 if credit.credited else 200)

    async def show_balance(self, request: Request) -> Response:
        customer = self.customer(request)
        return JSONResponse({"customer": customer, **await Quota(self.r).account_show(customer)})

    async def set_limits(self, request: Request) -> Response:
        customer = self.customer(request)
        d = await self.body(request)
        workspace = self.field(d, "workspace", str, False)
        if workspace is not None and not valid_id(workspace):
            raise Refused(errors.invalid_request("Invalid workspace id.", param="workspace"))
        monthly = d.get("monthly_usd")
        budget = None if monthly is None else (-1 if monthly == "none" else usd_to_micro(monthly))
        rpm, tpm = self.field(d, "rpm", int, False), self.field(d, "tpm", int, False)
        await Quota(self.r).set_limits(customer, workspace, monthly_budget_micro=budget, rpm=rpm, tpm=tpm)
        return JSONResponse({"customer": customer, "workspace": workspace, "monthly_budget_micro": budget, "rpm": rpm, "tpm": tpm})

    async def report(self, request: Request) -> Response:
        customer = self.customer(request)
        month = str(request.path_params["month"])
        fmt = request.query_params.get("format", "json")
        if fmt not in invoice.FORMATS:
            raise Refused(errors.invalid_request(f"format must be one of {', '.join(invoice.FORMATS)}.", param="format"))
        if not self.ledger_url:
            raise Refused(ApiError(503, "ledger_unavailable", "This admin API has no ledger configured (--to).", type="server_error"))
        url = self.ledger_url

        def build() -> dict[str, Any]:
            from extproc.ledger_store import open_store

            store = open_store(url)
            try:
                return invoice.build(store, customer, month)
            finally:
                store.close()

        rep = await run_in_threadpool(build)
        if fmt == "json":
            return JSONResponse(rep)
        return PlainTextResponse(invoice.render(rep, fmt) + "\n", media_type="text/csv" if fmt == "csv" else "text/plain")

    # --- app ------------------------------------------------------------------------------

    async def openapi(self, _request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def not_found(self, request: Request, _exc: Exception) -> Response:
        return error_response(errors.not_found(request.url.path))

    def app(self) -> Starlette:
        g = self.guarded

        @asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            self.redis = redis_client(self.redis_url)
            try:
                yield
            finally:
                await close_client(self.redis)

        routes = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/v1/keys", g(self.create_key), methods=["POST"]),
            Route("/v1/keys", g(self.list_keys), methods=["GET"]),
            Route("/v1/keys/{key_id}", g(self.revoke_key), methods=["DELETE"]),
            Route("/v1/customers/{customer}/credits", g(self.add_credit), methods=["POST"]),
            Route("/v1/customers/{customer}/balance", g(self.show_balance), methods=["GET"]),
            Route("/v1/customers/{customer}/limits", g(self.set_limits), methods=["PUT"]),
            Route("/v1/customers/{customer}/reports/{month}", g(self.report), methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: self.not_found, 405: self.not_found})


def _schema(props: dict[str, str], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": {k: {"type": v} for k, v in props.items()}}


_ERROR = {"description": "OpenAI-shaped error", "content": {"application/json": {"schema": _schema({"error": "object"}, ["error"])}}}
_OK = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}


def _op(summary: str, body: dict[str, Any] | None = None, ok: str = "200") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "security": [{"bearer": []}],
                          "responses": {ok: _OK, "400": _ERROR, "401": _ERROR, "404": _ERROR}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


_CUSTOMER = {"name": "customer", "in": "path", "required": True, "schema": {"type": "string"}}
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Tollgate admin API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/v1/keys": {
            "post": _op("Create a customer API key (the secret is returned once)", _schema(
                {"customer": "string", "workspace": "string", "plan": "string", "default_route": "string", "rpm": "integer",
                 "tpm": "integer"}, ["customer", "workspace", "plan"]), ok="201"),
            "get": _op("List keys (optionally ?customer=C)"),
        },
        "/v1/keys/{key_id}": {"delete": {**_op("Revoke a key"), "parameters": [
            {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}]}},
        "/v1/customers/{customer}/credits": {"post": {**_op(
            "Credit a prepaid balance once per reference (201 credited, 200 reference already used)",
            _schema({"usd": "string", "reference": "string"}, ["usd"]), ok="201"), "parameters": [
            _CUSTOMER, {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}]}},
        "/v1/customers/{customer}/balance": {"get": {**_op("Balance, money in flight, this month's spend"),
                                                     "parameters": [_CUSTOMER]}},
        "/v1/customers/{customer}/limits": {"put": {**_op("Set limit overrides (customer, or one workspace)", _schema(
            {"workspace": "string", "monthly_usd": "string", "rpm": "integer", "tpm": "integer"}, [])), "parameters": [_CUSTOMER]}},
        "/v1/customers/{customer}/reports/{month}": {"get": {**_op("Invoice lines of a month (SPEC §8 shape)"), "parameters": [
            _CUSTOMER, {"name": "month", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^\\d{4}-\\d{2}$"}},
            {"name": "format", "in": "query", "required": False, "schema": {"enum": list(invoice.FORMATS)}}]}},
    },
}


def read_token(token_file: str | None) -> str:
    if token_file:
        with open(token_file) as f:
            return f.read().strip()
    return os.environ.get(TOKEN_ENV, "").strip()


def serve_admin(args: argparse.Namespace) -> int:
    import uvicorn

    token = read_token(args.token_file)
    if not token:
        print(f"tollgate: the admin API needs a token: set ${TOKEN_ENV} or pass --token-file", file=sys.stderr)
        return 2
    host, _, port = args.listen.rpartition(":")
    redis_url = args.redis_url or os.environ.get("TOLLGATE_REDIS_URL") or "redis://127.0.0.1:6379/0"
    ledger = args.to or os.environ.get("TOLLGATE_LEDGER_URL")
    api = AdminApi(redis_url, token, ledger)
    uvicorn.run(api.app(), host=host or "127.0.0.1", port=int(port), log_level=args.log_level.lower(), access_log=False)
    return 0
