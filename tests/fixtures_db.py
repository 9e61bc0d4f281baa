"""Database fixtures (SQLite file and real PostgreSQL, one schema per test run)."""
