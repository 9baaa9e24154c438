"""Defenses applied on the device or to the model. Importing this package registers them."""

from defenses import simple  # noqa: F401  (registers none, noise, dropout, quant)
from defenses import dpsgd  # noqa: F401  (registers dpsgd)
from defenses import nopeek  # noqa: F401  (registers nopeek)
from defenses.base import DEFENSES, Defense, ModelChange, PrepareContext, make_defense, register_defense  # noqa: F401
