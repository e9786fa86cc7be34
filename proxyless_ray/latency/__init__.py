"""Latency models: what a layer costs on a hardware platform (interface, profiles, predictors, profiler)."""

from proxyless_ray.latency.model import FlopsLatencyModel, LatencyModel, arch_latency, load_latency_model

__all__ = ["FlopsLatencyModel", "LatencyModel", "arch_latency", "load_latency_model"]
