import json

import pytest

from slmforge.config import preset
from slmforge.plan import GIB, GPUS, USABLE_MEMORY_FRACTION, _si, count_params, flops_per_token, memory_gib
from slmforge.plan_schedule import StagePlan, format_schedule, schedule

H100_USABLE = USABLE_MEMORY_FRACTION * GPUS["h100"].memory_gib


def _build() -> list[StagePlan]:
    small, target = preset("50m"), preset("300m")
    return [StagePlan("proxy mixture", small, 1e9, runs=3),
            StagePlan("target", target, 6e9),
            StagePlan("orpo", target, 5e7, passes=2, micro_batch_size=4)]


def test_flops_and_gpu_hours_follow_the_formulas():
    cfg = preset("100m")
    stage = StagePlan("sft", cfg, 3e8, runs=3, seq_len=1024, passes=2)
    r = schedule([stage], gpu="a100", mfu=0.5)["stages"][0]
    flops = flops_per_token(cfg, 1024)["train"] * 3e8 * 3 * 2
    assert r["flops"] == pytest.approx(flops, rel=1e-12)
    assert r["gpu_hours"] == pytest.approx(flops / (GPUS["a100"].peak_flops * 0.5 * 3600), rel=1e-12)
    assert r["tokens"] == 9e8 and r["tokens_per_run"] == 3e8
    assert r["params_total"] == r["params_active"] == count_params(cfg).total
    # passes multiplies FLOPs only: memory holds the sequences of one micro-batch either way
    plain = schedule([StagePlan("sft", cfg, 3e8, runs=3, seq_len=1024)], gpu="a100", mfu=0.5)["stages"][0]
    assert r["flops"] == pytest.approx(2 * plain["flops"])
    assert r["gpus"]["8"]["memory_gib"] == plain["gpus"]["8"]["memory_gib"]


def test_wall_hours_scale_as_one_over_the_gpu_count():
    r = schedule(_build(), gpu_counts=(1, 8, 64))
    for stage in r["stages"]:
        for n in (1, 8, 64):
            assert stage["gpus"][str(n)]["wall_hours"] == pytest.approx(stage["gpu_hours"] / n)
            assert stage["gpus"][str(n)]["idle_gpus"] == 0
        assert stage["max_useful_gpus"] is None


def test_fsdp_shards_the_state_and_ddp_does_not():
    cfg = preset("300m")
    stage = StagePlan("target", cfg, 1e9)
    fsdp = schedule([stage], fsdp=True)["stages"][0]["gpus"]
    ddp = schedule([stage], fsdp=False)["stages"][0]["gpus"]

    def state(m):
        return m["weights"] + m["gradients"] + m["optimizer"]

    assert state(fsdp["1"]["memory"]) > state(fsdp["8"]["memory"]) > state(fsdp["64"]["memory"])
    assert fsdp["1"]["memory_gib"] > fsdp["8"]["memory_gib"] > fsdp["64"]["memory_gib"]
    assert state(fsdp["8"]["memory"]) == pytest.approx(state(fsdp["1"]["memory"]) / 8)
    assert state(ddp["1"]["memory"]) == state(ddp["8"]["memory"]) == state(ddp["64"]["memory"])
    assert ddp["64"]["memory_gib"] == ddp["1"]["memory_gib"] == memory_gib(cfg, 2048, 8)["total"]
    assert fsdp["8"]["memory_gib"] == memory_gib(cfg, 2048, 8, 8, fsdp=True)["total"]


def test_300m_at_seq_2048_micro_batch_8_fits_an_h100():
    cfg = preset("300m")
    on_one = schedule([StagePlan("target", cfg, 1e9)], fsdp=False)["stages"][0]["gpus"]["1"]
    # By hand: 16 bytes of fp32 state per parameter (weights, gradients, two AdamW moments), and bf16
    # activations of about 35*s*b*h bytes per layer plus the head's 4*s*b*h + 6*s*b*V.
    n, s, b, h, v = count_params(cfg).total, 2048, 8, cfg.d_model, cfg.vocab_size
    state = 16 * n / GIB
    activations = (35 * s * b * h * cfg.num_layers + s * b * (4 * h + 6 * v)) / GIB
    mem = on_one["memory"]
    assert mem["weights"] + mem["gradients"] + mem["optimizer"] == pytest.approx(state)
    assert mem["activations"] == pytest.approx(activations, rel=0.05)
    assert 20 < on_one["memory_gib"] < H100_USABLE
    assert on_one["fits"] and on_one["fit_micro_batch_size"] == 8 and on_one["needs_checkpointing"] is False


def test_a_huge_micro_batch_gets_a_smaller_one_that_fits():
    cfg = preset("300m")
    on_one = schedule([StagePlan("sft", cfg, 1e8, micro_batch_size=256)], fsdp=False)["stages"][0]["gpus"]["1"]
    assert not on_one["fits"] and on_one["memory_gib"] > H100_USABLE
    b = on_one["fit_micro_batch_size"]
    assert b in (1, 2, 4, 8, 16, 32, 64, 128) and on_one["needs_checkpointing"] is False
    assert memory_gib(cfg, 2048, b)["total"] <= H100_USABLE < memory_gib(cfg, 2048, 2 * b)["total"]


