"""Serve many trained runs over HTTP: LoRA adapters over one frozen base, micro-batched together.

    GET    /                     a page: pick an adapter, paste texts, see probabilities as bars
    GET    /health               {"status": "ok", "adapters": N}            (no API key needed)
    GET    /adapters             the served runs: name, method, base model, labels, model in memory,
                                 multi_label and the decision rule (temperature, threshold(s))
    POST   /predict              {"adapter": NAME, "texts": [...]} -> {"adapter", "predictions": [...]}:
                                 {label, confidence, probabilities} per text, or for a multi-label run
                                 {labels, probabilities}
    GET    /metrics              Prometheus text format
    POST   /admin/runs           {"run_dir": PATH} -> load a run while serving
    DELETE /admin/runs/{name}    unload a run

With an API key, every route but / (the page asks for the key), /health and the API description
(/openapi.json, /docs) wants `Authorization: Bearer KEY`, checked before the body is read; without one
the admin routes answer 403. Every error is {"detail": "one line"} with a 4xx status for the client's
mistakes (503 + Retry-After when busy), each declared in the OpenAPI schema; the connection-level
answers (408, 503 over the connection cap, 400 for malformed HTTP) come from serve/connections.py in
the same shape (docs/serving.md).
"""

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, Field

from peftlab.errors import UserError
from peftlab.serve.connections import ConnectionLimits
from peftlab.serve.batcher import Batcher, BatchSettings, Overloaded, Unloaded
from peftlab.serve.page import PAGE
from peftlab.serve.registry import AlreadyServed, Registry


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_texts: int = 128            # texts per request
    max_chars: int = 10_000         # characters per text (beyond: 422, never silently cut)
    max_body_bytes: int = 1 << 20   # request body (beyond: 413)
    precision: str = "auto"         # auto: bf16 where the device multiplies bf16 in hardware, else fp32
    batch: BatchSettings = field(default_factory=BatchSettings)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)  # applied by the server (cli/serve.py)


class Error(BaseModel):
    detail: str = Field(..., description="what is wrong, in one line")


class Prediction(BaseModel):
    """A single-label run's answer: one label."""
    label: str = Field(..., description="the predicted label (the run's threshold where it has one, else the "
                                        "most probable)")
    confidence: float = Field(..., description="the predicted label's probability")
    probabilities: dict[str, float] = Field(..., description="label -> probability (softmax: they sum to 1)")


class LabelSetPrediction(BaseModel):
    """A multi-label run's answer: a set of labels, possibly empty."""
    labels: list[str] = Field(..., description="every label whose probability reaches its threshold, in the "
                                               "run's label order (empty: none)")
    probabilities: dict[str, float] = Field(..., description="label -> probability (a sigmoid per label: "
                                                             "independent, they need not sum to 1)")


class PredictResponse(BaseModel):
    adapter: str
    predictions: list[Prediction | LabelSetPrediction] = Field(
        ..., description="one per text, in order: {label, confidence, probabilities} from a single-label run, "
                         "{labels, probabilities} from a multi-label one (GET /adapters: multi_label)")


class AdapterInfo(BaseModel):
    name: str
    method: str
    base_model: str
    labels: list[str]
    model_in_memory: int = Field(..., description="runs with the same number share one base model in memory")
    multi_label: bool = Field(False, description="true: a set of labels per text (a sigmoid per label); "
                                                 "false: one label per text (softmax)")
    temperature: float = Field(1.0, description="the logits are divided by it before the softmax or sigmoid "
                                                "(the run's calibration; 1: none)")
    threshold: float | None = Field(None, description="single-label, two labels: the second label is predicted "
                                                      "when its probability reaches this; null: the most probable")
    thresholds: dict[str, float] | None = Field(None, description="multi-label: label -> the probability at which "
                                                                  "it is predicted (0.5 unless the run tuned or "
                                                                  "fixed them); null for single-label runs")


class Health(BaseModel):
    status: str
    adapters: int


class UnloadReply(BaseModel):
    unloaded: str


class LoadRun(BaseModel):
    run_dir: str = Field(..., max_length=4096, description="a completed run directory, as seen by the server")


