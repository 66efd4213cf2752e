"""The pipeline's stages: extract (SQLite) -> transform (pure converters) -> load (PostgreSQL)."""
