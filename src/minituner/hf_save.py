"""Former path of :mod:`minituner.hf.save`, kept for existing imports."""

from minituner.hf.save import *  # noqa: F403
