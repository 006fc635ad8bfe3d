"""The beta Dagster APIs the platform uses on purpose. Their BetaWarning says nothing a user
can act on, so it is silenced where each is used, by name; any other beta still warns."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

CHOSEN = {
    # one observation query for every federated table (sources.py)
    "multi_observable_source_asset": r"Function `multi_observable_source_asset` is currently in beta",
    # the exports of any number of companies in one run (exports.py)
    "backfill_policy": r"Parameter `backfill_policy` of function `asset` is currently in beta",
    # dg.evaluate_automation_conditions selects sources with it internally (localenv.demo)
    "include_sources": r"Parameter `include_sources` of function `AssetSelection.all` is currently in beta",
}


@contextmanager
def chosen_beta(*names: str) -> Iterator[None]:
    """Silence the BetaWarning of these chosen APIs (keys of CHOSEN) inside the block."""
    with warnings.catch_warnings():
        for name in names:
            warnings.filterwarnings("ignore", message=CHOSEN[name], category=dg.BetaWarning)
        yield
