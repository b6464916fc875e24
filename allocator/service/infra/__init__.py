"""Service configuration and the error vocabulary."""
