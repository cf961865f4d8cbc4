"""Former path of :mod:`minituner.quant.nf4`, kept for existing imports."""

from minituner.quant.nf4 import *  # noqa: F403
