"""The fused head, its GGN product, the sampler and the training step on 8 host devices.

One subprocess (``tests/scripts/sharded.py``) measures every mesh kind against one device;
these tests read its JSON. Per-device work is read from the compiled program: no all-gather as
large as one device's share of ``x`` (the tokens never move), dots of ``[chunk, block]``, and
``W`` sharded FSDP-style gathered once per call.
"""

import pytest

from _scripts import run_script

N, D, L = 512, 32, 300
SHARE = N // 8 * D  # one device's share of x, in elements
FLOAT32_RTOL = 1e-5  # float32 sums taken in another order (relative to the largest entry)


@pytest.fixture(scope="module")
def measured():
    return run_script("sharded.py", devices=8)


MESHES = ["auto", "explicit", "auto_2d", "explicit_2d", "set_mesh"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_fused_loss_with_sharded_tokens_equals_one_device_and_keeps_them(measured, mesh):
    for case, m in measured[mesh]["head"].items():
        assert m["error"] <= FLOAT32_RTOL, (case, m["error"])
        assert m["dx"][0] == "data", (case, m["dx"])
        assert all(g < SHARE for g in m["gathers"]), (case, m["gathers"])
        assert "16,128" in m["dots"], m["dots"]  # [chunk, block] logits, no [N, L]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES[:4])
def test_fsdp_w_is_gathered_once_and_ggn_and_samples_follow_the_tokens(measured, mesh):
    m = measured[mesh]
    assert m["layouts"]["labels_only"] <= FLOAT32_RTOL  # x replicated, labels sharded
    assert m["layouts"]["x_features"] <= FLOAT32_RTOL  # x sharded on its features
    assert m["fsdp"]["error"] <= FLOAT32_RTOL
    assert m["fsdp"]["gathers"] == [D * L]  # W, once: not per chunk, and never x
    assert m["ggn"]["error"] <= FLOAT32_RTOL
    assert m["ggn"]["gx"][0] == "data"
    assert all(g < SHARE for g in m["ggn"]["gathers"])
    assert m["samples"]["equal"]
    assert m["samples"]["spec"] == ["data"]
    assert all(g < SHARE for g in m["samples"]["gathers"])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_training_step_on_the_mesh_with_and_without_microbatches_equals_one_device(measured, mesh):
    for k, err in measured[mesh]["steps"].items():
        assert err <= FLOAT32_RTOL, (k, err)


@pytest.mark.slow
def test_vocab_parallel_on_every_mesh_kind_and_2d(measured):
    for name, m in measured["vocab_parallel"].items():
        assert m["error"] <= FLOAT32_RTOL, (name, m["error"])
        assert m["dw"] == [None, "vocab"], (name, m["dw"])
        assert not [g for g in m["gathers"] if g >= SHARE], (name, m["gathers"])
        if name.endswith("2d"):  # each device: N/4 tokens x L/2 classes
            assert m["dx"][0] == "data", m
            assert "16,148" in m["dots"], m
        else:
            assert "16,37" in m["dots"], m  # L/8 classes
