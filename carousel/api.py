"""The recommendations API: in-app and web widgets ask for a user's carousel over HTTP.

Role: the request path beside ``serve``'s Kafka path. An app opening a screen, or a web page
rendering a widget, asks and gets the campaign channel's payload back while the screen opens.
Each request is ranked by the one ranking function that ``serve`` and ``campaign`` use
(:func:`carousel.realtime.rank_campaign` -> :func:`carousel.ranking.rank_request`), against the
same state: the user's online profile and recent sends from the online store, and the matrix,
catalog and trending as in-memory lookups refreshed by Delta version (:mod:`carousel.lookups`).

Inputs: the online store (``online_store``), the Delta tables ``catalog``,
``item_recommendations`` and ``trending_items`` (read with delta-rs), ``campaigns`` and ``api``
in ``conf/``; API keys from the environment variables that ``api.keys`` names.
Outputs: HTTP answers (the payload contract of ``conf/payload_schemas/``, with the same
deterministic payload ids), and one outbox record per answer on ``kafka.topics.sent``, which
``record-sends`` writes into ``sent_recommendations``: exclusions, reports and A/B assignment
work the same for API traffic as for ``serve``.

Endpoints (OpenAPI at ``/openapi.json``, browsable at ``/docs``):

* ``GET /v1/users/{user_id}/recommendations?campaign=NAME[&item_id=ID][&n=N]`` - the user's
  payload for the campaign (``item_id``: the product on screen seeds the list and is excluded;
  ``n``: at most this many items, up to the campaign's ``items``). ``X-Request-Id`` (optional)
  names the request: the same id again gets the same answer (payload id and items) and is
  recorded once. 204 when no item is eligible. A control-group user gets the campaign's
  fallback, recorded as a control hold-out.
* ``GET /v1/items/{item_id}/similar?n=N[&campaign=NAME]`` - the item's published list, cut to
  the products the catalog offers (the campaign's filters, else in stock and active).
* ``GET /healthz`` (the process answers), ``GET /readyz`` (its lookups are loaded),
  ``GET /metrics`` (Prometheus, summed over the workers).

Every ``/v1`` request needs an ``X-API-Key`` header holding one of the configured keys; each key
has a rate limit per second, counted in the online store so it holds across workers and
instances. Errors are JSON ``{"error": code, "reason": text}`` with a 4xx status (401, 404, 422,
429) or 503 (not ready, store or broker unavailable); never a traceback.

    CAROUSEL_API_KEY=... ./spark-submit.sh api [--port 8780] [--workers 2] [--set api.keys...]
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer
from fastapi import FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from carousel.broker import BrokerError, wait_until_reachable
from carousel.cli import add_config_args, config_from_args, setup_logging
from carousel.config import CampaignFilters, CarouselConfig, load_config
from carousel.lookups import LookupSources, ServingLookupError, ServingLookups, current_lookups
from carousel.online_state import Answer, OnlineState
from carousel.online_store import OnlineStoreError, check_reachable, connect
from carousel.payloads import PayloadError, PayloadRenderer, TemplateCheckError, check_templates, payload_json
from carousel.payloads import render_payload as render_channel_payload
from carousel.ranking import RankingRules
from carousel.realtime import rank_campaign, render_request, sends_keep_micros, write_back
from carousel.schemas import (
    CONTROL_VARIANT,
    PAYLOAD_ID_HEADER,
)

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
REQUEST_ID_HEADER = "X-Request-Id"
# What an API answer's payload and outbox record carry as the trigger's event type.
API_TRIGGER_TYPE = "API Request"
# The configuration of the worker processes (uvicorn starts them by importing create_app).
ARGS_ENV = "CAROUSEL_API_ARGS"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_MICROS = 1_000_000
_WINDOW_MS = 2000  # a rate-limit window's counter outlives its second, then expires


class ErrorBody(BaseModel):
    """Every error answer's body."""

    error: str
    reason: str


