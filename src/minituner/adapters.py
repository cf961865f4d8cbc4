"""Former path of :mod:`minituner.lora.adapters`, kept for existing imports."""

from minituner.lora.adapters import *  # noqa: F403
