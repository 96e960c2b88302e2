class CopyRefused(Exception):
    """The SQLite file cannot be copied into that database (see the message)."""
