"""`make bench`: the seed's flow (EVENTS lesson events, 8M by default) through the platform,
measured as ratios against plain dbt, the raw-SQL floor and the PostgreSQL engine.

Modules: `environment` prepares a primary + replica per scale, `probe` samples the process
tree's memory, `floor` executes dbt's compiled SQL on DuckDB with nothing around it,
`workloads` runs the measured flows, `report` writes the JSON, table, chart and doc, and
`__main__` is the command line.
"""
