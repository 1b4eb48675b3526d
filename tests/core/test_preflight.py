"""check_writable: an unwritable output fails before any work, naming the location."""
from __future__ import annotations

import os

import pytest

from pipeline.core.preflight import OutputNotWritableError, check_writable


def test_a_writable_output_is_checked_and_left_as_it_was(tmp_path):
    root = tmp_path / "new" / "out"
    check_writable(str(root))
    assert not (tmp_path / "new").exists()  # the folders the check made are gone
    root.mkdir(parents=True)
    (root / "keep.txt").write_text("x")
    check_writable(str(root))
    assert os.listdir(root) == ["keep.txt"]


def test_object_store_urls_are_checked_through_fsspec():
    check_writable("memory://preflight/out")


@pytest.mark.parametrize("root", ["/proc/nope", "/proc/self/status/out"])
def test_unwritable_outputs_are_refused_with_their_name(root):
    with pytest.raises(OutputNotWritableError, match=root):
        check_writable(root)
