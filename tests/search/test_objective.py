"""Latency loss forms and the differentiable expected latency."""

import math

import pytest
import torch

from proxyless_ray.latency.expected import SupernetLatency
from proxyless_ray.latency.model import FlopsLatencyModel, arch_latency
from proxyless_ray.nn.space import SearchSpace
from proxyless_ray.nn.supernet import SuperNet
from proxyless_ray.search.objective import add_loss, latency_objective, mul_log_loss


class TableModel:
    """A latency model from a dict: latency = 1 + k + 2 * e + width / 100 (easy to compute by hand)."""

    name = "table"

    def lat_ms(self, block, in_chs, resolution):
        if block.startswith("fc"):
            return 0.5
        parts = {p[0]: p[1:] for p in block.split("_")[1:]}
        return 1 + int(parts["k"]) + 2 * int(parts.get("e", 0)) + int(parts["c"]) / 100


def test_expected_latency_equals_hand_sum():
    space = SearchSpace(widths=(8, 16), depths=(2, 1), strides=(1, 2), feature_mix_chs=0)
    net = SuperNet(space)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 1)
    model = TableModel()
    lat = SupernetLatency(model, space)
    hand = sum(model.lat_ms(layer.block, 0, 0) for layer in space.fixed_layers())
    for slot, a in zip(space.slots(), net.arch_parameters()):
        p = torch.softmax(a.detach(), 0)
        lats = [0.0 if c == "zero" else model.lat_ms(c, 0, 0) for c in slot.candidates]
        hand += sum(float(p[i]) * lat for i, lat in enumerate(lats))
    expected = lat.expected(net.arch_parameters())
    assert math.isclose(float(expected.detach()), hand, rel_tol=1e-6)
    expected.backward()  # differentiable in alpha
    assert all(a.grad is not None for a in net.arch_parameters())
    # one sub-network's latency is the architecture's latency
    choices = net.argmax_choices()
    assert math.isclose(lat.of_choices(choices), arch_latency(model, space.arch_from_choices(choices))[0],
                        rel_tol=1e-6)


def test_add_and_mul_log_forms():
    ce, lat = torch.tensor(2.0), torch.tensor(30.0)
    assert float(add_loss(ce, lat, 0.1, 20.0)) == pytest.approx(2.0 + 0.1 * 0.5)
    expected = 0.2 * 2.0 * (math.log(30) / math.log(20)) ** 0.3
    assert float(mul_log_loss(ce, lat, 0.2, 0.3, 20.0)) == pytest.approx(expected)
    assert float(latency_objective("none", ce, lat)) == 2.0


@pytest.mark.parametrize("call,fragment", [
    (lambda: add_loss(torch.tensor(1.0), torch.tensor(1.0), -0.1, 1.0), "lambda must be >= 0, got -0.1"),
    (lambda: mul_log_loss(torch.tensor(1.0), torch.tensor(1.0), 1.0, 0.3, 0.0), "target latency must be > 0"),
    (lambda: latency_objective("mul", torch.tensor(1.0), torch.tensor(1.0)), "unknown latency loss 'mul'"),
])
def test_bad_coefficients(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def test_flops_model_is_monotone_in_kernel_and_expansion():
    m = FlopsLatencyModel()
    k3e3, k7e3, k7e6 = (m.lat_ms(b, 24, 14) for b in ("mb_k3_e3_c24_s1", "mb_k7_e3_c24_s1", "mb_k7_e6_c24_s1"))
    assert k3e3 < k7e3 < k7e6
