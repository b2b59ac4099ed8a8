"""The exploration's stages as `_advance` drives them: one object per stage, in the order the
module docstring and `Stage` name them."""

from __future__ import annotations

from typing import get_args

from edpilot.optimizer import STAGE_ORDER, STAGE_RULES, Stage


def test_every_stage_has_one_object_in_the_documented_order() -> None:
    assert tuple(s.name for s in STAGE_ORDER) == get_args(Stage)
    assert all(STAGE_RULES[s.name] is s for s in STAGE_ORDER)
    assert len({s.label for s in STAGE_ORDER}) == len(STAGE_ORDER)
