"""Engine-side prerequisites of federation that cannot live in dbt SQL.

DuckDB reads the replica through its postgres extension, and the customer exports write to
S3 through httpfs. Both ship in wheels of the same version as duckdb; installing them from
there puts them in DuckDB's extension folder, so `LOAD` works with no download at run time.
"""

from __future__ import annotations

import duckdb

POSTGRES_EXTENSION = "postgres_scanner"
HTTPFS_EXTENSION = "httpfs"


def ensure_duckdb_extension(name: str) -> None:
    """Install a DuckDB extension from its wheel (offline) unless it is already installed."""
    con = duckdb.connect()
    try:
        installed = con.execute(
            "select installed from duckdb_extensions() where extension_name = ?", [name]
        ).fetchone()
        if installed and installed[0]:
            return
        from duckdb_extensions import import_extension

        import_extension(name, con=con)
    finally:
        con.close()


if __name__ == "__main__":
    for extension in (POSTGRES_EXTENSION, HTTPFS_EXTENSION):
        ensure_duckdb_extension(extension)
        print(f"duckdb extension {extension} installed")