class ApiError(Exception):
    """An answer other than 200: the status, a short code and the reason (returned as JSON)."""

    def __init__(self, status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason, self.headers = status, code, reason, headers or {}


# ---------------------------------------------------------------------------------------------
# The answer to one request (plain Python: what the HTTP handlers call)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiSpec:
    """Everything an API worker answers with, as plain values."""

    sources: LookupSources
    renderer: PayloadRenderer
    sent_topic: str
    recent_items: int
    sends_keep_us: int
    similar_filters: CampaignFilters

    @classmethod
    def of(cls, cfg: CarouselConfig, renderer: PayloadRenderer) -> ApiSpec:
        return cls(
            sources=LookupSources.of(
                cfg, tuple((name, c) for name, c in sorted(cfg.campaigns.items()) if c.enabled)
            ),
            renderer=renderer,
            sent_topic=cfg.kafka.topic("sent").name,
            recent_items=cfg.profiles.recent_items,
            sends_keep_us=sends_keep_micros(cfg),
            similar_filters=CampaignFilters(),
        )

    def campaign_slots(self, name: str) -> int:
        """How many items the campaign ranks (its ``items``; push: at most ``push_max_items``)."""
        return RankingRules.of(self.campaign(name), self.sources.serving).slots

    def campaign(self, name: str) -> Any:
        try:
            return self.sources.campaign(name)
        except KeyError:
            known = [n for n, _ in self.sources.campaigns]
            raise ApiError(
                404, "unknown_campaign", f"no enabled campaign {name!r}; enabled: {known}"
            ) from None


@dataclass(frozen=True)
class RecommendationRequest:
    user_id: str
    campaign: str
    request_id: str
    item_id: str | None = None
    n: int | None = None


@dataclass(frozen=True)
class ApiAnswer:
    payload: str  # the channel payload, JSON
    payload_id: str
    outbox: str  # the outbox record, JSON (recs.sent -> sent_recommendations)
    variant: str
    replayed: bool  # the same request id was answered before: the same answer again


def answer_key(request: RecommendationRequest) -> tuple[str, str]:
    """The online store's answered-trigger key of a request: (user, ``api:<campaign>:<id>``)."""
    return request.user_id, f"api:{request.campaign}:{request.request_id}"


def recommend(
    request: RecommendationRequest,
    store: OnlineState,
    lookups: ServingLookups,
    spec: ApiSpec,
    now_us: int,
    rate_counter: str | None = None,
    admit: Callable[[int], None] | None = None,
) -> ApiAnswer | None:
    """Rank, render and remember one request's answer (None: no eligible item).

    ``rate_counter`` is incremented in the same round trip as the user's state is read, and
    ``admit`` gets its new value (raising to refuse the request) before anything else happens.

    The answer is written to the online store before it is returned: the user's recent sends
    (so the sent-within exclusions of ``serve`` and later requests see it) and the answer under
    the request id (so a retry gets the same payload). Recording the outbox record is the
    caller's, after this returns. The frequency cap is not applied: a widget the user opened is
    not an unsolicited message.
    """
    campaign = spec.campaign(request.campaign)
    slots = spec.campaign_slots(request.campaign)
    if request.n is not None and request.n > slots:
        raise ApiError(
            422, "bad_n", f"n={request.n} is more than campaign {request.campaign!r} ranks ({slots} items)"
        )
    user, key = request.user_id, answer_key(request)
    states, answered, count = store.read_counting([user], [key], rate_counter, _WINDOW_MS)
    if admit is not None:
        admit(count)
    state = states[user]
    prior = answered.get(key)
    if prior is not None:
        shown = dict(prior.outbox[0])
    else:
        trigger = {
            "user_id": user,
            "event_id": f"api:{request.request_id}",
            "event_type": API_TRIGGER_TYPE,
            "event_time": now_us,
            "item_id": request.item_id,
        }
        found = rank_campaign(
            trigger,
            state,
            request.campaign,
            campaign,
            lookups,
            now_us,
            control_fallback=True,
            limit=request.n,
        )
        if found is None:
            return None
        shown = found
    control = shown["variant"] == CONTROL_VARIANT
    try:
        context = state.profile.user_context()
        payload = payload_json(
            render_channel_payload(render_request(shown, campaign.template, lookups, context), spec.renderer)
        )
    except (PayloadError, ValueError) as err:
        raise ApiError(500, "render_failed", f"campaign {request.campaign!r}: {err}") from None
    # A control-group user is shown the fallback but recorded as a hold-out (no items), as serve
    # records control: the report compares the arms against users who got no recommendation.
    outbox = {**shown, "items": [], "model_version": None} if control else shown
    if prior is None:
        if not control:
            items = [i["item_id"] for i in shown["items"]]
            state.record_send(shown["payload_id"], request.campaign, items, now_us)
        state.prune_sends(now_us - spec.sends_keep_us)
        write_back(
            store, states, {}, {key: Answer(-1, -1, (shown,))}, spec.recent_items, now_us - spec.sends_keep_us
        )
    return ApiAnswer(
        payload=payload,
        payload_id=shown["payload_id"],
        outbox=json.dumps(outbox, separators=(",", ":")),
        variant=shown["variant"],
        replayed=prior is not None,
    )


def similar_items(item_id: str, n: int, lookups: ServingLookups, filters: CampaignFilters) -> dict[str, Any]:
    """The item's published list cut to the products ``filters`` admit, with their catalog fields."""
    lists = lookups.lists(filters)
    code = lists.index.get(item_id)
    if code is None:
        raise ApiError(404, "unknown_item", f"no product {item_id!r} in the catalog")
    candidates = lists.candidates(code)[:n]
    versions = [version for _, _, version in candidates if version is not None]
    return {
        "item_id": item_id,
        "model_version": max(versions) if versions else None,
        "items": [
            {"item_id": item, "rank": rank, "score": score, **lookups.item_fields(item)}
            for rank, (item, score, _) in enumerate(candidates, start=1)
        ],
    }


# ---------------------------------------------------------------------------------------------
# One worker's service: store, lookups, outbox producer, keys
# ---------------------------------------------------------------------------------------------
class ApiService:
    """What one API worker process holds (built by :func:`create_app`)."""

    def __init__(self, cfg: CarouselConfig) -> None:
        self.cfg = cfg
        self.spec = ApiSpec.of(cfg, PayloadRenderer.from_config(cfg))
        serving = cfg.serving
        self.store = OnlineState(
            connect(cfg.online_store),
            cfg.online_store.key_prefix,
            round(cfg.online_store.profile_ttl_days * 86400 * 1000),
            round(serving.answered_ttl_hours * 3600 * 1000),
        )
        self.secrets = cfg.api.secrets()
        self.limits = {name: key.requests_per_second for name, key in cfg.api.keys.items()}
        self.ready = threading.Event()
        self.not_ready = "the lookups (catalog, matrix, trending) are loading"
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.producer: Any = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.producer = Producer(
            {
                **self.cfg.kafka.client_settings(),
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": self.cfg.api.outbox_linger_ms,
                "compression.type": self.cfg.kafka.producer.compression_type,
            }
        )
        for name, target in (("api-lookups", self._load_lookups), ("api-outbox", self._poll_producer)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        if self.producer is not None:
            left = self.producer.flush(self.cfg.api.record_timeout_ms / 1000)
            if left:
                log.warning("api: %d outbox records were not acknowledged at shutdown", left)

    def _load_lookups(self) -> None:
        """Load the lookups once (retrying while a table is missing), then report ready."""
        while not self._stopping.is_set():
            try:
                lookups = current_lookups(self.spec.sources)
                lookups.lists(self.spec.similar_filters).index  # noqa: B018 - built on first access
            except (ServingLookupError, OSError) as err:
                self.not_ready = f"the lookups cannot be loaded yet: {err}"
                log.warning("api: %s (retrying)", self.not_ready)
                self._stopping.wait(max(self.spec.sources.refresh_seconds, 1.0))
                continue
            self.ready.set()
            log.info("api: ready (lookups at versions %s)", lookups.versions)
            return

    def _poll_producer(self) -> None:
        while not self._stopping.is_set():
            self.producer.poll(0.05)  # runs the delivery callbacks

    # -- per request -----------------------------------------------------------------------------
    def lookups(self) -> ServingLookups:
        if not self.ready.is_set():
            raise ApiError(503, "not_ready", self.not_ready, {"Retry-After": "1"})
        return current_lookups(self.spec.sources)

    def authorize(self, key: str | None) -> str:
        """The name of the API key presented (401 when none or an unknown one)."""
        if not key:
            raise ApiError(401, "unauthorized", f"missing {API_KEY_HEADER} header")
        name = next((n for n, secret in self.secrets.items() if hmac.compare_digest(secret, key)), None)
        if name is None:
            raise ApiError(401, "unauthorized", f"the {API_KEY_HEADER} header holds no configured API key")
        return name

    def rate_counter(self, name: str) -> str:
        """The online store's counter of key ``name`` in the current one-second window."""
        return f"{self.store.prefix}:api-rate:{name}:{int(time.time())}"

    def admit(self, name: str, count: int | None = None) -> None:
        """429 when key ``name`` is over its limit; ``count``: this window's count when the caller
        already incremented it (with its state read), else it is incremented here."""
        if count is None:
            counter = self.rate_counter(name)
            pipe = self.store.client.pipeline(transaction=False)
            pipe.incr(counter)
            pipe.pexpire(counter, _WINDOW_MS)
            count, _ = pipe.execute()
        limit = self.limits[name]
        if count > limit:
            raise ApiError(
                429,
                "rate_limited",
                f"API key {name!r} is over its limit of {limit:g} requests per second",
                {"Retry-After": "1"},
            )

    async def record(self, user_id: str, answer: ApiAnswer) -> None:
        """Put the answer's outbox record on the broker; returns once it is acknowledged.

        ``produce`` only queues the record; librdkafka sends it, and the delivery report, run by
        the producer's poll thread, settles this request's future on the event loop."""
        loop = asyncio.get_running_loop()
        acknowledged: asyncio.Future[Any] = loop.create_future()

        def delivered(err: Any, _msg: Any) -> None:
            loop.call_soon_threadsafe(_settle, acknowledged, err)

        timeout = self.cfg.api.record_timeout_ms / 1000
        try:
            self.producer.produce(
                self.spec.sent_topic,
                key=user_id.encode(),
                value=answer.outbox.encode(),
                headers=[(PAYLOAD_ID_HEADER, answer.payload_id.encode())],
                on_delivery=delivered,
            )
        except (BufferError, KafkaException) as err:
            raise ApiError(503, "not_recorded", f"the outbox cannot take the answer: {err}") from None
        try:
            err = await asyncio.wait_for(acknowledged, timeout)
        except TimeoutError:
            raise ApiError(
                503,
                "not_recorded",
                f"the broker did not acknowledge the outbox record within {timeout:g}s; retry with the "
                f"same {REQUEST_ID_HEADER} to get the same answer",
                {"Retry-After": "1"},
            ) from None
        if err is not None:
            raise ApiError(503, "not_recorded", f"the outbox record was refused: {err}", {"Retry-After": "1"})


def _settle(future: asyncio.Future[Any], err: Any) -> None:
    if not future.done():  # a request that timed out no longer waits
        future.set_result(err)


# ---------------------------------------------------------------------------------------------
# Metrics (Prometheus; multiprocess mode when api.metrics_dir is set up by main)
# ---------------------------------------------------------------------------------------------
class _Metrics:
    def __init__(self) -> None:
        # Imported here, not at module level: in multiprocess mode prometheus_client must see
        # PROMETHEUS_MULTIPROC_DIR, set by main before the workers import it.
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("carousel_api_requests", "HTTP requests answered", ["endpoint", "status"])
        self.latency = Histogram(
            "carousel_api_request_seconds",
            "Time to answer a request, in the worker",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.answers = Counter(
            "carousel_api_answers", "Recommendation answers by outcome", ["campaign", "outcome"]
        )
        self.lookups_version = Gauge(
            "carousel_api_lookups_version",
            "Delta table version of the lookups held",
            ["table"],
            multiprocess_mode="max",
        )

    @staticmethod
    def render() -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


_METRICS: _Metrics | None = None


def _metrics() -> _Metrics:
    global _METRICS  # noqa: PLW0603 - one set of collectors per process (prometheus registers by name)
    if _METRICS is None:
        _METRICS = _Metrics()
    return _METRICS


class _Timing:
    """ASGI middleware: each request's status and time, by endpoint (not by raw path)."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def capture(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send=capture)
        finally:
            endpoint = getattr(scope.get("endpoint"), "__name__", "unmatched")
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# The HTTP app
# ---------------------------------------------------------------------------------------------
def _config_from_env() -> CarouselConfig:
    args = json.loads(os.environ.get(ARGS_ENV) or "{}")
    return load_config(args.get("config", []), args.get("overrides", []))


def create_app(cfg: CarouselConfig | None = None) -> _Timing:
    """The FastAPI app of one worker (uvicorn calls this in each worker process)."""
    setup_logging()
    cfg = cfg or _config_from_env()
    service = ApiService(cfg)
    metrics = _metrics()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="carousel recommendations API",
        version="1",
        description=(__doc__ or "").split("\n\n")[0],
        lifespan=lifespan,
    )
    app.state.service = service

    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": text}
        for status, text in (
            (401, "no or an unknown API key"),
            (404, "unknown campaign or item"),
            (422, "a bad parameter"),
            (429, "the API key is over its rate limit"),
            (503, "not ready, or the online store or broker is unavailable"),
        )
    }

    def error(status: int, code: str, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": code, "reason": reason}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return error(err.status, err.code, err.reason, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(_request: Request, err: RequestValidationError) -> JSONResponse:
        reasons = [
            f"{' '.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in err.errors()
        ]
        return error(422, "bad_parameter", "; ".join(reasons))

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else "http_error"
        return error(err.status_code, code, str(err.detail), dict(err.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        # Logged with its traceback here; the client gets the reason's class, never the traceback.
        reference = uuid.uuid4().hex[:12]
        log.error(
            "api: %s %s failed (reference %s)", request.method, request.url.path, reference, exc_info=err
        )
        if isinstance(err, OnlineStoreError | ConnectionError | TimeoutError) or type(
            err
        ).__module__.startswith("redis"):
            return error(503, "store_unavailable", f"the online store is unavailable (reference {reference})")
        return error(500, "internal", f"internal error, logged with reference {reference}")

    # The handlers run on the worker's event loop, and call the online store synchronously: a
    # request's work is CPU (ranking, rendering) plus two sub-millisecond round trips to a nearby
    # Redis; FastAPI's thread pool cost slightly more CPU for the same latency (README "API").
    # Only the broker's acknowledgement, milliseconds away, is awaited. Throughput comes from the
    # worker processes (api.workers).
    @app.get(
        "/v1/users/{user_id}/recommendations",
        responses={
            200: {
                "description": "the campaign channel's payload (conf/payload_schemas/<channel>.schema.json)"
            },
            204: {"description": "no eligible item for this user"},
            **errors,
        },
    )
    async def recommendations(
        user_id: str = PathParam(min_length=1, max_length=256),
        campaign: str = Query(min_length=1, max_length=128, description="an enabled campaign of conf/"),
        item_id: str | None = Query(None, min_length=1, max_length=256, description="the product on screen"),
        n: int | None = Query(
            None, ge=1, le=50, description="at most this many items (up to the campaign's)"
        ),
        api_key: str | None = Header(None, alias=API_KEY_HEADER),
        request_id: str | None = Header(None, alias=REQUEST_ID_HEADER),
    ) -> Response:
        """A user's recommendations for one campaign, as its channel's payload."""
        name = service.authorize(api_key)
        if request_id is not None and not _REQUEST_ID.match(request_id):
            raise ApiError(
                422,
                "bad_request_id",
                f"{REQUEST_ID_HEADER} must be 1-128 of A-Z a-z 0-9 . _ : - (got {request_id!r})",
            )
        request = RecommendationRequest(user_id, campaign, request_id or uuid.uuid4().hex, item_id, n)
        lookups = service.lookups()
        answer = recommend(
            request,
            service.store,
            lookups,
            service.spec,
            time.time_ns() // 1000,
            service.rate_counter(name),
            partial(service.admit, name),
        )
        if answer is None:
            metrics.answers.labels(campaign, "no_items").inc()
            return Response(status_code=204, headers={REQUEST_ID_HEADER: request.request_id})
        await service.record(user_id, answer)
        outcome = (
            "replayed"
            if answer.replayed
            else ("control" if answer.variant == CONTROL_VARIANT else "answered")
        )
        metrics.answers.labels(campaign, outcome).inc()
        return Response(
            answer.payload,
            media_type="application/json",
            headers={REQUEST_ID_HEADER: request.request_id, "X-Payload-Id": answer.payload_id},
        )

    @app.get("/v1/items/{item_id}/similar", responses=errors)
    async def similar(
        item_id: str = PathParam(min_length=1, max_length=256),
        n: int = Query(cfg.api.default_similar, ge=1, le=cfg.api.max_similar),
        campaign: str | None = Query(None, min_length=1, max_length=128, description="use its filters"),
        api_key: str | None = Header(None, alias=API_KEY_HEADER),
    ) -> dict[str, Any]:
        """The item's published similar items that the catalog offers now."""
        service.admit(service.authorize(api_key))
        filters = service.spec.campaign(campaign).filters if campaign else service.spec.similar_filters
        return similar_items(item_id, n, service.lookups(), filters)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The worker answers (liveness)."""
        return {"status": "ok"}

    @app.get(
        "/readyz", responses={503: {"model": ErrorBody, "description": "the lookups are not loaded yet"}}
    )
    async def readyz() -> dict[str, Any]:
        """The worker's lookups are loaded (readiness)."""
        lookups = service.lookups()
        for table, version in lookups.versions.items():
            if version is not None:
                metrics.lookups_version.labels(table).set(version)
        return {"status": "ready", "versions": lookups.versions}

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics, summed over the worker processes."""
        body, content_type = _Metrics.render()
        return Response(body, media_type=content_type)

    return _Timing(app, metrics)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def _prepare_metrics_dir(path: str) -> None:
    """An empty folder for the workers' Prometheus files (stale ones would be summed in)."""
    folder = Path(path)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="api", description=(__doc__ or "").splitlines()[0]))
    parser.add_argument("--host", help="listen address (default api.host)")
    parser.add_argument("--port", type=int, help="listen port (default api.port)")
    parser.add_argument("--workers", type=int, help="worker processes (default api.workers)")
    args = parser.parse_args(argv)
    flags = {"host": args.host, "port": args.port, "workers": args.workers}
    extra = [f"api.{name}={value}" for name, value in flags.items() if value is not None]
    cfg = config_from_args(args, "api", extra)
    if not cfg.api.secrets():
        envs = sorted(key.env for key in cfg.api.keys.values())
        log.error("api cannot start: no API key in the environment; set one of %s", envs)
        return 2
    try:
        check_reachable(cfg.online_store)
        check_templates(cfg)
        # Every answer waits for the broker's acknowledgement: a missing broker or outbox topic
        # is a start-up error, not a 503 on every request.
        kafka = cfg.kafka
        topics = wait_until_reachable(
            kafka.bootstrap_servers, cfg.api.record_timeout_ms / 1000, kafka.client_settings()
        )
    except (OnlineStoreError, TemplateCheckError, TimeoutError, BrokerError) as err:
        log.error("api cannot start: %s", err)
        return 1
    if kafka.topic("sent").name not in topics:
        log.error(
            "api cannot start: the outbox topic %r does not exist on %s; create the topics with "
            "`./spark-submit.sh broker topics`",
            kafka.topic("sent").name,
            kafka.bootstrap_servers,
        )
        return 1
    _prepare_metrics_dir(cfg.api.metrics_dir)
    os.environ[ARGS_ENV] = json.dumps({"config": args.config, "overrides": [*args.overrides, *extra]})
    keys = sorted(cfg.api.secrets())
    log.info(
        "api on http://%s:%d with %d workers; keys %s", cfg.api.host, cfg.api.port, cfg.api.workers, keys
    )
    import uvicorn

    uvicorn.run(
        "carousel.api:create_app",
        factory=True,
        host=cfg.api.host,
        port=cfg.api.port,
        workers=cfg.api.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
    return 0
