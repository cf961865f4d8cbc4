"""Former path of :mod:`minituner.hf.toy`, kept for existing imports."""

from minituner.hf.toy import *  # noqa: F403
