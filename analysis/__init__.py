"""The analysis layer: DuckDB views over a sweep's done shards, universality, emergence,
sections, plots and the report. Public API in analysis.api; CLI in analysis.commands.
"""
