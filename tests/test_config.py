import pytest

from questdiff import presets
from questdiff.config import ActivationSpec, QuantConfig, WeightSpec, preset, resolve


def test_presets_are_values():
    assert presets.W4A4.weight.bits == 4 and presets.W4A4.activation.bits == 4
    assert presets.W4A4.activation.per_channel and not presets.W8A8.activation.per_channel  # QuEST's 4-bit grid
    assert presets.W4A4.activation.smoothing is None
    assert not presets.W4A4.running_stat and presets.W8A8.running_stat  # README: no running stats at W4A4
    assert preset("w6a8").label == "W6A8"
    assert resolve("W4A8") == presets.W4A8


@pytest.mark.parametrize("name", ["W3", "int8", "W8A"])
def test_bad_preset_names(name):
    with pytest.raises(ValueError, match="W<bits>A<bits>"):
        preset(name)


@pytest.mark.parametrize("bits", [0, 1, 32])
def test_unsupported_bit_widths_fail_with_fix(bits):
    with pytest.raises(ValueError, match="integer from 2 to 16"):
        WeightSpec(bits=bits)
    with pytest.raises(ValueError, match="integer from 2 to 16"):
        ActivationSpec(bits=bits)
    with pytest.raises(ValueError, match="integer from 2 to 16"):
        preset(f"W{bits}A8")


def test_invalid_combinations():
    with pytest.raises(ValueError, match="group_size"):
        WeightSpec(granularity="group")
    with pytest.raises(ValueError, match="momentum"):
        QuantConfig(momentum=1.5)


def test_roundtrip_and_version():
    config = presets.W4A4.replace(split_skip=False, weight=WeightSpec(bits=4, granularity="group", group_size=16))
    assert QuantConfig.from_dict(config.to_dict()) == config
    data = config.to_dict()
    data["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        QuantConfig.from_dict(data)


@pytest.mark.parametrize("make, field", [
    (lambda: QuantConfig(weight={"bits": 4}), "QuantConfig.weight"),
    (lambda: QuantConfig(activation=WeightSpec()), "QuantConfig.activation"),
    (lambda: QuantConfig(act_init_samples=2.5), "QuantConfig.act_init_samples"),
    (lambda: QuantConfig(running_stat="no"), "QuantConfig.running_stat"),
    (lambda: QuantConfig(first_last_act_bits=8.0), "QuantConfig.first_last_act_bits"),
    (lambda: ActivationSpec(channelwise="yes"), "ActivationSpec.channelwise"),
    (lambda: ActivationSpec(symmetric=1), "ActivationSpec.symmetric"),
    (lambda: WeightSpec(bits=True), "WeightSpec.bits"),
    (lambda: WeightSpec(granularity="row"), "WeightSpec.granularity"),
])
def test_wrong_field_types_fail_naming_the_field(make, field):
    with pytest.raises(TypeError, match=field) as err:
        make()
    assert isinstance(err.value, ValueError)  # callers catching ValueError (the CLI) see it too


def test_nested_dict_error_names_the_fix():
    with pytest.raises(TypeError, match=r"use WeightSpec\(\*\*\{'bits': 4\}\)"):
        QuantConfig(weight={"bits": 4})
    with pytest.raises(TypeError, match="QuantConfig.momentum"):
        presets.W8A8.replace(momentum="0.9")
    assert QuantConfig(momentum=1 / 2, first_last_act_bits=None).momentum == 0.5  # ints and None where allowed


@pytest.mark.parametrize("block", [0, 1, 3, 48, -4])
def test_rotation_block_must_be_a_power_of_two(block):
    with pytest.raises(ValueError, match="ActivationSpec.rotation must be a power of two"):
        ActivationSpec(bits=4, rotation=block)
    with pytest.raises(TypeError, match="ActivationSpec.rotation"):
        ActivationSpec(rotation=64.0)


def test_rotation_makes_the_4_bit_default_per_tensor_and_round_trips():
    rotated = presets.W4A4.replace(activation=ActivationSpec(bits=4, rotation=64))
    assert not rotated.activation.per_channel
    assert ActivationSpec(bits=4, rotation=64, channelwise=True).per_channel  # an explicit choice wins
    assert QuantConfig.from_dict(rotated.to_dict()) == rotated
    old = presets.W4A4.to_dict()
    del old["activation"]["rotation"]  # a config saved before rotation existed
    assert QuantConfig.from_dict(old).activation.rotation is None


def test_fp8_preset_and_grid_validation():
    from questdiff.config import ActivationSpec, ConfigError, QuantConfig, WeightSpec, preset

    config = preset("w8a8-fp8")
    assert config.label == "W8A8-FP8" and config.weight.format == config.activation.format == "fp8"
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert QuantConfig.from_dict({**preset("W8A8").to_dict(), "weight": {"bits": 8}}).weight.format == "int"
    with pytest.raises(ValueError, match="W8A8-FP8"):
        preset("W4A8-FP8")
    with pytest.raises(ConfigError, match="8-bit"):
        WeightSpec(bits=4, format="fp8")
    with pytest.raises(ConfigError, match="groups"):
        WeightSpec(format="fp8", granularity="group", group_size=16)
    with pytest.raises(ConfigError, match="per tensor"):
        ActivationSpec(format="fp8", channelwise=True)
    with pytest.raises(ConfigError, match="'int' or 'fp8'"):
        ActivationSpec(format="fp4")
