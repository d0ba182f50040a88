"""Configuration, the ground floor of slmforge: plain dataclasses, loaded from YAML, overridden by ``key=value``.

Precedence is defaults < preset < YAML recipe < ``key=value`` overrides, for every config dataclass of every
stage through one function, ``load(cls, path, overrides)``. Unknown keys and bad choices (fields typed
``Literal[...]``) fail at parse time naming the nearest valid ones; each dataclass's ``validate(prefix)`` then
catches numbers that would fail later, deep in the code. Every run writes its resolved config as ``config.yaml``.

  model.py    ModelConfig and its per-mixer sub-configs, the size presets
  post.py     PostConfig: SFT, ORPO and DPO runs (slmforge/post/)
  run.py      DataConfig (with the data mixture), TrainConfig, CurateConfig, RunConfig; ``load_config``
  loading.py  ``load``, ``merge``, ``key=value`` parsing, YAML in and out, choice errors, ``describe``

A package rather than one file because together they pass 600 lines. This package imports nothing from slmforge
but ``registry``; names that live in other tables (mixers, GPUs, teachers) are checked where the table is
(``model.block.check_model``, ``plan.PlanConfig.validate``, ``synth.jobs.load_job``).
"""

from slmforge.config.loading import (Override, check_choice, check_min, choice_error, describe, dump_yaml, from_dict,
                                     load, merge, parse_overrides, read_yaml, to_dict, validate)
from slmforge.config.model import (PRESETS, AttnConfig, DSAConfig, HymbaConfig, LinearConfig, ModelConfig,
                                   MoEConfig, ScalingConfig, SSMConfig, make_divisible, preset)
from slmforge.config.post import PostConfig
from slmforge.config.run import (CurateConfig, DataConfig, MixtureConfig, RunConfig, Source, SourceWeight, Stage,
                                 TextSplit, TrainConfig, load_config)

__all__ = [
    "PRESETS", "AttnConfig", "CurateConfig", "DataConfig", "DSAConfig", "HymbaConfig", "LinearConfig",
    "MixtureConfig",
    "ModelConfig", "MoEConfig", "Override", "PostConfig", "RunConfig", "SSMConfig", "ScalingConfig", "Source",
    "SourceWeight", "Stage", "TextSplit", "TrainConfig", "check_choice", "check_min", "choice_error", "describe",
    "dump_yaml", "from_dict", "load", "load_config", "make_divisible", "merge", "parse_overrides", "preset",
    "read_yaml", "to_dict", "validate",
]
