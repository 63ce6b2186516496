"""Unlearning methods, each one file on the seam of `engine/methods/base.py`; `method:` in a config picks one."""

from __future__ import annotations

from configs.errors import UserError
from engine.methods.base import Method
from engine.methods.gradient_ascent import GradientAscent
from engine.methods.graddiff import GradDiff
from engine.methods.npo import NPO
from engine.methods.offset import Offset, OffsetGradDiff, OffsetGradientAscent, OffsetNPO
from engine.methods.sga import SGA
from engine.methods.simnpo import SimNPO
from engine.methods.task_arithmetic import TAU, TaskArithmetic
from engine.methods.whp import WHP

METHODS: dict[str, type[Method]] = {
    method.name: method for method in (WHP, GradientAscent, GradDiff, NPO, SimNPO, SGA, TaskArithmetic, TAU, OffsetGradientAscent, OffsetGradDiff, OffsetNPO)
}


def method_class(name: str) -> type[Method]:
    """The registered method called `name`, or a one-line error listing the known ones."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def uses_offset_pair(names: list[str]) -> bool:
    """Whether any of these methods trains o′ from a small model (`offset.small`), which the tiny world
    builds only when asked for."""
    return any(issubclass(method_class(name), Offset) for name in names)
