"""Post-training configs (``slmforge/post/``): what an SFT, ORPO or DPO run trains on, and its loss settings.

A run's ``finetune`` says what the run itself is (``method: ""`` = pre-training); a recipe's ``post`` lists the
stages ``slmforge run`` chains after its own training, each into its own run folder, each starting from the one
before (``train.init_from``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from slmforge.config.loading import check_min

# Data entries of PostConfig.data besides file paths (slmforge/post/data.py reads them).
PROCEDURAL = "procedural"  # SFT: the procedural families as conversations (question -> worked solution)
VERIFIED = "verified"  # ORPO/DPO: on-policy pairs sampled from the starting model, checked by the verifier
HH_PREFIX = "hh-rlhf:"  # ORPO/DPO: "hh-rlhf:<path to an Anthropic HH-RLHF jsonl.gz>"
SYNTH_PREFIX = "synth:"  # SFT: "synth:<a synthesizer job's output folder or shard>" (its question/answer records)
GSM8K_PREFIX = "gsm8k:"  # SFT: "gsm8k:<GSM8K-format JSONL>" (question -> worked solution with <<calc>> and #### N)


@dataclass
class PostConfig:
    method: Literal["", "sft", "orpo", "dpo"] = ""  # "" = pre-training
    name: str = ""  # a recipe's post stage: its run folder's name; "" = <previous name>_<method>
    # sft: conversation files (JSONL {"messages": [...]}), "procedural", "synth:<job output>", "gsm8k:<train.jsonl>";
    # orpo/dpo: pair files
    # (TRL's JSONL formats), "verified", "hh-rlhf:<path>"
    data: list[str] = field(default_factory=list)  # conversation or pair files, or the special sources
    val_data: list[str] = field(default_factory=list)  # held-out files; [] = val_fraction of `data`, by prompt hash
    val_fraction: float = 0.05
    families: list[str] = field(default_factory=lambda: ["arithmetic"])  # "procedural" / "verified" problems
    num_examples: int = 2000  # procedural conversations, or verified problems sampled
    max_len: int = 0  # tokens per example (prompt + reply); 0 = model.max_seq_len
    overlong: Literal["truncate", "skip"] = "truncate"  # an example longer than max_len (both are counted)
    packing: bool = True  # sft: conversations packed into rows with document masking (attention-only models)
    # sft: share of each batch's rows that are the base run's pre-training windows; orpo/dpo: replay x batch_size
    # pre-training windows beside each batch of pairs, their next-token loss added to the pair loss
    replay: float = 0.0
    curriculum: bool = False  # sft: first epoch easy to hard (steps, then largest operand; post/curriculum.py)
    beta: float = 0.1  # ORPO's lambda (weight of the odds-ratio term) / DPO's beta (KL strength)
    label_smoothing: float = 0.0  # DPO: conservative DPO's assumed label noise
    samples_per_problem: int = 4  # verified: answers sampled per problem
    sample_temperature: float = 1.0
    sample_batch_size: int = 64  # verified: rows decoded together (larger is faster on CPU; part of the seed's draw)
    max_new_tokens: int = 160
    eval_pairs: int = 256  # held-out pairs scored at each validation
    train: dict[str, Any] = field(default_factory=dict)  # a recipe's post stage: its train.* settings

    def validate(self, prefix: str = "finetune.") -> None:
        check_min(self, prefix, 0, "num_examples max_len beta label_smoothing samples_per_problem max_new_tokens")
        check_min(self, prefix, 1, "eval_pairs sample_batch_size")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"{prefix}val_fraction={self.val_fraction}: expected a fraction in [0, 1)")
        if not 0 <= self.replay < 1:
            raise ValueError(f"{prefix}replay={self.replay}: expected a share of the batch in [0, 1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"{prefix}label_smoothing={self.label_smoothing}: expected a value in [0, 0.5)")
        if self.method and not self.data:
            raise ValueError(f"{prefix}data is empty: give the {self.method} data (files, "
                             + ("'procedural')" if self.method == "sft" else "'verified' or 'hh-rlhf:<path>')"))
