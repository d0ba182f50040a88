"""Training science: mixture laws (``mix``), scaling forecasts (``forecast``), the anneal ablation, and the
sweep runner they share."""

from slmforge.science.anneal import anneal_ablation
from slmforge.science.mixture_law import MixConfig, mix
from slmforge.science.scaling import ForecastConfig, forecast
from slmforge.science.sweep import load_config, run_sweep

__all__ = ["ForecastConfig", "MixConfig", "anneal_ablation", "forecast", "load_config", "mix", "run_sweep"]
