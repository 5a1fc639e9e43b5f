"""Alembic revision files (each with upgrade, downgrade and a why-comment)."""
