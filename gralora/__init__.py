"""GraLoRA training engine: spec -> data -> train -> export. No HTTP, SQL or Celery in here."""

__version__ = "0.1.0"
