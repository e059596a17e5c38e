"""Kept for imports: the site data format lives in :mod:`models.data.site_data` (both sides read it)."""

from models.data.site_data import *  # noqa: F401,F403
from models.data.site_data import __all__  # noqa: F401