def _request_model(settings: ServeSettings) -> type[BaseModel]:
    # lone surrogates ("\ud800" in the JSON) are refused by pydantic itself: 422, tested
    Text = Annotated[str, Field(max_length=settings.max_chars)]

    class PredictRequest(BaseModel):
        adapter: str | None = Field(None, max_length=1000,
                                    description="served run name; may be left out when exactly one run is served")
        texts: list[Text] = Field(..., min_length=1, max_length=settings.max_texts,
                                  description=f"1 to {settings.max_texts} texts of at most {settings.max_chars} "
                                              f"characters (longer ones are refused, not cut; the model still "
                                              f"truncates to the run's max_length tokens)")

    return PredictRequest


class Metrics:
    """Prometheus metrics, in a registry of the app's own (several apps may live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("peftlab_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("peftlab_http_request_seconds", "HTTP request latency by route", ["route"],
                                 registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.predict_latency = Histogram("peftlab_predict_seconds", "time to answer /predict (queue wait and "
                                         "forward pass) by adapter", ["adapter"], registry=r,
                                         buckets=(.0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.texts = Counter("peftlab_predicted_texts", "texts classified by adapter", ["adapter"], registry=r)
        self.batch_texts = Histogram("peftlab_batch_texts", "texts per micro-batch (one forward pass up to 64)", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_adapters = Histogram("peftlab_batch_adapters", "adapters per micro-batch", registry=r,
                                        buckets=(1, 2, 3, 4, 6, 8, 16))
        self.adapter_batches = Counter("peftlab_adapter_batches", "micro-batches that held the adapter's texts",
                                       ["adapter"], registry=r)
        self.served = Gauge("peftlab_adapters_served", "runs served", registry=r)

    def batch(self, group, jobs) -> None:
        names = {job.served.name for job in jobs}
        self.batch_texts.observe(sum(len(job.texts) for job in jobs))
        self.batch_adapters.observe(len(names))
        for name in names:
            self.adapter_batches.labels(name).inc()


PUBLIC_PATHS = frozenset({"/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class Guard:
    """ASGI middleware, before the app reads anything of a request:

    - the API key (401) and the admin switch (403), checked on the headers: an unauthorized client
      cannot make the server read, hold or parse its body;
    - the body size limit (413, also for bodies sent without a length);
    - the body read as JSON here, so that a body that is not (bad UTF-8, bad syntax, nested too deep, a
      number too long to convert) gets a 400 saying which, where the framework's own answer names none;
    - the request metrics, labelled by route template (never by raw path: bounded cardinality)."""

    def __init__(self, app, settings: "ServeSettings", metrics: Metrics, paths: frozenset[str] = frozenset()):
        self.app, self.settings, self.metrics, self.paths = app, settings, metrics, paths

    def _refusal(self, scope) -> tuple[int, str, dict[str, str]] | None:
        path, key = scope["path"], self.settings.api_key
        if path in PUBLIC_PATHS:
            return None
        if key is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode("utf-8")):
                return 401, "missing or wrong API key: send the header Authorization: Bearer KEY", \
                    {"www-authenticate": "Bearer"}
        elif path.startswith("/admin/"):
            return 403, "admin routes are off: start the server with --api-key (or PEFTLAB_API_KEY)", {}
        return None

    async def _body(self, scope, receive) -> bytes | tuple[int, str]:
        """The whole body, or (status, why) when it is too large or not JSON."""
        limit = self.settings.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            return 413, self._too_large()
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, "the client went away before the body was complete"
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return 413, self._too_large()
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if not body:
            return body  # the app's validation names the missing body (422)
        try:
            json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            return 400, f"the body is not UTF-8 (byte {body[e.start]:#04x} at offset {e.start}): send UTF-8 JSON"
        except RecursionError:
            return 400, "the JSON body is nested too deeply: send {\"texts\": [...]} as documented"
        except json.JSONDecodeError as e:
            return 400, f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        except ValueError as e:  # e.g. an integer of more digits than Python converts (4300)
            return 400, f"the JSON body cannot be read ({str(e).split(';')[0]})"
        return body

    def _too_large(self) -> str:
        return (f"request body over {self.settings.max_body_bytes} bytes: send fewer or shorter texts "
                f"(or start the server with a larger --max-body-bytes)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def refuse(code: int, detail: str, headers: dict[str, str] | None = None):
            await reply(send_status, code, detail, headers)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:  # the body, if any, is not read: the connection closes after the answer
                return await refuse(refusal[0], refusal[1], {**refusal[2], "connection": "close"})
            encoding = dict(scope["headers"]).get(b"content-encoding", b"identity").strip().lower()
            if scope["method"] in ("POST", "PUT", "PATCH") and encoding not in (b"", b"identity"):
                return await refuse(415, f"Content-Encoding {encoding.decode('latin-1')[:40]} is not accepted: "
                                         f"send the JSON body uncompressed", {"accept-encoding": "identity",
                                                                             "connection": "close"})
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._body(scope, receive)
                if isinstance(body, tuple):
                    return await refuse(*body, {"connection": "close"})  # the rest of it is not read
                receive = _replay(body, receive)
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            route = route or (scope["path"] if scope["path"] in self.paths else "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _replay(body: bytes, receive):
    sent = [False]

    async def replayed():
        if sent[0]:  # asked again only to learn of a disconnect: the server's own receive tells
            return await receive()
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replayed


async def reply(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _errors(*codes: int) -> dict:
    text = {400: "the body cannot be read: not UTF-8, not JSON (the detail says where), nested too deeply, or a "
                 "number too long to convert",
            401: "missing or wrong API key (Authorization: Bearer KEY), checked before the body is read",
            403: "admin routes are off: the server has no --api-key", 404: "no such adapter (or run directory)",
            409: "conflicts with what is served: a run of that name is served already (/admin/runs), or "
                 "no adapter was named while several runs are served (/predict)", 413: "request body too large",
            415: "a compressed body (Content-Encoding gzip, deflate, ...): send it uncompressed",
            408: "the body did not arrive within the server's --body-timeout of its headers (the connection is closed)",
            422: "invalid request (the detail names the field)",
            503: "busy: the texts waiting for a forward pass reach --max-queue-texts; retry after the Retry-After "
                 "header's seconds"}
    return {c: {"model": Error, "description": text[c]} for c in codes}


def check_api_key(key: str | None) -> None:
    """A key a client can send: HTTP header values are ASCII, so a key with other characters could never
    be matched (and the two checks would read such bytes differently)."""
    if key is not None and not (key and key.isascii() and key.isprintable() and " " not in key):
        raise UserError("--api-key (or PEFTLAB_API_KEY): use printable ASCII characters without spaces (letters, "
                        "digits, punctuation): an HTTP header carries ASCII, so no client could send this key")


def create_app(run_dirs: list[str], device: torch.device | None = None, settings: ServeSettings | None = None):
    """The FastAPI app serving run_dirs. UserError (one line) for a run that cannot be served."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeSettings()
    check_api_key(settings.api_key)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = Metrics()
    batchers: dict[int, Batcher] = {}
    registry = Registry(device, precision=settings.precision,
                        on_group_added=lambda g: batchers.__setitem__(g.index, Batcher(g, settings.batch, metrics.batch)),
                        on_group_removed=lambda g: batchers.pop(g.index).stop())
    try:
        for path in run_dirs:
            registry.add(path)
    except BaseException:
        for batcher in batchers.values():
            batcher.stop()
        raise
    metrics.served.set(len(registry.served))
    PredictRequest = _request_model(settings)

    app = FastAPI(title="peftlab", version="2", description="Text classifiers trained with peftlab: LoRA "
                  "adapters over shared frozen bases, micro-batched together.")
    app.add_middleware(Guard, settings=settings, metrics=metrics,
                       paths=frozenset({"/", "/health", "/adapters", "/predict", "/metrics", "/admin/runs"}))
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key (or PEFTLAB_API_KEY)")

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if settings.api_key is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"), settings.api_key.encode("utf-8")):
            raise HTTPException(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                                headers={"WWW-Authenticate": "Bearer"})

    def admin(_: Annotated[None, Depends(authorized)]) -> None:
        if settings.api_key is None:
            raise HTTPException(403, "admin routes are off: start the server with --api-key (or PEFTLAB_API_KEY)")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # the framework's own 404 and 405 say only "Not Found": say what was asked and where to look
        detail, path = exc.detail, request.url.path[:200]
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {path}: the routes are listed at /docs"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {path} (allowed: {(exc.headers or {}).get('Allow', '?')})"
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # one line naming the fields; the offending input is not echoed back (it may be megabytes, or
        # hold characters that cannot be encoded)
        parts = [f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        detail = "; ".join(parts[:5]) + (f" (and {len(parts) - 5} more)" if len(parts) > 5 else "")
        return JSONResponse({"detail": detail.encode("utf-8", "replace").decode()}, 422)

    @app.get("/", response_class=HTMLResponse, summary="web page: classify texts in the browser")
    def page():
        return PAGE

    @app.get("/health", response_model=Health, summary="liveness; needs no API key")
    def health():
        return {"status": "ok", "adapters": len(registry.served)}

    @app.get("/adapters", response_model=list[AdapterInfo], dependencies=[Depends(authorized)],
             responses=_errors(401), summary="the served runs")
    def adapters():
        return [s.describe() for s in list(registry.served.values())]

    @app.post("/predict", response_model=PredictResponse, dependencies=[Depends(authorized)],
              responses=_errors(400, 401, 404, 408, 409, 413, 415, 422, 503), summary="classify texts with one served run")
    async def predict(req: PredictRequest):
        served = registry.served.get(req.adapter) if req.adapter is not None else None
        if req.adapter is None:
            if len(registry.served) != 1:  # valid by the schema, ambiguous in the server's current state
                raise HTTPException(409, f"adapter: name one, since {len(registry.served)} runs are served "
                                         f"({', '.join(sorted(registry.served))})")
            served = next(iter(registry.served.values()))
        if served is None:
            raise HTTPException(404, f"unknown adapter {req.adapter!r}; served: {', '.join(sorted(registry.served))}")
        start = time.perf_counter()
        try:
            probs = await asyncio.wrap_future(batchers[served.group.index].submit(served, req.texts))
        except (Unloaded, KeyError):
            raise HTTPException(404, f"adapter {served.name!r} was unloaded") from None
        except Overloaded as e:  # refused now, not kept waiting: the client retries when told
            raise HTTPException(503, f"the server is busy ({e.queued} texts are waiting, the limit is "
                                     f"{settings.batch.max_queue_texts}): retry after {e.retry_after_s} s",
                                headers={"Retry-After": str(e.retry_after_s)}) from None
        metrics.predict_latency.labels(served.name).observe(time.perf_counter() - start)
        metrics.texts.labels(served.name).inc(len(req.texts))
        return {"adapter": served.name, "predictions": served.predictor.rows(probs)}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(authorized)],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                        # spelled out: a "model" would be documented as text/plain like the 200 reply
                        401: {"description": "missing or wrong API key", "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
             summary="Prometheus metrics")
    def metrics_route():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/runs", response_model=AdapterInfo, status_code=201, dependencies=[Depends(admin)],
              responses=_errors(400, 401, 403, 404, 408, 409, 413, 415, 422), summary="load a run while serving")
    async def load_run(body: LoadRun):
        if "\0" in body.run_dir or not Path(body.run_dir).is_dir():
            raise HTTPException(404, f"run_dir: no directory {body.run_dir!r} on the server")
        try:
            # loading takes seconds: off the event loop, so other requests keep being answered
            served = await asyncio.to_thread(registry.add, body.run_dir)
        except AlreadyServed as e:
            raise HTTPException(409, str(e)) from None
        except UserError as e:
            raise HTTPException(422, f"run_dir: {e}") from None
        metrics.served.set(len(registry.served))
        return served.describe()

    @app.delete("/admin/runs/{name}", response_model=UnloadReply, dependencies=[Depends(admin)],
                responses=_errors(401, 403, 404), summary="unload a run")
    async def unload_run(name: str):
        try:
            await asyncio.to_thread(registry.remove, name)
        except KeyError:
            raise HTTPException(404, f"no served run is named {name!r}") from None
        metrics.served.set(len(registry.served))
        return {"unloaded": name}

    app.state.registry, app.state.metrics = registry, metrics
    return app
