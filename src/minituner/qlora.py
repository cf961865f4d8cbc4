"""Former path of :mod:`minituner.quant.qlora`, kept for existing imports."""

from minituner.quant.qlora import *  # noqa: F403
