"""Service core shared by the API and the worker: settings, database models, job state, storage."""
