"""The REST API: FastAPI routes, schemas and auth over the service core."""
