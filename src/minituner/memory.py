"""Former path of :mod:`minituner.training.memory`, kept for existing imports."""

from minituner.training.memory import *  # noqa: F403
