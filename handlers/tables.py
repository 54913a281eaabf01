"""Every table of the read models, imported here so the metadata (and Alembic) sees them all."""

from handlers import bookkeeping  # noqa: F401
from handlers import validations  # noqa: F401
from handlers import innovation_days  # noqa: F401
from handlers import institutions, calls, projects  # noqa: F401
from handlers import tokens  # noqa: F401  (credentials: on metadata of their own, kept across rebuilds)
