"""Prometheus metrics for GET /metrics: HTTP traffic, generations and the model cache, in one registry per studio.

Names follow the OpenTelemetry GenAI semantic conventions as Prometheus spells them (`gen_ai.server.request.
duration` -> `gen_ai_server_request_duration_seconds`), with vLLM's names where OpenTelemetry has none (queue
time, prompt and generation token counters). HTTP metrics use the usual `http_requests_total` /
`http_request_duration_seconds`, labelled by route template (never the raw path, which would let any client
create label values). Model-cache metrics are the studio's own (`studio_model_*`).

Generation metrics are fed from the request-log rows (so they count exactly what the log holds, UI and API
alike), cache metrics from the cache's listener, and resident bytes are read from the cache at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from studio.cache import CacheEvent, ModelCache
from studio.telemetry.requestlog import RequestLog

# Generations run from milliseconds (a tiny model, a warm hit) to minutes (a large image batch on a CPU).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
FIRST_OUTPUT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


class Metrics:
    """The studio's metrics. `watch(cache, log)` connects the feeds; the HTTP middleware calls `observe_http`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = _HttpCollector()
        r.register(self.http)
        self.requests = Counter("gen_ai_server_requests", "Generations by model, client and status (ok, error, "
                                "stopped).", ["model", "modality", "client", "status"], registry=r)
        self.duration = Histogram("gen_ai_server_request_duration_seconds",
                                  "End-to-end generation latency, queue and model load included.",
                                  ["model", "modality"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_output = Histogram("gen_ai_server_time_to_first_token_seconds",
                                      "Time to the first token, diffusion step or audio piece.",
                                      ["model", "modality"], buckets=FIRST_OUTPUT_BUCKETS, registry=r)
        self.per_token = Histogram("gen_ai_server_time_per_output_token_seconds",
                                   "Time per output token after the first (chat).", ["model"],
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.queue = Histogram("gen_ai_server_request_queue_time_seconds",
                               "Time waiting for a free slot of the model (per-model concurrency limit).",
                               ["model", "modality"], buckets=FIRST_OUTPUT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gen_ai_server_prompt_tokens", "Prompt tokens processed.", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("gen_ai_server_generation_tokens", "Tokens generated.", ["model"],
                                         registry=r)
        self.audio = Counter("studio_audio_seconds", "Seconds of audio heard (speech-to-text) or spoken "
                             "(text-to-speech).", ["model", "modality"], registry=r)
        self.characters = Counter("studio_transcribed_characters", "Characters of text transcribed.", ["model"],
                                  registry=r)
        self.cache_hits = Counter("studio_model_cache_hits", "Requests that found their model resident.",
                                  ["model"], registry=r)
        self.loads = Counter("studio_model_loads", "Model loads by outcome (ok, failed).", ["model", "outcome"],
                             registry=r)
        self.load_duration = Histogram("studio_model_load_duration_seconds", "Time to load a model.", ["model"],
                                       buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter("studio_model_evictions", "Models evicted from memory.", ["model"], registry=r)

    def watch(self, cache: ModelCache, log: RequestLog) -> None:
        """Feed generation metrics from the log's rows and cache metrics from the cache's events."""
        log.add_listener(self.observe_row)
        cache.add_listener(self.observe_cache_event)
        self.registry.register(_ResidentCollector(cache, log))

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http.observe(method, route, status, seconds)

    def observe_row(self, row: dict) -> None:
        """One request-log row: count it and observe its latencies and tokens."""
        model, modality = row["model"] or "unknown", row["modality"] or "unknown"
        self.requests.labels(model, modality, row["client"] or "unknown", row["status"]).inc()
        latency, first = row["latency_ms"], row["ttft_ms"]
        if latency is not None:
            self.duration.labels(model, modality).observe(latency / 1000)
        if first is not None:
            self.first_output.labels(model, modality).observe(first / 1000)
        if row["queue_ms"] is not None:
            self.queue.labels(model, modality).observe(row["queue_ms"] / 1000)
        if row["prompt_tokens"]:
            self.prompt_tokens.labels(model).inc(row["prompt_tokens"])
        audio = row.get("audio_in_seconds") or row.get("audio_seconds")  # the columns of the speech modalities
        if audio:
            self.audio.labels(model, modality).inc(audio)
        if row.get("characters"):
            self.characters.labels(model).inc(row["characters"])
        completion = row["completion_tokens"]
        if completion:
            self.generation_tokens.labels(model).inc(completion)
            if completion > 1 and latency is not None and first is not None and latency > first:
                self.per_token.labels(model).observe((latency - first) / 1000 / (completion - 1))

    def observe_cache_event(self, event: CacheEvent) -> None:
        """A ModelCache listener."""
        if event.kind == "hit":
            self.cache_hits.labels(event.model).inc()
        elif event.kind == "load":
            self.loads.labels(event.model, "ok").inc()
            self.load_duration.labels(event.model).observe(event.seconds or 0.0)
        elif event.kind == "load_failed":
            self.loads.labels(event.model, "failed").inc()
        elif event.kind == "evict":
            self.evictions.labels(event.model).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)


class _HttpCollector:
    """HTTP request counts and durations, kept in plain lists: the middleware updates them on every request, so
    the hot path is a dict look-up and a bisect, without the locks of prometheus_client's metric objects (the
    server's event loop is the only writer)."""

    def __init__(self, buckets: tuple[float, ...] = HTTP_BUCKETS):
        self.buckets = buckets
        self._series: dict[tuple[str, str, int], list] = {}  # key -> [count, sum, count per bucket..., over]

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        series = self._series.get((method, route, status))
        if series is None:
            series = self._series[(method, route, status)] = [0, 0.0] + [0] * (len(self.buckets) + 1)
        series[0] += 1
        series[1] += seconds
        series[2 + bisect_left(self.buckets, seconds)] += 1

    def collect(self) -> Iterator[Metric]:
        labels = ["method", "route", "status"]
        requests = CounterMetricFamily("http_requests", "HTTP requests by method, route template and status code.",
                                       labels=labels)
        duration = HistogramMetricFamily("http_request_duration_seconds",
                                         "HTTP request duration until the last byte of the response.", labels=labels)
        for (method, route, status), series in list(self._series.items()):
            values = [method, route, str(status)]
            count, total, per_bucket = series[0], series[1], series[2:]
            requests.add_metric(values, count)
            cumulative, buckets = 0, []
            for bound, n in zip((*map(floatToGoString, self.buckets), "+Inf"), per_bucket):
                cumulative += n
                buckets.append((bound, cumulative))
            duration.add_metric(values, buckets, total)
        yield requests
        yield duration


class _ResidentCollector:
    """Read at scrape time: what is in memory now, and how many log rows the disk refused."""

    def __init__(self, cache: ModelCache, log: RequestLog):
        self.cache = cache
        self.log = log

    def collect(self) -> Iterator[Metric]:
        snap = self.cache.snapshot()
        resident = GaugeMetricFamily("studio_model_resident_bytes", "Memory held by each resident model.",
                                     labels=["model", "modality"])
        for model in snap.models:
            resident.add_metric([model.id, model.modality], model.bytes)
        yield resident
        yield GaugeMetricFamily("studio_model_memory_budget_bytes", "Memory the model cache may use.",
                                value=snap.budget_bytes)
        yield GaugeMetricFamily("studio_model_memory_used_bytes", "Memory the model cache uses now.",
                                value=snap.used_bytes)
        yield CounterMetricFamily("studio_request_log_write_errors", "Log rows the disk refused.",
                                  value=self.log.write_errors)
