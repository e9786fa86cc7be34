"""Latency models: what a layer costs on a hardware platform.

Interface (``model``), profiles (``profile``), predictors (``predictor``), the profiler (``profiler``), device
fingerprints (``fingerprint``), this machine's CPU as a target (``local``: ``cpu_local``) and end-to-end checks and
calibration (``check``). Imports go one way: fingerprint -> profile -> profiler -> local / check; ``model`` loads
profiles and ``cpu_local`` lazily.
"""

from proxyless_ray.latency.model import FlopsLatencyModel, LatencyModel, arch_latency, load_latency_model

__all__ = ["FlopsLatencyModel", "LatencyModel", "arch_latency", "load_latency_model"]
