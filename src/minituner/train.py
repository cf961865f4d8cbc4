"""Former path of :mod:`minituner.training.loop`, kept for existing imports."""

from minituner.training.loop import *  # noqa: F403
