"""splitaudit: how well can the input of a split model be rebuilt from what crosses the wire?

The orchestration package. ``attacks`` and ``defenses`` plug into it through registries.
"""

__version__ = "0.1.0"
