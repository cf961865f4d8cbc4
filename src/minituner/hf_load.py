"""Former path of :mod:`minituner.hf.load`, kept for existing imports."""

from minituner.hf.load import *  # noqa: F403
