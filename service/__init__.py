"""bitserve gateway: the FastAPI app, its persistence layer (settings, database, storage)."""
