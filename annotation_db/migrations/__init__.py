"""Alembic migrations, shipped inside the package so `upgrade()` works from any cwd."""
