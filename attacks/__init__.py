"""Attacks that rebuild the input from a cut's activation, and the modalities they work in. Importing this
package registers them."""

from splitaudit.attacks import image  # noqa: F401  (registers the "image" modality)
from splitaudit.attacks import text  # noqa: F401  (registers the "text" modality; its models need the text extra)

from splitaudit.attacks import decoder  # noqa: F401  (registers "decoder")
from splitaudit.attacks import optimization  # noqa: F401  (registers "rmle")
from splitaudit.attacks import hybrid  # noqa: F401  (registers "hybrid": rmle started from the decoder)
from splitaudit.attacks import text_whitebox  # noqa: F401  (registers "whitebox", for text)
from splitaudit.attacks.base import ATTACKS, Attack, AttackContext, FitReport, make_attack, register_attack  # noqa: F401
from splitaudit.attacks.modality import MODALITIES, Modality, get_modality, modality_for, register_modality  # noqa: F401
