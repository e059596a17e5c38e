"""Kept for imports: the manifest format lives in :mod:`models.data.manifest` (both sides read it)."""

from models.data.manifest import (REQUIRED_COLUMNS, ScanRecord, SiteDataError,  # noqa: F401
                                  attribute_matrix, inspect_attributes, inspect_manifest,
                                  patient_key, read_manifest)
