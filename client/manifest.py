"""Kept for imports: the manifest format lives in :mod:`models.data.manifest` (both sides read it)."""

from models.data.manifest import (ScanRecord, SiteDataError, attribute_matrix,  # noqa: F401
                                  inspect_attributes, inspect_manifest, read_manifest)