def test_checkpointing_when_no_micro_batch_fits_without_it():
    cfg = preset("1b")  # at 64K tokens even one sequence's activations overflow an H100 without checkpointing
    on_one = schedule([StagePlan("long", cfg, 1e8, seq_len=65536, micro_batch_size=8)],
                      fsdp=False)["stages"][0]["gpus"]["1"]
    assert memory_gib(cfg, 65536, 1)["total"] > H100_USABLE
    b = on_one["fit_micro_batch_size"]
    assert not on_one["fits"] and on_one["needs_checkpointing"] is True
    fits = memory_gib(cfg, 65536, b, activation_checkpointing=True)["total"]
    assert fits <= H100_USABLE < memory_gib(cfg, 65536, 2 * b, activation_checkpointing=True)["total"]
    # A T4's 15 GiB cannot hold the 1B model's 14 GiB of unsharded state at 90%: nothing fits
    t4 = schedule([StagePlan("target", cfg, 1e8)], gpu="t4", fsdp=False)["stages"][0]["gpus"]["1"]
    assert not t4["fits"] and t4["fit_micro_batch_size"] is None and t4["needs_checkpointing"] is None
    text = format_schedule(schedule([StagePlan("long", cfg, 1e8, seq_len=65536)], fsdp=False, gpu_counts=(1,)))
    assert f"NO: b={b}+ckpt" in text


def test_a_global_batch_caps_the_gpus_a_run_can_use():
    cfg = preset("50m")
    one_step = 8 * 2048  # b x s tokens: one micro-batch per GPU
    lone = schedule([StagePlan("proxy", cfg, 1e9, global_batch_tokens=4 * one_step)])["stages"][0]
    assert lone["max_useful_gpus"] == 4
    on64 = lone["gpus"]["64"]
    assert on64["gpus_per_run"] == 4 and on64["idle_gpus"] == 60
    assert on64["wall_hours"] == pytest.approx(lone["gpu_hours"] / 4)
    assert on64["memory_gib"] == memory_gib(cfg, 2048, 8, 4, fsdp=True)["total"]
    assert on64["steps_per_run"] == pytest.approx(1e9 / (4 * one_step))
    # 16 such runs fill the 64 GPUs side by side
    many = schedule([StagePlan("proxy", cfg, 1e9, runs=16, global_batch_tokens=4 * one_step)])["stages"][0]
    assert many["gpus"]["64"]["runs_side_by_side"] == 16 and many["gpus"]["64"]["idle_gpus"] == 0
    assert many["gpus"]["64"]["wall_hours"] == pytest.approx(many["gpu_hours"] / 64)
    assert "proxy on 64 GPUs: 1 run(s) side by side on 4 GPUs each, 60 idle" in format_schedule(
        schedule([StagePlan("proxy", cfg, 1e9, global_batch_tokens=4 * one_step)]))


def test_totals_are_the_sums_and_name_the_costliest_stage():
    r = schedule(_build())
    t, stages = r["totals"], r["stages"]
    assert t["flops"] == pytest.approx(sum(s["flops"] for s in stages))
    assert t["gpu_hours"] == pytest.approx(sum(s["gpu_hours"] for s in stages))
    for n in (1, 8, 64):
        assert t["wall_hours"][str(n)] == pytest.approx(sum(s["gpus"][str(n)]["wall_hours"] for s in stages))
    assert t["costliest"] == "target"
    assert t["costliest_share"] == pytest.approx(stages[1]["gpu_hours"] / t["gpu_hours"])
    assert r["setup"]["gpu_counts"] == [1, 8, 64] and r["setup"]["usable_memory_gib"] == H100_USABLE
    # the build saves the schedule as JSON and reads it back on resume: string GPU-count keys survive that
    assert json.loads(json.dumps(r)) == r
    assert format_schedule(json.loads(json.dumps(r))) == format_schedule(r)


def test_format_shows_every_stage_and_the_totals():
    r = schedule(_build())
    text = format_schedule(r)
    lines = text.splitlines()
    for stage in r["stages"]:
        row = next(line for line in lines if line.strip().startswith(stage["name"]))
        assert _si(stage["flops"], "FLOP") in row and row.count(" ok") == 3
    total = next(line for line in lines if line.strip().startswith("total"))
    assert _si(r["totals"]["flops"], "FLOP") in total and f"{r['totals']['gpu_hours']:,.1f}" in total
    assert "wall@64" in text and "GiB/GPU@64" in text and "costliest stage: target" in text
    assert "3 x 1 B" in text  # the proxies' runs


@pytest.mark.parametrize("kwargs, stages, match", [
    (dict(gpu="h1000"), None, r"unknown GPU \(gpu\) 'h1000'.*Did you mean h100"),
    ({}, [], r"^stages: "),
    (dict(mfu=0), None, r"^mfu=0: expected a fraction in \(0, 1\]"),
    (dict(mfu=1.5), None, r"^mfu=1.5: "),
    (dict(gpu_counts=(8, 0)), None, r"^gpu_counts=\(8, 0\): "),
    ({}, [StagePlan("anneal", preset("tiny"), 0)], r"^stages\[0\] \('anneal'\)\.tokens=0: "),
    ({}, [StagePlan("sft", preset("tiny"), 1e6, runs=0)], r"^stages\[0\] \('sft'\)\.runs=0: "),
    ({}, [StagePlan("orpo", preset("tiny"), 1e6, passes=-1)], r"^stages\[0\] \('orpo'\)\.passes=-1: "),
])
def test_bad_inputs_name_the_key(kwargs, stages, match):
    with pytest.raises(ValueError, match=match) as err:
        schedule([StagePlan("target", preset("tiny"), 1e6)] if stages is None else stages, **kwargs)
    assert "\n" not in str(err.value)
