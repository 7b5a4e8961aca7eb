"""GraLoRA training engine: spec -> data -> train -> export. Knows nothing of HTTP, SQL or Celery."""

__version__ = "0.1.0"
