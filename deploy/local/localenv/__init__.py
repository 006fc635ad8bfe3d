"""Local environment of the reporting platform: a PostgreSQL primary with a real streaming
read replica, the operational schema with deterministic demo data, and a change simulator.

Lives under deploy/local: the platform code (platform_assets) never imports it.
"""
