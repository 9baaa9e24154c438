"""Attacks that rebuild the input from a cut's activation. Importing this package registers them."""

from attacks import decoder  # noqa: F401  (registers "decoder")
from attacks import optimization  # noqa: F401  (registers "rmle")
from attacks.base import ATTACKS, AttackContext, FitReport, make_attack, register_attack  # noqa: F401
