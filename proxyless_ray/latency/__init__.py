"""Latency models: what a layer costs on a hardware platform.

Interface (``model``), profiles (``profile``), predictors (``predictor``), the profiler (``profiler``), device
fingerprints (``fingerprint``), this machine's CPU as a target (``local``: ``cpu_local``), end-to-end checks and
calibration (``check``), and a search's target resolved once (``target``: :class:`HardwareTarget`). Imports go one
way: ``fingerprint`` and ``profile`` import neither of the others, ``profiler`` uses both, ``local`` and ``check``
use the profiler; ``model`` loads profiles and ``cpu_local`` lazily; ``target`` sits on top of ``model``.
"""

from proxyless_ray.latency.model import FlopsLatencyModel, LatencyModel, arch_latency, load_latency_model

__all__ = ["FlopsLatencyModel", "LatencyModel", "arch_latency", "load_latency_model"]
