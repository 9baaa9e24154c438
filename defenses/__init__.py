"""Defenses applied on the device or to the model. Importing this package registers them."""

from splitaudit.defenses import simple  # noqa: F401  (registers none, noise, dropout, quant)
from splitaudit.defenses import dpsgd  # noqa: F401  (registers dpsgd)
from splitaudit.defenses import nopeek  # noqa: F401  (registers nopeek)
from splitaudit.defenses.base import DEFENSES, Defense, Fitted, ModelChange, PrepareContext, make_defense, register_defense  # noqa: F401
