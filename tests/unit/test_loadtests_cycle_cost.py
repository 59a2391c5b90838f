"""The cycle-cost benchmark's synthetic buffers: real row schema, a round on the newest policy, capped selection."""

from __future__ import annotations

import pytest

from finetune_worker.reward_model import select_pair_rows
from loadtests.cycle_cost import ROUND_PREFERENCES, synthetic_rows
from musicrl.buffer import parquet_to_table, rows_to_parquet

pytestmark = pytest.mark.unit


def test_synthetic_rows_fit_the_buffer_schema_and_put_a_round_on_the_newest_policy():
    rows = parquet_to_table(rows_to_parquet(synthetic_rows(600, 8))).to_pylist()
    assert len(rows) == 600 and sum(r["policy_version"] == "9" for r in rows) == ROUND_PREFERENCES
    assert {r["policy_version"] for r in rows} >= {"1", "8", "9"}


@pytest.mark.parametrize("n", [500, 5000])
def test_the_reward_model_sees_a_bounded_number_of_pairs_whatever_the_buffer(n):
    selected = select_pair_rows(synthetic_rows(n, 4), "9", max_pairs=500, heldout_fraction=0.2)
    assert len(selected.train) <= 500 and len(selected.heldout) <= 125
    assert selected.stats["n_train_current_policy"] > 0.7 * ROUND_PREFERENCES
