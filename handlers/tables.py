"""Every table of the read models, imported here so the metadata (and Alembic) sees them all."""

from handlers import bookkeeping  # noqa: F401
from handlers import validations  # noqa: F401
