"""Evaluations, one file each; each returns a dict and writes JSON.

``gsm8k`` (lm-eval-harness's ``gsm8k`` task, scored identically), ``perplexity`` (loss, perplexity and bits per
byte on text files), ``harness`` (the ``slmforge`` model for lm-eval-harness; imports ``lm_eval``).
"""
