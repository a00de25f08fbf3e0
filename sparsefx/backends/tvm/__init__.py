"""TVM backend: Relax import, measured kernel dispatch, default schedules, MetaSchedule tuning."""

from .compiler import CompiledModel, compile, load

__all__ = ["CompiledModel", "compile", "load"]
