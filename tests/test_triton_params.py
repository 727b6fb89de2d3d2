"""The Triton backend's launch parameters: one declaration each (kernels/triton_sb/params.py), from
which the config space, the default config, the custom ops' int list and the validation derive."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbbench.core.registry import get_backend
from sbbench.kernels.triton_sb import params

NAMES = [p.name for p in params.LAUNCH_PARAMS]
# A value of the right kind that breaks each parameter's own rule.
INVALID = {
    "fwd_BLOCK_M": 24, "fwd_BLOCK_N": 8, "fwd_num_warps": 3, "fwd_num_stages": 0, "skip_log2": 0,
    "skip_check_keys": 0, "skip_checks": 9, "scan": "matmul", "bwd_BLOCK_M": 48, "bwd_BLOCK_N": 0,
    "bwd_num_warps": 32, "bwd_num_stages": -1, "bwd_dkdv_BLOCK_M": 100, "bwd_dkdv_BLOCK_N": 96,
    "bwd_dkdv_num_warps": 6, "bwd_dkdv_num_stages": 0, "bwd_maxnreg": 256, "bwd_dkdv_maxnreg": 16,
    "fwd_loads": "ldg", "bwd_loads": "tensor", "fwd_maxnreg": 300,
    "bwd_descriptors": "device", "bwd_state_layout": "columns",
}


def test_one_declaration_feeds_the_registry():
    backend = get_backend("triton")
    assert len(set(NAMES)) == len(NAMES)
    assert backend.config_space == params.LAUNCH_PARAMS
    assert dict(backend.default_config) == {p.name: p.default for p in params.LAUNCH_PARAMS}
    assert params.CONFIG_FIELDS == tuple(NAMES)
    assert set(INVALID) == set(NAMES), "every parameter needs an invalid value in this test"


def test_defaults_are_valid_and_round_trip():
    encoded = params.config_to_list({})
    assert len(encoded) == len(NAMES) and all(type(x) is int for x in encoded)
    assert params.config_from_list(encoded) == params.DEFAULT_CONFIG


@pytest.mark.parametrize("param", params.LAUNCH_PARAMS, ids=NAMES)
def test_every_choice_passes_and_round_trips(param):
    for choice in param.choices:
        config = {param.name: choice}
        if param.name == "bwd_BLOCK_N":  # must divide the dK/dV key tile
            config["bwd_dkdv_BLOCK_N"] = max(choice, params.DEFAULT_CONFIG["bwd_dkdv_BLOCK_N"])
        assert params.config_from_list(params.config_to_list(config)) == {**params.DEFAULT_CONFIG, **config}


@pytest.mark.parametrize("name", NAMES)
def test_invalid_value_is_rejected_by_name(name):
    bad = INVALID[name]
    with pytest.raises(ValueError, match=rf"^config: {name} must be .*got {bad!r}"):
        params.config_to_list({name: bad})
    # The custom ops check the list they are given too (they may be called directly).
    encoded = params.config_to_list({})
    encoded[NAMES.index(name)] = 7 if isinstance(bad, str) else bad  # 7: no name's code
    with pytest.raises(ValueError, match=rf"^config: {name} must be"):
        params.config_from_list(encoded)


@pytest.mark.parametrize("bad", [64.0, "64", True, None])
def test_non_integers_are_rejected(bad):
    with pytest.raises(ValueError, match="^config: fwd_BLOCK_M must be a power of two"):
        params.config_to_list({"fwd_BLOCK_M": bad})


def test_block_skipping_off_travels_as_none():
    encoded = params.config_to_list({"skip_log2": None})
    assert encoded[NAMES.index("skip_log2")] == params.SKIP_OFF
    assert params.config_from_list(encoded)["skip_log2"] is None


def test_dq_key_tile_must_divide_the_dkdv_one():
    with pytest.raises(ValueError, match=r"^config: bwd_dkdv_BLOCK_N \(32\) must be a multiple of bwd_BLOCK_N \(64\)"):
        params.config_to_list({"bwd_BLOCK_N": 64, "bwd_dkdv_BLOCK_N": 32})


def test_unknown_names_and_short_lists_are_named():
    with pytest.raises(ValueError, match=r"^config: no launch parameter\(s\) \['fwd_BLOCK_Q'\]"):
        params.config_to_list({"fwd_BLOCK_Q": 64})
    with pytest.raises(ValueError, match="^cfg: expected"):
        params.config_from_list(params.config_to_list({})[:-1])


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({}, optional={p.name: st.sampled_from(p.choices) for p in params.LAUNCH_PARAMS}))
def test_any_config_of_choices_round_trips_or_is_rejected_for_its_tiles(config):
    full = {**params.DEFAULT_CONFIG, **config}
    if full["bwd_dkdv_BLOCK_N"] % full["bwd_BLOCK_N"]:
        with pytest.raises(ValueError, match="bwd_dkdv_BLOCK_N"):
            params.config_to_list(config)
    else:
        assert params.config_from_list(params.config_to_list(config)) == full
