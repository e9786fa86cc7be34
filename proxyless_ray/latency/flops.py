"""Analytic cost of a layer from its block string and input shape: MACs, bytes moved, kernel launches.

Pure Python. These counts are the features latency predictors fit on, and the placeholder FLOPs model's input.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxyless_ray.nn.arch import out_resolution, parse_block


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer at batch 1, float32."""

    macs: float  # multiply-accumulates
    bytes: float  # activations read + written and weights read, in bytes
    kernels: int  # conv / linear kernels launched (a fixed per-kernel overhead dominates small layers)
    dw_macs: float = 0.0  # MACs of the depthwise conv (memory-bound on most hardware)


def layer_cost(block: str, in_chs: int, resolution: int, dtype_bytes: int = 4) -> LayerCost:
    """MACs, bytes moved and kernel count of ``block`` applied to an ``in_chs x resolution x resolution`` input.

    ``fc_c<N>`` is global pooling plus the classifier; ``zero`` costs nothing.
    """
    hw_in = resolution * resolution
    if block.startswith("fc_c"):
        n = int(block[4:])
        macs = in_chs * n + in_chs * hw_in  # linear + pooling adds
        byt = (in_chs * hw_in + in_chs * n + n) * dtype_bytes
        return LayerCost(macs, byt, 2)
    spec = parse_block(block)
    if spec.is_zero:
        return LayerCost(0.0, 0.0, 0)
    out_res = out_resolution(resolution, spec.stride)
    hw_out = out_res * out_res
    k2 = spec.kernel_size * spec.kernel_size
    if spec.kind == "conv":
        macs = in_chs * spec.out_chs * k2 * hw_out
        byt = (in_chs * hw_in + spec.out_chs * hw_out + in_chs * spec.out_chs * k2) * dtype_bytes
        return LayerCost(macs, byt, 1)
    mid = in_chs * spec.exp_ratio
    macs = 0.0
    acts = in_chs * hw_in
    kernels = 2
    weights = mid * k2 + mid * spec.out_chs
    if spec.exp_ratio != 1:
        macs += in_chs * mid * hw_in
        acts += 2 * mid * hw_in
        weights += in_chs * mid
        kernels += 1
    dw = mid * k2 * hw_out
    macs += dw + mid * spec.out_chs * hw_out
    acts += 2 * mid * hw_out + spec.out_chs * hw_out
    if spec.stride == 1 and in_chs == spec.out_chs:
        acts += 2 * spec.out_chs * hw_out  # residual add
    return LayerCost(macs, (acts + weights) * dtype_bytes, kernels, dw)
