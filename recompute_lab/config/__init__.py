"""config/ — the Hydra boundary: typed schemas, cross-field validation, HF config resolution, and
the frozen RunSpec
every layer below the CLI reads.

Importers use ``recompute_lab.config`` for the schema names (re-exported from config/schema.py)."""

# (the schema dataclasses, enums, validate, CONF_DIR)
from recompute_lab.config.schema import *  # noqa: F401,F403

# (registers the built-in strategies' options)
from recompute_lab.config import strategies as _strategies  # noqa: F401,E402
