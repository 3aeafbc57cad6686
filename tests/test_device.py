"""CPU tests of the device state (moegemm.device): the SM limit, programmatic dependent launch, and
the facts the heuristics read."""

from __future__ import annotations

import pytest
import torch

from moegemm import device

# ---- sm count -------------------------------------------------------------------------------------


@pytest.fixture
def restore_num_sms():
    saved = device._num_sms_override
    yield
    device._num_sms_override = saved


@pytest.mark.usefixtures("restore_num_sms")
def test_set_and_get_num_sms() -> None:
    device.set_num_sms(3)
    assert device.get_num_sms() == 3
    device.set_num_sms(1)
    assert device.get_num_sms() == 1


@pytest.mark.usefixtures("restore_num_sms")
@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "8"])
def test_set_num_sms_rejects_bad_values(bad) -> None:
    device.set_num_sms(2)
    with pytest.raises(ValueError, match="num_sms"):
        device.set_num_sms(bad)
    assert device.get_num_sms() == 2


@pytest.mark.usefixtures("restore_num_sms")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_get_num_sms_without_gpu_or_override() -> None:
    device._num_sms_override = None
    with pytest.raises(RuntimeError, match="CUDA"):
        device.get_num_sms()


@pytest.mark.gpu
@pytest.mark.usefixtures("restore_num_sms")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_num_sms_bounded_by_device() -> None:
    device._num_sms_override = None
    device_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    assert device.get_num_sms() == device_sms
    device.set_num_sms(device_sms)
    with pytest.raises(ValueError, match="num_sms"):
        device.set_num_sms(device_sms + 1)


# ---- programmatic dependent launch -----------------------------------------------------------------


@pytest.mark.parametrize("setting", ["pdl", "check_groups"])
def test_toggle_default_from_environment_and_setter(monkeypatch, setting) -> None:
    """set_pdl / set_check_groups: the variable gives the default, read at first use; the setter wins."""
    import moegemm
    from moegemm.ops import dispatch

    toggle, variable = {"pdl": (device._PDL, "MOEGEMM_ENABLE_PDL"),
                        "check_groups": (dispatch._CHECK_GROUPS, "MOEGEMM_CHECK_GROUPS")}[setting]
    setter, getter = getattr(moegemm, f"set_{setting}"), getattr(moegemm, f"get_{setting}")
    monkeypatch.setattr(toggle, "_value", None)  # restored afterwards, whatever the setter does here
    monkeypatch.setenv(variable, "1")
    assert getter() is True
    setter(False)
    assert getter() is False
    with pytest.raises(ValueError, match="enabled: expected a bool"):
        setter(1)
    assert getter() is False
