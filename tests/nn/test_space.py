"""Search space: generated candidates, zero-op placement, presets, fingerprints."""

import random

import pytest

from proxyless_ray.nn.space import PRESETS, SearchSpace, candidate_blocks, space_from_preset


def test_imagenet_preset_matches_paper():
    sp = space_from_preset("proxyless_imagenet")
    slots = sp.slots()
    assert len(slots) == 21
    assert sum(s.has_zero for s in slots) == 15  # as in super_proxyless.py
    assert [s.resolution for s in slots if s.position == 0] == [112, 56, 28, 14, 14, 7]
    assert len(slots[1].candidates) == 7 and slots[1].candidates[-1] == "zero"
    assert sp.fixed_layers()[0].key == "conv_k3_c32_s2@3x224x224"
    assert [lay.block for lay in sp.fixed_layers()] == ["conv_k3_c32_s2", "mb_k3_e1_c16_s1", "conv_k1_c1280_s1",
                                                         "fc_c1000"]


def test_candidates_generated_from_product():
    c = candidate_blocks(24, 24, 1, (3, 5), (2, 4, 6), zero=True)
    assert c == ("mb_k3_e2_c24_s1", "mb_k3_e4_c24_s1", "mb_k3_e6_c24_s1", "mb_k5_e2_c24_s1", "mb_k5_e4_c24_s1",
                 "mb_k5_e6_c24_s1", "zero")


@pytest.mark.parametrize("in_chs,out_chs,stride", [(24, 24, 2), (16, 24, 1)])
def test_zero_refused_where_paper_forbids(in_chs, out_chs, stride):
    with pytest.raises(ValueError, match=f"zero op requested on a layer with stride {stride}"):
        candidate_blocks(in_chs, out_chs, stride, (3,), (3,), zero=True)


def test_zero_only_on_stride1_same_width():
    for s in SearchSpace().slots():
        assert s.has_zero == (s.stride == 1 and s.in_chs == s.out_chs)


def test_choices_round_trip():
    sp = SearchSpace()
    rng = random.Random(0)
    for _ in range(5):
        arch = sp.sample(rng)
        assert sp.arch_from_choices(sp.choices_of(arch)) == arch


def test_bad_space_values():
    with pytest.raises(ValueError, match="kernel size 4"):
        SearchSpace(kernel_sizes=(3, 4))
    with pytest.raises(ValueError, match="stride 3"):
        SearchSpace(strides=(1, 3, 2, 1))
    with pytest.raises(ValueError, match="same length"):
        SearchSpace(widths=(16, 24))
    with pytest.raises(ValueError, match="unknown search-space preset 'tiny'"):
        space_from_preset("tiny")


def test_fingerprint_tracks_shape_not_name():
    a, b = SearchSpace(), SearchSpace(preset="renamed")
    assert a.fingerprint() == b.fingerprint()
    assert SearchSpace(kernel_sizes=(3, 5)).fingerprint() != a.fingerprint()
    assert set(PRESETS) == {"small", "proxyless_imagenet"}
