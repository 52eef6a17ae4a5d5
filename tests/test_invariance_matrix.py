"""The invariance matrix (tests/scripts/invariance.py) covers what it claims, and the docs list it."""

import itertools
import sys

from launch_helpers import REPO

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from invariance import FACTORS, METHODS, ROWS, STAGES, matrix_table, uncovered_pairs  # noqa: E402


def test_every_pair_of_factor_values_is_run():
    assert not uncovered_pairs(ROWS)
    assert uncovered_pairs([row for row in ROWS if row["world"] == 1])  # the check itself can fail


def test_every_method_runs_at_every_stage_in_fp32_and_the_full_product_is_not_run():
    fp32 = {(r["method"], r["stage"]) for r in ROWS if r["precision"] == "fp32"}
    assert fp32 == set(itertools.product(METHODS, STAGES))
    assert len(ROWS) < len(list(itertools.product(*FACTORS.values()))) / 10


def test_docs_list_the_rows():
    assert matrix_table() in (REPO / "docs" / "design.md").read_text()
