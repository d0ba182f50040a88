"""The SFT curriculum (``finetune.curriculum``): the first epoch presents the conversations easy to hard.

Difficulty is the key ``eval gsm8k``'s strata use (``eval/strata.py``): first the number of steps of the
assistant's solution (its ``<<expr=result>>`` annotations), then the largest number written in digits in the
user's turns. Conversations of equal difficulty keep a fixed order drawn from the seed, so the order is a pure
function of the data and the seed and a resumed run sees the same batches. ``SFTLoader(curriculum=True)`` takes
the examples in this order in epoch 0 (packing fills its rows greedily in it) and shuffles every later epoch as
without the option.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from slmforge.eval.strata import largest_operand, num_steps


def difficulty(messages: list[dict]) -> tuple[int, Fraction]:
    """(steps in the assistant turns, largest operand in the user turns; 0 when they hold no number)."""
    replies = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
    questions = "\n".join(m["content"] for m in messages if m["role"] == "user")
    return num_steps(replies), largest_operand(questions) or Fraction(0)


def curriculum_order(conversations: list[list[dict]], seed: int) -> list[int]:
    """The indices of ``conversations`` easy to hard; ties in the order of a permutation drawn from ``seed``."""
    tie = np.random.default_rng([seed, 0x5F7]).permutation(len(conversations)).tolist()
    keys = [difficulty(c) for c in conversations]
    return sorted(range(len(conversations)), key=lambda i: (keys[i], tie[i]))


def order_by_difficulty(conversations: list[list[dict]], seed: int) -> list[list[dict]]:
    """``conversations`` easy to hard (``curriculum_order``)."""
    return [conversations[i] for i in curriculum_order(conversations, seed)]
