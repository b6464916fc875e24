"""HTTP API: one router per resource under /v1."""
