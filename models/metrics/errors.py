"""The error every quality metric raises on input it cannot use."""

from __future__ import annotations


class MetricInputError(ValueError):
    """Input a metric cannot use. The message is one line: what is wrong, where, and the fix."""
