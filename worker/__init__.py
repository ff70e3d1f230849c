"""Celery workers that run fine-tuning jobs (the logic is in worker.runner; tasks stay thin)."""
