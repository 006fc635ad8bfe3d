"""Random churn on the primary, then the automation path: every mart and reporting relation
equals a full refresh, on DuckDB (tests/platform/churn.py)."""

from .churn import churn_fixture, churn_property

churn = churn_fixture("local")
test_marts_equal_a_full_refresh_after_any_churn = churn_property()
