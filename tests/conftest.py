"""Fixtures shared by the unit tests."""

import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="module")
def tmp_base():
    """A directory for the tool sandbox's private temporary directories. The sandbox user
    must be able to reach it: pytest's own tmp_path is closed to others."""
    base = tempfile.mkdtemp(prefix="lpreg-tool-test-")
    os.chmod(base, 0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)
