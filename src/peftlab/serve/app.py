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
(/openapi.json, /docs) wants `Authorization: Bearer KEY`; without one the admin routes answer 403.
Every error is {"detail": "one line"} with a 4xx status for the client's mistakes,
each declared in the OpenAPI schema.
"""

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, Field

from peftlab.errors import UserError
from peftlab.serve.batcher import Batcher, BatchSettings, Unloaded
from peftlab.serve.page import PAGE
from peftlab.serve.registry import AlreadyServed, Registry


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_texts: int = 128            # texts per request
    max_chars: int = 10_000         # characters per text (beyond: 422, never silently cut)
    max_body_bytes: int = 1 << 20   # request body (beyond: 413)
    batch: BatchSettings = field(default_factory=BatchSettings)


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


class Guard:
    """ASGI middleware: the request body size limit (413, also for bodies sent without a length) and
    the request metrics, labelled by route template (never by raw path: bounded cardinality)."""

    def __init__(self, app, max_body_bytes: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException

        start, seen, status = time.perf_counter(), 0, [500]
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        too_large = HTTPException(413, f"request body over {self.limit} bytes: send fewer or shorter texts "
                                       f"(or start the server with a larger --max-body-bytes)")

        async def receive_limited():
            nonlocal seen
            if declared.isdigit() and int(declared) > self.limit:
                raise too_large
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large
            return message

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_limited, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def _errors(*codes: int) -> dict:
    text = {400: "the body cannot be read (not UTF-8)", 401: "missing or wrong API key (Authorization: Bearer KEY)",
            403: "admin routes are off: the server has no --api-key", 404: "no such adapter (or run directory)",
            409: "conflicts with what is served: a run of that name is served already (/admin/runs), or "
                 "no adapter was named while several runs are served (/predict)", 413: "request body too large",
            422: "invalid request (the detail names the field)"}
    return {c: {"model": Error, "description": text[c]} for c in codes}


def create_app(run_dirs: list[str], device: torch.device | None = None, settings: ServeSettings | None = None):
    """The FastAPI app serving run_dirs. UserError (one line) for a run that cannot be served."""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    settings = settings or ServeSettings()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = Metrics()
    batchers: dict[int, Batcher] = {}
    registry = Registry(device,
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
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, metrics=metrics)
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
              responses=_errors(400, 401, 404, 409, 413, 422), summary="classify texts with one served run")
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
              responses=_errors(400, 401, 403, 404, 409, 413, 422), summary="load a run while serving")
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
