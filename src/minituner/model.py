"""Former path of :mod:`minituner.models.minigpt`, kept for existing imports."""

from minituner.models.minigpt import *  # noqa: F403
