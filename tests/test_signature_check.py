"""An input signature's per-call check (tensor leaves of fixed shape in one C++ pass, the rest in
Python): every kind of difference is found, at the right input, and a fitting call passes."""

import pytest
import torch
import torch.utils._pytree as pytree

from torchtrt_ext.core.signature import InputSignature


def _signature(*leaves):
    spec = pytree.tree_structure(list(leaves))
    return InputSignature(spec, list(leaves), {}), spec


def _base():
    return [torch.randn(2, 3), 7, torch.zeros(4, dtype=torch.int64), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)]


def test_a_fitting_call_passes_and_so_do_new_tensors_of_the_same_kind():
    sig, spec = _signature(*_base())
    assert sig.mismatch(spec, _base()) is None
    many = [torch.randn(1, 2) for _ in range(70)]  # a KV cache's worth of leaves
    sig2, spec2 = _signature(*many)
    assert sig2.mismatch(spec2, [torch.randn(1, 2) for _ in range(70)]) is None


@pytest.mark.parametrize(
    "change, position, words",
    [
        (lambda f: f.__setitem__(0, torch.randn(2, 3, dtype=torch.float64)), 0, "dtype torch.float64"),
        (lambda f: f.__setitem__(0, torch.randn(3, 2)), 0, "dimension 0 is 3"),
        (lambda f: f.__setitem__(0, torch.randn(2, 3, 1)), 0, "3 dimensions"),
        (lambda f: f.__setitem__(0, 1.5), 0, "is a float"),
        (lambda f: f.__setitem__(1, 8), 1, "is 8, compiled for 7"),
        (lambda f: f.__setitem__(2, torch.zeros(4, dtype=torch.int32)), 2, "dtype torch.int32"),
        (lambda f: f.__setitem__(3, torch.randn(2, 3, 4, 5)), 3, "is contiguous, compiled for channels_last"),
        (lambda f: f.__setitem__(0, torch.randn(2, 3, device="meta")), 0, "is on meta"),
    ],
)
def test_each_difference_is_found_at_its_input(change, position, words):
    sig, spec = _signature(*_base())
    flat = _base()
    change(flat)
    found = sig.mismatch(spec, flat)
    assert found is not None and f"input {position}" in found and words in found, found


def test_a_difference_late_in_a_long_list_is_found():
    many = [torch.randn(1, 2) for _ in range(70)]
    sig, spec = _signature(*many)
    flat = [torch.randn(1, 2) for _ in range(70)]
    flat[69] = torch.randn(1, 2, dtype=torch.float16)
    assert "input 69 has dtype torch.float16" in sig.mismatch(spec, flat)


def test_a_tensor_that_is_not_dense_still_fits_and_is_conformed():
    sig, spec = _signature(torch.randn(2, 3))
    strided = torch.randn(3, 2).t()  # the right sizes, not contiguous: copied into the recorded format
    assert sig.mismatch(spec, [strided]) is None
    (conformed,) = sig.conform([strided])
    assert conformed.is_contiguous() and torch.equal(conformed, strided)


def test_another_structure_is_a_mismatch():
    sig, spec = _signature(*_base())
    other = pytree.tree_structure(_base()[:3])
    assert sig.mismatch(other, _base()[:3]) == "the structure of the arguments differs"
