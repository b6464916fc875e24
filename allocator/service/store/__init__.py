"""Persistence: SQLAlchemy models (:mod:`.models`), engine + migrations (:mod:`.db`) and
plain repository functions (:mod:`.repo`, :mod:`.jobs`)."""
