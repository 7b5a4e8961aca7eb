"""Worker fixtures: a real Celery worker process on Redis against the test database."""
