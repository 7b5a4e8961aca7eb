"""Celery worker: delivers job ids to worker.runner, which trains them with the engine."""
