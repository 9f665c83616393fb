import pytest

from popup_adapter import PopupConfig


@pytest.mark.parametrize("k", [0, -0.1, 1.5, 30])
def test_k_outside_unit_interval_is_refused_with_the_meaning_of_k(k):
    with pytest.raises(ValueError, match=r"outside \(0, 1\].*fraction of weights KEPT"):
        PopupConfig(k=k)


def test_unknown_init_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown init 'xavier'.*signed_constant"):
        PopupConfig(init="xavier")


def test_bad_fields():
    with pytest.raises(TypeError, match="k must be a number"):
        PopupConfig(k="0.3")
    with pytest.raises(ValueError, match="seed must be"):
        PopupConfig(seed=-1)
    with pytest.raises(ValueError, match="scale_fan"):
        PopupConfig(init="keep", scale_fan=True)
    with pytest.raises(TypeError, match="target_modules"):
        PopupConfig(target_modules=[1, 2])


def test_round_trip_and_unknown_keys():
    config = PopupConfig(k=0.1, target_modules=["fc"], seed=3, scale_fan=True)
    assert PopupConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown PopupConfig fields \['rank'\]"):
        PopupConfig.from_dict({"k": 0.5, "rank": 8})
