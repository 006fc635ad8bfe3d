"""`platform-dbt`: the dbt executable the platform's DbtCliResource runs.

dagster-dbt runs `<dbt_executable> --version` once per run to tell dbt Core from dbt Fusion.
dbt's own `--version` imports all of dbt and then asks PyPI for the latest release of
dbt-core and of each adapter: four HTTPS requests (1 s timeout each) at run time, which a
production task without egress waits out. This answers `--version` from the installed
dbt-core's package metadata and hands every other command to the environment's dbt as it is
(`exec`: same process, so signals reach dbt itself).
"""

import os
import sys
from importlib.metadata import version
from pathlib import Path


def main() -> None:
    # this environment's dbt only (installed beside this script, or beside its Python): the
    # version answered is its dbt-core's
    places = [Path(sys.argv[0]).resolve().parent / "dbt", Path(sys.executable).parent / "dbt"]
    dbt = next((p for p in places if p.exists()), None)
    if dbt is None:
        raise SystemExit(f"platform-dbt: no dbt at {' or '.join(map(str, places))} (is dbt-core installed here?)")
    args = sys.argv[1:]
    if args == ["--version"]:
        print(f"Core:\n  - installed: {version('dbt-core')}")
        return
    os.execv(dbt, [str(dbt), *args])


if __name__ == "__main__":
    main()
