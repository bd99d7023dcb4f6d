"""The base of every config section: one place for the rules all of them share."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config table: unknown keys are errors (a typo never passes silently), values
    are frozen once loaded, and floats must be finite: TOML spells inf and nan, and nan
    slips past every bound (nan > x is false)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
