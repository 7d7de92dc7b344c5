"""Block-shape specs (``DITFLOW_TRITON_CONFIG``, ``--config``, ``--sweep``): what they pin, and
the errors a mistyped one gets."""

import pytest
import torch

from kernels.configs import KernelConfig, parse_config, pin_configs, select_configs

HOPPER = select_configs(128, torch.bfloat16, torch.device("cuda"), arch=90)


def test_one_spec_pins_every_kernel():
    pinned = pin_configs(HOPPER, "128x64:8:3")
    expected = KernelConfig(128, 64, 8, 3)
    assert pinned.forward == pinned.backward_dkdv == pinned.backward_dq == expected


def test_named_kernels_are_pinned_and_the_others_keep_the_table():
    pinned = pin_configs(HOPPER, "backward_dkdv=32x128:8:3:tma,backward_dq=64x128:8:2")
    assert pinned.forward == HOPPER.forward
    assert pinned.backward_dkdv == KernelConfig(32, 128, 8, 3, tma=True)
    assert pinned.backward_dq == KernelConfig(64, 128, 8, 2)


def test_environment_pins_the_table(monkeypatch):
    monkeypatch.setenv("DITFLOW_TRITON_CONFIG", "forward=64x64:4:2")
    pinned = select_configs(128, torch.bfloat16, torch.device("cuda"), arch=90)
    assert pinned.forward == KernelConfig(64, 64, 4, 2)
    assert pinned.backward_dq == HOPPER.backward_dq


@pytest.mark.parametrize("spec", ["default", "64x", "64x64:4:3:fast", "forward=64x64:a"])
def test_a_malformed_spec_names_its_source_itself_and_the_form(spec):
    with pytest.raises(ValueError, match=r"^DITFLOW_TRITON_CONFIG: kernel config '.*': expected "
                                         r"BMxBN\[:warps\[:stages\[:tma\]\]\]"):
        pin_configs(HOPPER, spec, "DITFLOW_TRITON_CONFIG")


def test_the_removed_atomic_dq_option_is_refused(monkeypatch):
    """``backward_dq=atomic`` (dq added by the dk/dv kernel with atomics) is gone: slower than
    the dq kernel at every shape measured on an H200, and not bit-reproducible. An old spec
    naming it gets the malformed-spec error, with its source."""
    monkeypatch.setenv("DITFLOW_TRITON_CONFIG", "backward_dkdv=64x128:8:2:tma,backward_dq=atomic")
    with pytest.raises(ValueError, match=r"^DITFLOW_TRITON_CONFIG: kernel config 'atomic': "
                                         r"expected BMxBN\[:warps\[:stages\[:tma\]\]\]"):
        select_configs(128, torch.bfloat16, torch.device("cuda"), arch=90)


def test_an_unknown_kernel_is_named_with_the_spec_source():
    with pytest.raises(ValueError, match="DITFLOW_TRITON_CONFIG: unknown kernel 'dq'"):
        pin_configs(HOPPER, "dq=64x64", "DITFLOW_TRITON_CONFIG")


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="block_n must be a power of two >= 32, got 48"):
        parse_config("64x48")
