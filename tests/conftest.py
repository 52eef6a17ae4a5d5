"""Test session set-up. Helpers that tests import live in launch_helpers.py: pytest keeps one
module named ``conftest`` per session, so nothing may import from a conftest."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
