"""The server's Prometheus metrics, named after vLLM's (``jneox:`` for ``vllm:``) so that its dashboards
carry over with a change of prefix. Each :class:`Metrics` has a registry of its own (two engines in one
process never share counts). The engine thread updates counters and histograms as it works (a lock and
an addition each); gauges are read when scraped, from the functions given to :meth:`Metrics.gauges`.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# seconds: from a few milliseconds (a small model's decode step) to minutes (a long queue on a CPU)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
FINISH_REASONS = ("stop", "length", "abort", "error")  # "abort": the client went away; "error": it failed


class Metrics:
    def __init__(self, model_name: str = "jneox"):
        self.registry = r = CollectorRegistry(auto_describe=True)
        labels = {"labelnames": ["model_name"], "registry": r}
        self.model_name = model_name
        # the engine updates these children (the labelled series) directly
        self.running = Gauge("jneox:num_requests_running", "Requests in a KV-cache slot, decoding.", **labels)
        self.waiting = Gauge("jneox:num_requests_waiting", "Requests waiting for a slot.", **labels)
        self.kv_usage = Gauge("jneox:kv_cache_usage_perc",
                              "Share of the KV cache's positions (slots x window) that running requests hold, 0-1.",
                              **labels)
        self.prefix_usage = Gauge("jneox:prefix_cache_usage_perc",
                                  "Share of the prefix cache's budget (--prefix-cache-mb) in use, 0-1.", **labels)
        self.prefix_queries = Counter("jneox:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.", **labels)
        self.prefix_hits = Counter("jneox:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache (not computed again).", **labels)
        self.prompt_tokens = Counter("jneox:prompt_tokens", "Prompt tokens of admitted requests.", **labels)
        self.generation_tokens = Counter("jneox:generation_tokens", "Tokens generated.", **labels)
        self.success = Counter("jneox:request_success", "Requests ended, by finish reason.",
                               labelnames=["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("jneox:time_to_first_token_seconds",
                              "From a request's arrival at the engine to its first token.",
                              buckets=LATENCY_BUCKETS, **labels)
        self.itl = Histogram("jneox:inter_token_latency_seconds", "Between a request's consecutive tokens.",
                             buckets=LATENCY_BUCKETS, **labels)
        self.e2e = Histogram("jneox:e2e_request_latency_seconds", "From a request's arrival to its end.",
                             buckets=LATENCY_BUCKETS, **labels)
        for name in ("running", "waiting", "kv_usage", "prefix_usage", "prefix_queries", "prefix_hits",
                     "prompt_tokens", "generation_tokens", "ttft", "itl", "e2e"):
            setattr(self, name, getattr(self, name).labels(model_name))
        # every series from the start, so that rate() sees the first increase
        self.finished = {reason: self.success.labels(model_name, reason) for reason in FINISH_REASONS}

    def gauges(self, running: Callable[[], float], waiting: Callable[[], float], kv_usage: Callable[[], float],
               prefix_usage: Callable[[], float]) -> None:
        """The functions that the gauges read when scraped."""
        for gauge, fn in ((self.running, running), (self.waiting, waiting), (self.kv_usage, kv_usage),
                          (self.prefix_usage, prefix_usage)):
            gauge.set_function(fn)

    def exposition(self) -> bytes:
        """The text a scrape answers (Prometheus' text format)."""
        return generate_latest(self.registry)
