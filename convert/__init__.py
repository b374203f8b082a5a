"""Checkpoint converters: one module per model family, each a declarative key table plus named tensor surgery.

`keys` holds the shared strict key-accounting machinery (`rename`, `check_keys`, `build`).
"""
