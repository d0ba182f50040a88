"""The main build: one recipe (``kind: main``) that runs the whole course, from the budget to the final report."""

from slmforge.course.build import STAGES, run_main
from slmforge.course.config import MainConfig
from slmforge.course.schedule import format_main_schedule, main_schedule

__all__ = ["MainConfig", "STAGES", "format_main_schedule", "main_schedule", "run_main"]
