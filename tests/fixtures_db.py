"""Database fixtures: a fresh Postgres database per test session, migrated with Alembic."""
