"""prerec: the prerecordings service."""
