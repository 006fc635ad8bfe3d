"""Engine-side prerequisites of federation that cannot live in dbt SQL.

DuckDB reads the replica through its postgres extension. The extension ships in a wheel
(duckdb-extension-postgres-scanner, same version as duckdb); installing it from there puts
it in DuckDB's extension folder so that the dbt federation macro's `LOAD postgres_scanner`
works with no download at run time.
"""

from __future__ import annotations

import duckdb

EXTENSION = "postgres_scanner"
HTTPFS_EXTENSION = "httpfs"


def ensure_duckdb_postgres_extension() -> None:
    """Install DuckDB's postgres extension from its wheel unless it is already installed."""
    con = duckdb.connect()
    try:
        installed = con.execute(
            "select installed from duckdb_extensions() where extension_name = ?", [EXTENSION]
        ).fetchone()
        if installed and installed[0]:
            return
        from duckdb_extensions import import_extension

        import_extension(EXTENSION, con=con)
    finally:
        con.close()


def ensure_duckdb_extension(name: str) -> None:
    """Install a DuckDB extension from its wheel (offline) unless it is already installed.

    httpfs (duckdb-extension-httpfs, same version as duckdb) is what the customer exports
    use to write to S3 (platform_assets/exports.py).
    """
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
    ensure_duckdb_postgres_extension()
    print(f"duckdb extension {EXTENSION} installed")
    ensure_duckdb_extension(HTTPFS_EXTENSION)
    print(f"duckdb extension {HTTPFS_EXTENSION} installed")
