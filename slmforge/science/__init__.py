"""Training science: mixture laws (``mix``), scaling forecasts (``forecast``), the anneal ablation, and the
sweep runner they share. Their configs load like every other: ``config.load(MixConfig, path, overrides)``."""

from slmforge.science.anneal import anneal_ablation
from slmforge.science.mixture_law import MixConfig, mix
from slmforge.science.scaling import ForecastConfig, forecast
from slmforge.science.sweep import run_sweep

__all__ = ["ForecastConfig", "MixConfig", "anneal_ablation", "forecast", "mix", "run_sweep"]
