"""The `gralora` command: engine commands (train, check, validate-data) and service commands."""
