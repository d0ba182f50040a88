"""The textbook synthesizer: retry policy, fault tolerance, crash safety, ids, templates and answer checks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx2
import pytest
import yaml

from slmforge.config import merge
from slmforge.synth.jobs import (Store, SynthJob, clean, load_job, output_dir, plan_requests, request_id,
                                 synthesize)
from slmforge.synth.prompts import Reject, check_math, load_template, parse_answer
from slmforge.synth.teacher import (OpenAITeacher, Request, RequestRejected, RetriesExhausted,
                                         RetryBudgetExhausted, TeacherConfig, TeacherSetupError, backoff_delay,
                                         parse_retry_after)
from tests.conftest import SHARED_DATA, needs_data
from tests.synth.synth_fault_server import EXPECTED_RETRIES, REJECTED_CLASSES, FaultServer, id_class, math_answer

REPO = Path(__file__).resolve().parents[2]
FAST = dict(model="mock", concurrency=4, timeout=1.0, backoff_base=0.01, backoff_max=0.05, max_retries=4)


def math_job(out: Path, base_url: str = "", num_topics: int = 20, **kw) -> SynthJob:
    teacher = dict(FAST, base_url=base_url, **kw.pop("teacher", {}))
    return merge(SynthJob(), dict(name="test", template="math", out_dir=str(out), topics=[f"t{i}" for i in range(
        num_topics)], audiences=["grade 3"], styles=["two steps", "three steps"], teacher=teacher, **kw))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "shards").glob("*.jsonl")) for line in p.read_text().splitlines()]


def rejects(out: Path) -> list[dict]:
    path = out / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------- retry policy


def test_backoff_is_full_jitter_within_bounds():
    cfg, rng = TeacherConfig(backoff_base=0.5, backoff_max=8.0), random.Random(0)
    for retry in range(8):
        bound = min(8.0, 0.5 * 2 ** retry)
        delays = [backoff_delay(retry, cfg, rng) for _ in range(400)]
        assert 0 <= min(delays) < 0.1 * bound and 0.9 * bound < max(delays) <= bound
        assert abs(sum(delays) / len(delays) - bound / 2) < 0.1 * bound  # uniform(0, bound) has mean bound/2


def test_retry_after_is_honoured_and_capped():
    cfg, rng = TeacherConfig(backoff_base=0.01, backoff_max=0.02, max_retry_after=5.0), random.Random(0)
    assert all(backoff_delay(0, cfg, rng, retry_after=3.0) == 3.0 for _ in range(50))
    assert backoff_delay(0, cfg, rng, retry_after=60.0) == 5.0
    assert 0 <= backoff_delay(3, cfg, rng, retry_after=0.0) <= 0.02
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None
    in_10_s = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 10))
    assert 8 < parse_retry_after({"retry-after": in_10_s}) <= 10


def _mock_teacher(handler, **kw) -> OpenAITeacher:
    cfg = TeacherConfig(**dict(FAST, base_url="http://mock/v1", **kw))
    return OpenAITeacher(cfg, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))


def _ok(rid: str) -> httpx2.Response:
    return httpx2.Response(200, json={"model": "mock", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": math_answer(rid)}}], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})


def _request(rid: str = "r") -> Request:
    return Request(rid, "math", "gsm8k", [{"role": "user", "content": "hi"}], {})


def test_per_request_cap_then_total_cap():
    calls = Counter()

    def always_500(req):
        calls[req.headers["x-request-id"]] += 1
        return httpx2.Response(503, json={})

    async def one():
        teacher = _mock_teacher(always_500, max_retries=3)
        with pytest.raises(RetriesExhausted):
            await teacher.complete(_request("a"))
        return teacher

    teacher = asyncio.run(one())
    assert calls["a"] == 4 and teacher.retries == 3 and teacher.retry_reasons == {"http 503": 3}

    async def many():
        teacher = _mock_teacher(always_500, max_retries=10, max_total_retries=5)
        out = await asyncio.gather(*(teacher.complete(_request(f"b{i}")) for i in range(3)), return_exceptions=True)
        return teacher, out

    teacher, out = asyncio.run(many())
    assert teacher.retries == 5 and all(isinstance(e, RetryBudgetExhausted) for e in out)


def test_429_waits_for_retry_after_and_usage_is_counted():
    seen = []

    def handler(req):
        seen.append(time.perf_counter())
        if len(seen) == 1:
            return httpx2.Response(429, headers={"Retry-After": "0.3"}, json={})
        return _ok(req.headers["x-request-id"])

    async def go():
        teacher = _mock_teacher(handler, backoff_base=0.001)
        return teacher, await teacher.complete(_request())

    teacher, completion = asyncio.run(go())
    assert seen[1] - seen[0] >= 0.3 and completion.retries == 1 and teacher.retry_reasons == {"http 429": 1}
    assert teacher.usage() == {"prompt_tokens": 3, "completion_tokens": 4} and "#### " in completion.text


@pytest.mark.parametrize("status,error", [(400, RequestRejected), (422, RequestRejected), (401, TeacherSetupError),
                                          (404, TeacherSetupError)])
def test_client_errors_are_not_retried(status, error):
    calls = []

    async def go():
        teacher = _mock_teacher(lambda req: calls.append(1) or httpx2.Response(status, json={}))
        with pytest.raises(error):
            await teacher.complete(_request())

    asyncio.run(go())
    assert len(calls) == 1


# ---------------------------------------------------------------- against a misbehaving server


def test_job_completes_against_fault_server_every_id_once(tmp_path):
    out = tmp_path / "out"
    with FaultServer(hang_seconds=3.0) as server:
        job = math_job(out, server.base_url, num_topics=30)
        summary = synthesize(job, progress=False)
    planned = [r.id for r in plan_requests(job, load_template("math"))]
    classes = {rid: id_class(rid) for rid in planned}
    assert len(planned) == 60 and set(classes.values()) == set(range(10))  # every fault is exercised
    written, rejected = [r["id"] for r in records(out)], [r["id"] for r in rejects(out)]
    assert sorted(written) == sorted(rid for rid, c in classes.items() if c not in REJECTED_CLASSES)
    assert sorted(rejected) == sorted(rid for rid, c in classes.items() if c in REJECTED_CLASSES)
    assert summary["retries"] == sum(EXPECTED_RETRIES.get(c, 0) for c in classes.values())
    assert set(summary["retry_reasons"]) == {"http 500", "http 429", "timeout", "connection", "bad response"}
    assert summary["complete"] and summary["failed"] == 0 and summary["written"] == len(written)
    reasons = {r["id"]: r["reason"] for r in rejects(out)}
    for rid, c in classes.items():
        if c in REJECTED_CLASSES:
            assert {4: "chatty preamble", 5: "math check", 7: "http 400"}[c] in reasons[rid]
    num_answers = summary["written"] + sum(c in (4, 5) for c in classes.values())  # 200s with a chat completion
    assert summary["usage"] == {"prompt_tokens": 11 * num_answers, "completion_tokens": 7 * num_answers}
    # A rerun asks for nothing: written and rejected ids are done.
    with FaultServer() as server:
        again = synthesize(math_job(out, server.base_url, num_topics=30), progress=False)
        assert sum(server.attempts.values()) == 0
    assert again["requested"] == 0 and again["skipped_existing"] == 60 and len(records(out)) == len(written)


def test_retry_rejects_asks_again_and_dead_server_stops_the_job(tmp_path):
    out = tmp_path / "out"
    with FaultServer(plan=lambda rid, attempt: "malformed") as server:  # nothing accepted: an error with the reason
        with pytest.raises(ValueError, match=r"0 of 6 requests accepted, 6 rejected: chatty preamble \(6, "):
            synthesize(math_job(out, server.base_url, num_topics=3), progress=False)
    first = json.loads((out / "summary.json").read_text())
    assert first["rejected"] == 6 and first["written"] == 0 and len(rejects(out)) == 6
    with FaultServer(plan=lambda rid, attempt: "ok") as server:
        second = synthesize(math_job(out, server.base_url, num_topics=3, retry_rejects=True), progress=False)
    assert second["requested"] == 6 and len(records(out)) == 6 and second["complete"]
    with FaultServer(plan=lambda rid, attempt: "500") as server:
        dead = synthesize(math_job(tmp_path / "dead", server.base_url, num_topics=50,
                                   teacher=dict(max_total_retries=10)), progress=False)
    assert dead["stopped"] and dead["retries"] == 10 and not dead["complete"] and dead["requested"] < 100


def test_sigkill_mid_run_then_rerun_has_every_id_exactly_once(tmp_path):
    out, path = tmp_path / "out", tmp_path / "job.yaml"
    with FaultServer(plan=lambda rid, attempt: "ok", delay=0.03) as server:
        job = math_job(out, server.base_url, num_topics=60)
        path.write_text(yaml.safe_dump(dataclasses.asdict(job)))
        proc = subprocess.Popen([sys.executable, "-m", "slmforge.synth.jobs", str(path), "--no-progress"],
                                cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
        shard = out / "shards" / "00000.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and not (shard.exists() and shard.read_bytes().count(b"\n") >= 25):
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = records(out)
        answered_before = sum(server.answered.values())
        summary = synthesize(load_job(path), progress=False)
    planned = [r.id for r in plan_requests(job, load_template("math"))]
    ids = [r["id"] for r in records(out)]
    assert 25 <= len(before) < len(planned) == 120  # killed mid-run
    assert answered_before - len(before) <= 2 * job.teacher.concurrency  # lost: at most the requests in flight
    assert len(ids) == len(set(ids)) and set(ids) == set(planned) and summary["complete"]
    assert summary["skipped_existing"] == len(before) and summary["requested"] == len(planned) - len(before)


def test_torn_last_line_is_dropped_and_redone(tmp_path):
    out = tmp_path / "out"
    job = math_job(out, num_topics=5, teacher=dict(name="procedural"))
    synthesize(job, progress=False)
    shard = out / "shards" / "00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:-1]) + lines[-1][:37])  # a write cut short mid-line
    summary = synthesize(job, progress=False)
    ids = [r["id"] for r in records(out)]
    assert summary["requested"] == 1 and len(ids) == len(set(ids)) == 10
    holder = Store(out, 100)  # a second run on the same folder while one is going is refused
    with pytest.raises(ValueError, match="another synth run"):
        synthesize(job, progress=False)
    holder.close()
    assert synthesize(job, progress=False)["skipped_existing"] == 10


# ---------------------------------------------------------------- ids, templates, offline jobs, checks


def test_request_ids_are_deterministic_and_distinct():
    t = load_template("math")
    job = math_job(Path("unused"), num_topics=4, samples_per_item=3)
    a, b = [r.id for r in plan_requests(job, t)], [r.id for r in plan_requests(job, t)]
    assert a == b and len(set(a)) == 4 * 2 * 3
    assert request_id("job", "seed", "math", 0) == request_id("job", "seed", "math", 0)
    variants = {request_id(*args) for args in [("job", "seed", "math", 0), ("job2", "seed", "math", 0),
                                                ("job", "seed2", "math", 0), ("job", "seed", "textbook", 0),
                                                ("job", "seed", "math", 1)]}
    assert len(variants) == 5


def test_offline_procedural_jobs_end_to_end(tmp_path):
    math = math_job(tmp_path / "math", num_topics=10, math_check="strict", teacher=dict(name="procedural"))
    summary = synthesize(math, progress=False)
    assert summary["written"] == 20 and summary["rejected"] == 0 and summary["complete"]
    assert json.loads((tmp_path / "math" / "summary.json").read_text())["written"] == 20
    for r in records(tmp_path / "math"):
        assert r["text"].startswith("Question: ") and r["text"].endswith(f"#### {r['fields']['answer']}")
    again = synthesize(math, progress=False)
    assert again["requested"] == 0 and again["skipped_existing"] == 20
    passages = tmp_path / "passages.txt"
    passages.write_text("The river Odra flows north through three countries before it reaches the sea.\n\n"
                        "Copper conducts electricity well, which is why most household wires are made of it.\n")
    qa = merge(SynthJob(), dict(name="qa", template="grounded_qa", out_dir=str(tmp_path / "qa"),
                                inputs=[str(passages)], samples_per_item=2, teacher=dict(name="procedural")))
    assert synthesize(qa, progress=False)["written"] == 4
    for r in records(tmp_path / "qa"):
        assert r["fields"]["answer"].lower() in r["seed"]["passage"].lower()
        assert r["text"].startswith(r["seed"]["passage"])


def test_math_check_catches_wrong_answers():
    t, q = load_template("math"), "Tom has 12 apples and buys 5 more. How many apples does he have?"
    good = f"Question: {q}\nSolution: He has 12 + 5 = <<12+5=17>>17 apples.\n#### 17"
    assert parse_answer(good, t)["answer"] == "17"
    for bad, why in [(good.replace("=17>>17", "=18>>18").replace("#### 17", "#### 18"), "is wrong"),
                     (good.replace("#### 17", "#### 18"), "differs from the last step"),
                     (good.replace("<<12+5=17>>", ""), "no well-formed"),
                     (good.replace("\n#### 17", " The answer is 17."), "#### N"),
                     (good.replace("Solution:", "Working:"), "missing or empty field 'Solution:'")]:
        with pytest.raises(Reject, match=why):
            parse_answer(bad, t)
    check_math(q, "Half is 10 / 4 = <<10/4=2.5>>2.5\n#### 2.5", "2.5")  # decimals are exact too
    with pytest.raises(Reject, match="uses"):  # strict: 99 appears nowhere in the question
        check_math(q, "He has 12 + 99 = <<12+99=111>>111.\n#### 111", "111", mode="strict")
    with pytest.raises(Reject, match="finish_reason=length"):
        parse_answer(good, t, finish_reason="length")


def test_template_errors_name_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("seed: grid\nuser: 'Write about {topic} in {langauge}'\n")
    with pytest.raises(ValueError, match=r"mine.yaml: user uses unknown placeholder\(s\) \['langauge'\]"):
        load_template(str(bad))
    with pytest.raises(ValueError, match="choose one of: exercises, grounded_qa, math, rewrite, textbook"):
        load_template("textbok")
    with pytest.raises(ValueError, match="needs topics"):
        synthesize(merge(SynthJob(), dict(out_dir=str(tmp_path / "o"), teacher=dict(name="procedural"))))


def test_clean_hook_dedups_and_decontaminates(tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    gsm8k = tmp_path / "eval.jsonl"
    question = ("Janet has three dogs and each dog eats two cups of food every single day of the week. How many "
                "cups of food do the dogs eat in one week?")
    gsm8k.write_text(json.dumps({"question": question, "answer": "#### 42"}) + "\n")
    texts = [f"Section {i}: " + " ".join(f"word{i}x{k}" for k in range(40)) for i in range(5)]
    texts += [texts[0], "Question: " + question + "\nAnswer: 42"]
    (out / "shards" / "00000.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n"
                                                        for i, t in enumerate(texts)))
    job = merge(SynthJob(), dict(out_dir=str(out), dedup=True, decontaminate=True, eval_paths=[str(gsm8k)]))
    report = clean(job)
    assert report["dedup"]["num_exact_removed"] == 1 and report["decontaminate"]["num_removed"] == 1
    kept = [json.loads(line)["id"] for p in Path(report["clean_dir"]).glob("*.jsonl")
            for line in p.read_text().splitlines()]
    assert sorted(kept) == ["r0", "r1", "r2", "r3", "r4"]


@needs_data(SHARED_DATA, REPO.parent / "shared" / "data")  # the recipes' seed documents
def test_every_synth_recipe_loads_and_plans():
    paths = sorted((REPO / "recipes").glob("synth_*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        job = load_job(path, ["max_seed_docs=2"])
        planned = list(plan_requests(job, load_template(job.template)))
        assert planned and all(r.messages[-1]["content"] for r in planned), path


def _requested_labels(prompt: str) -> list[str]:
    """The labels of the format block a prompt asks for: its lines 'Label: <...>'."""
    return re.findall(r"^(\w+): <", prompt, flags=re.M)


@pytest.mark.parametrize("template", ["math", "exercises", "textbook", "rewrite", "grounded_qa"])
def test_offline_teacher_follows_topic_and_format(template, tmp_path):
    passages = tmp_path / "passages.txt"
    passages.write_text(" ".join(["Copper conducts electricity well, so most household wires are made of it."] * 8))
    seeds = dict(topics=["a bakery"]) if load_template(template).seed == "grid" else dict(inputs=[str(passages)])
    job = merge(SynthJob(), dict(name=template, template=template, out_dir=str(tmp_path / "o"), samples_per_item=3,
                                 math_check="strict", teacher=dict(name="procedural"), **seeds))
    summary = synthesize(job, progress=False)
    assert summary["written"] == 3 and summary["rejected"] == 0  # every answer passes the job's checks
    for r in records(tmp_path / "o"):
        labels = _requested_labels(r["prompt"][-1]["content"])
        assert re.findall(r"^(\w+): ", r["raw"], flags=re.M)[:len(labels)] == labels  # the format asked for
        if "topics" in seeds:
            assert "bakery" in r["raw"].lower()
        if labels:
            assert r["raw"].startswith(f"{labels[0]}: ")
        else:
            assert r["raw"].startswith("# ")
    if template == "rewrite":
        assert all(r["seed"]["passage"] in r["raw"] for r in records(tmp_path / "o"))


def test_offline_teacher_writes_a_custom_templates_field_names(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("seed: grid\nparser: fields\nfields: [problem, working]\nprocedural: exercise\n"
                    "user: 'Write a problem about {topic}.\\nProblem: <...>\\nWorking: <...>'\n"
                    "text: '{problem} {working}'\n")
    job = merge(SynthJob(), dict(name="mine", template=str(mine), out_dir=str(tmp_path / "o"), topics=["a farm"],
                                 teacher=dict(name="procedural")))
    assert synthesize(job, progress=False)["written"] == 1
    (r,) = records(tmp_path / "o")
    assert r["raw"].startswith("Problem: In a farm, ") and "\nWorking: " in r["raw"]
    assert r["fields"]["working"].endswith(f"The answer is {r['raw'].rsplit(' ', 1)[1]}")


def test_default_out_dir_is_per_job_under_the_ignored_runs_folder():
    assert output_dir(SynthJob(name="math-v2")) == Path("runs/synth/math-v2")
    assert output_dir(SynthJob(name="x", out_dir="/tmp/elsewhere")) == Path("/tmp/elsewhere")
    assert "runs/" in (REPO / ".gitignore").read_text().splitlines()
    for path in sorted((REPO / "recipes").glob("synth_*.yaml")):
        out = yaml.safe_load(path.read_text()).get("out_dir", "runs/synth")
        assert out.startswith("runs/"), path
