"""splitaudit: how well can the input of a split model be rebuilt from what crosses the wire?

The orchestration package. ``attacks`` and ``defenses`` plug into it through registries.
"""

__version__ = "0.3.0"  # in every cache key: a release that trains differently never reads an older result
