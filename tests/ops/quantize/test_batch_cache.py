"""BatchCache: one tensor for every calibration batch, rewritten in place while the shape holds."""

import torch

from modelsurgery.ops.quantize.reconstruct import BatchCache


def test_batches_are_views_of_one_tensor_and_map_keeps_it_when_the_shape_holds():
    parts = [torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4)]
    cache = BatchCache.build([3, 3, 2], lambda j: parts[j])
    assert cache.data.shape == (8, 4) and len(cache) == 3
    for j, p in enumerate(parts):
        assert torch.equal(cache[j], p)
        assert cache[j].data_ptr() == cache.data[sum(len(q) for q in parts[:j]):].data_ptr()
    storage = cache.data.data_ptr()
    cache.map_(lambda j, h: h * 2 + j)
    assert cache.data.data_ptr() == storage  # rewritten in place
    for j, p in enumerate(parts):
        assert torch.equal(cache[j], p * 2 + j)


def test_map_to_another_shape_builds_a_new_tensor():
    cache = BatchCache.build([2, 1], lambda j: torch.full((2, 3) if j == 0 else (1, 3), float(j)))
    cache.map_(lambda j, h: torch.cat([h, h], 1))
    assert cache.data.shape == (3, 6)
    assert torch.equal(cache[1], torch.ones(1, 6))


def test_empty_cache():
    cache = BatchCache.build([], lambda j: None)
    cache.map_(lambda j, h: h)
    assert cache.data is None and list(cache) == []
