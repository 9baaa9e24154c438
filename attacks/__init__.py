"""Attacks that rebuild the input from a cut's activation. Importing this package registers them."""

from splitaudit.attacks import decoder  # noqa: F401  (registers "decoder")
from splitaudit.attacks import optimization  # noqa: F401  (registers "rmle")
from splitaudit.attacks.base import ATTACKS, AttackContext, FitReport, make_attack, register_attack  # noqa: F401
