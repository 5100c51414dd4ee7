"""--engine ray on a local 2-CPU Ray cluster: the local run's records, resume, a killed worker,
bad rows, duplicate ids and layouts that would deadlock. Ray keeps to temporary folders here."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

from biogpt_cli import cluster  # noqa: E402
from biogpt_cli.cluster import Worker  # noqa: E402
from biogpt_cli.errors import BioGptError  # noqa: E402
from tests.conftest import one_error_line  # noqa: E402
from tests.fixtures import descendants  # noqa: E402

N = 100


@pytest.fixture(scope="module")
def local_ray():
    """One 2-CPU cluster for the module (start and stop take seconds); no auth token in ~/.ray."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = tempfile.mkdtemp(prefix="ray-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    yield
    ray.shutdown()


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"the {'cat and ' * (i % 4)}dog {i}"}) + "\n"
                            for i in range(N)))
    return path


def records(folder: Path) -> list[dict]:
    return [json.loads(x) for part in sorted(folder.glob("part-*.jsonl")) for x in part.read_text().splitlines()]


def settings(**extra):
    return {"max_new_tokens": 6, "seed": 1, **extra}


def run(folder, prompts, out, worker=Worker, workers=1, cpus=1.0):
    load = {"path_or_id": str(folder), "revision": None, "dtype": "float32", "quantize": "none", "device": "cpu"}
    return cluster.run("generate", settings(), load, str(prompts), str(out), address=None, workers=workers,
                       cpus_per_worker=cpus, gpus_per_worker=0, batch_size=8, rows_per_batch=10, worker=worker)


def test_records_equal_the_local_run(cli, local_ray, tiny_ref, prompts, tmp_path):
    """Whatever the workers' speculation (the folder records it), the local run's tokens."""
    folder = tiny_ref[1]
    code, _, err = cli("generate", "--engine", "ray", "-m", folder, "-n", "6", "-i", prompts, "-o", tmp_path / "out",
                       "--speculate", "ngram", "--draft-tokens", "3")
    assert code == 0, err
    settings = json.loads((tmp_path / "out.manifest.json").read_text())["run"]["settings"]
    assert (settings["speculate"], settings["draft_tokens"]) == ("ngram", 3)
    got = {r["id"]: r for r in records(tmp_path / "out")}
    assert len(got) == N and len(records(tmp_path / "out")) == N
    code, local, _ = cli("generate", "-m", folder, "-n", "6", "-i", prompts, "--format", "jsonl")
    expected = {r["id"]: r for r in map(json.loads, local.splitlines())}
    assert {k: (v["ids"], v["text"]) for k, v in got.items()} == {k: (v["ids"], v["text"]) for k, v in expected.items()}


def test_constrained_records_equal_the_local_run(cli, local_ray, tiny_ref, prompts, tmp_path):
    """A row's constraint is built in the worker from the run's settings, as locally."""
    args = ("generate", "-m", tiny_ref[1], "-n", "4", "-i", prompts, "--choices", "x,y z,the")
    code, _, err = cli(*args, "--engine", "ray", "-o", tmp_path / "out")
    assert code == 0, err
    code, local, _ = cli(*args, "--format", "jsonl")
    expected = {r["id"]: r["choice"] for r in map(json.loads, local.splitlines())}
    assert {r["id"]: r["choice"] for r in records(tmp_path / "out")} == expected
    assert set(expected.values()) <= {"x", "y z", "the"}


@pytest.mark.parametrize("command", ["score", "embed"])
def test_texts_read_whole_give_the_local_records(cli, local_ray, tiny_ref, tmp_path, command):
    """score and embed on Ray: the local run's records, batched; a bad text is an error record and
    costs its batch nothing."""
    texts = [f"the {'cat and ' * (i % 4)}dog {i}" for i in range(20)]
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)] + [{"id": 20, "text": "\x00"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ("--normalize", "--pool", "last") if command == "embed" else ()
    code, _, err = cli(command, "--engine", "ray", "-m", tiny_ref[1], "-i", tmp_path / "in.jsonl", "-o",
                       tmp_path / "out", *extra)
    assert code == 0, err
    got = {r.pop("id"): r for r in records(tmp_path / "out")}
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    jsonl = ("--format", "jsonl") if command == "score" else ()  # embed writes nothing else
    code, out, err = cli(command, "-m", tiny_ref[1], "-i", tmp_path / "good.jsonl", *extra, *jsonl)
    assert code == 0, err
    local = {r.pop("id"): r for r in map(json.loads, out.splitlines())}
    for i in range(20):
        assert got[i].keys() == local[i].keys()  # "line" included
        for key, value in local[i].items():  # to float32 rounding: other batches may run another GEMM
            assert got[i][key] == pytest.approx(value, rel=1e-6, abs=1e-5), (i, key)
    assert "nothing to embed" in got[20]["error"] if command == "embed" else got[20]["nll"] is None


def test_rerun_finishes_only_missing_ids(local_ray, tiny_ref, prompts, tmp_path):
    class Dying(Worker):
        def records(self, items):
            if any(int(p.id[1:]) >= 60 for p in items):
                raise RuntimeError("this batch function dies after some ids")
            return super().records(items)

    out = tmp_path / "out"
    with pytest.raises(BioGptError, match="re-run the same command"):
        run(tiny_ref[1], prompts, out, worker=Dying)
    before = {r["id"] for r in records(out)}
    assert 0 < len(before) < N
    now, kept = run(tiny_ref[1], prompts, out)
    assert kept == len(before) and now == N - len(before)  # only the missing ids were processed
    ids = [r["id"] for r in records(out)]
    assert sorted(ids) == sorted(f"p{i}" for i in range(N))


def test_a_folder_keeps_its_run(cli, local_ray, tiny_ref, prompts, tmp_path):
    """A re-run with other settings, or with other model files under the same path, is refused
    instead of mixing its records in; --force starts over."""
    import shutil

    out, model = tmp_path / "out", shutil.copytree(tiny_ref[1], tmp_path / "model")
    args = ("generate", "--engine", "ray", "-m", model, "-i", prompts, "-o", out, "-n")
    assert cli(*args, "6")[0] == 0
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert (manifest["status"], manifest["records"], type(manifest["seed"])) == ("complete", N, int)
    import hashlib  # the input's sha256 is its bytes', as sha256sum and a local run's manifest give it

    assert manifest["run"]["input_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")  # another model, same path
    code, _, err = cli(*args, "6")
    assert code == 1 and "written by a different run (model.model_files.sha256 " in one_error_line(err)
    (model / "config.json").write_text((model / "config.json").read_text()[:-1])
    prompts.write_text(prompts.read_text().replace('"p7"', '"q7"'))  # another input, same path
    code, _, err = cli(*args, "6")
    assert code == 1 and "written by a different run (input_sha256 " in one_error_line(err)
    prompts.write_text(prompts.read_text().replace('"q7"', '"p7"'))
    args = (*args, "7")
    code, _, err = cli(*args)
    assert code == 1 and "written by a different run (settings.max_new_tokens 6 -> 7)" in one_error_line(err)
    assert len(records(out)) == N
    code, _, err = cli(*args, "--force")
    assert code == 0 and len(records(out)) == N and max(len(r["ids"]) for r in records(out)) == 7, err
    assert json.loads((tmp_path / "out.manifest.json").read_text())["run"]["settings"]["max_new_tokens"] == 7


def test_a_sampled_folder_is_finished_with_its_own_seed(tmp_path):
    from biogpt_cli.output import write_manifest

    write_manifest(tmp_path / "out", {}, seed=7)
    assert cluster._with_seed({"seed": None}, tmp_path / "out", resuming=True)["seed"] == 7
    assert cluster._with_seed({"seed": 7}, tmp_path / "out", resuming=True)["seed"] == 7
    with pytest.raises(BioGptError, match="written with seed 7, not 8"):
        cluster._with_seed({"seed": 8}, tmp_path / "out", resuming=True)
    fresh = {cluster._with_seed({"seed": None}, tmp_path / "out", resuming=False)["seed"] for _ in range(3)}
    assert 7 not in fresh and len(fresh) > 1
    assert cluster._with_seed({}, tmp_path / "out", resuming=True) == {}  # score and the tasks draw nothing


def test_a_killed_worker_is_replaced(local_ray, tiny_ref, prompts, tmp_path):
    marker = tmp_path / "killed"

    class Killed(Worker):
        def records(self, items):
            if not marker.exists() and "p30" in [p.id for p in items]:
                marker.touch()
                os._exit(1)  # the actor process dies mid-batch, once
            return super().records(items)

    run(tiny_ref[1], prompts, tmp_path / "out", worker=Killed)
    ids = [r["id"] for r in records(tmp_path / "out")]
    assert marker.exists() and sorted(ids) == sorted(f"p{i}" for i in range(N))


def test_a_prompt_too_long_becomes_an_error_record(cli, local_ray, tiny_ref, tmp_path):
    rows = [{"id": 1, "prompt": "the cat"}, {"id": 2, "prompt": "word " * 200}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli("generate", "--engine", "ray", "-m", tiny_ref[1], "-n", "4", "-i", tmp_path / "in.jsonl",
                       "-o", tmp_path / "out")
    assert code == 0, err
    got = {r["id"]: r for r in records(tmp_path / "out")}
    assert "ids" in got[1] and "exceeds the model's 64 positions" in got[2]["error"]


@pytest.mark.parametrize("command, record, message", [
    ("generate", {"id": 3, "text": "no prompt"}, 'line 2: expected an object with a string "prompt"'),
    ("generate", {"id": 3.5, "prompt": "x"}, 'line 2: "id" must be a string or an integer'),
    ("generate", {"prompt": "x"}, 'line 2: --engine ray needs a string or integer "id"'),
    ("qa", {"id": 3, "question": "q"}, 'line 2: expected a string field "context"'),
])
def test_bad_records_are_named_before_any_work(cli, tiny_ref, tmp_path, command, record, message):
    from tests.conftest import make_reference

    model = tiny_ref[1]
    if command == "qa":
        model = tmp_path / "qa"
        model.mkdir()
        make_reference(model, prompt_tokens=3)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "learned_prompt": 3, "task": "pubmedqa"}))
    first = {"id": 1, "prompt": "a", "question": "q", "context": "c"}
    (tmp_path / "in.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n")
    code, _, err = cli(command, "--engine", "ray", "-m", model, "-i", tmp_path / "in.jsonl", "-o", tmp_path / "out")
    assert code == 1 and f"in.jsonl: {message}" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_records_with_line_breaks_of_every_kind_stay_whole(cli, local_ray, tiny_ref, tmp_path):
    """U+2028, U+2029, U+0085 and a lone \\r inside a prompt: one record each, in the parts and on
    the re-run that reads them; ids of mixed types; every record carries its line."""
    texts = ["Aspirin\u2028is", "the\u2029cat", "of\x85the", "and\rthen", "the dog"]
    rows = [{"id": i if i % 2 else f"s{i}", "prompt": t} for i, t in enumerate(texts)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                       encoding="utf-8")
    args = ("generate", "--engine", "ray", "-m", tiny_ref[1], "-n", "3", "-i", tmp_path / "in.jsonl", "-o",
            tmp_path / "out")
    code, _, err = cli(*args)
    assert code == 0, err
    raw = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "out").glob("part-*.jsonl"))
    assert raw.count("\n") == len(rows) and "\u2028" not in raw  # escaped, so no reader splits a record
    got = {r["id"]: r for r in records(tmp_path / "out")}
    assert {k: (r["prompt"], r["line"]) for k, r in got.items()} == {r["id"]: (r["prompt"], i + 1)
                                                                     for i, r in enumerate(rows)}
    code, local, _ = cli("generate", "-m", tiny_ref[1], "-n", "3", "-i", tmp_path / "in.jsonl", "--format", "jsonl")
    assert [json.loads(x) for x in local.split("\n") if x] == sorted(got.values(), key=lambda r: r["line"])
    code, _, err = cli(*args)  # the re-run reads its own parts
    assert code == 0 and "0 records written" in err and "(5 were there already)" in err


@pytest.mark.parametrize("args, named", [
    (["--quantize", "int8", "--gpus-per-worker", "1"], "--quantize int8 runs on CPU workers"),
    (["--device", "cuda"], "cuda"),  # no CUDA here: refused by the local check; with CUDA, by --gpus-per-worker's
    (["--resume"], "--resume does not apply to --engine ray"),
    (["-v"], "--verbose does not apply to --engine ray"),
])
def test_ray_settings_take_effect_or_are_refused(cli, tiny_ref, tmp_path, args, named):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    code, _, err = cli("generate", "--engine", "ray", "-m", tiny_ref[1], "-i", tmp_path / "in.jsonl", "-o",
                       tmp_path / "out", *args)
    assert code == 2 and named in one_error_line(err)


def test_an_error_of_ours_in_a_worker_is_not_told_to_rerun(local_ray, tiny_ref, prompts, tmp_path):
    from biogpt_cli.errors import InputError

    class Refusing(Worker):
        def records(self, items):
            raise InputError("this worker refuses its records")

    with pytest.raises(BioGptError) as caught:
        run(tiny_ref[1], prompts, tmp_path / "out", worker=Refusing)
    assert "this worker refuses its records" in str(caught.value) and "re-run" not in str(caught.value)


def test_duplicate_ids_and_impossible_layouts_are_refused_before_any_work(cli, tiny_ref, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n{"id": 1, "prompt": "c"}\n')
    code, _, err = cli("generate", "--engine", "ray", "-m", tiny_ref[1], "-i", tmp_path / "in.jsonl",
                       "-o", tmp_path / "out")
    assert code == 1 and "id 1 is repeated (first at in.jsonl line 1)" in one_error_line(err)
    assert not (tmp_path / "out").exists()
    for command, option in (("generate", "--format"), ("score", "--input-format"), ("qa", "--format")):
        code, _, err = cli(command, "--engine", "ray", "-m", tiny_ref[1], "-i", tmp_path / "in.jsonl", "-o",
                           tmp_path / "out", option, "text")
        assert code == 2 and "reads and writes JSONL records" in one_error_line(err), (command, err)
    code, _, err = cli("generate", "--engine", "ray", "-m", tiny_ref[1], "-i", tmp_path, "-o", f"{tmp_path}/.")
    assert code == 1 and "is also the input folder" in one_error_line(err)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    (tmp_path / "in.txt").write_text("a plain prompt\n")
    code, _, err = cli("generate", "--engine", "ray", "-m", tiny_ref[1], "-i", tmp_path / "in.txt",
                       "-o", tmp_path / "out")
    assert code == 1 and 'line 1: not JSON' in err and 'reads JSONL records, each with an "id"' in one_error_line(err)


def test_a_layout_that_would_deadlock_is_refused(local_ray, tiny_ref, prompts, tmp_path):
    with pytest.raises(BioGptError, match="Ray would wait forever"):
        run(tiny_ref[1], prompts, tmp_path / "out", workers=2, cpus=1.0)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.manifest.json").exists()  # nothing made


def test_a_folder_of_pubmed_files_is_split_by_file_and_equals_the_local_run(cli, local_ray, tiny_ref, tmp_path):
    """A baseline-like folder of `.xml.gz` files: each file is a shard, every citation a record keyed
    by its PMID, the local run's records; a re-run redoes only the files whose records are missing."""
    import gzip

    from tests.test_literature import PUBMED

    folder = tmp_path / "baseline"
    folder.mkdir()
    for k in range(3):
        text = PUBMED.replace("3100000", f"3{k}00000")  # other PMIDs in each file
        (folder / f"pubmed25n000{k + 1}.xml.gz").write_bytes(gzip.compress(text.encode()))
    args = ("score", "-m", tiny_ref[1], "--truncate")
    code, _, err = cli(*args, "-i", folder / "pubmed25n0001.xml.gz", "-o", tmp_path / "local.jsonl", "-q")
    assert code == 0, err
    code, _, err = cli(*args, "-i", folder, "-o", tmp_path / "out", "--engine", "ray", "-q")
    assert code == 0 and "12 records written" in err, err
    ours = {r["id"]: r for r in records(tmp_path / "out")}
    local = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert len(ours) == 12 and all(ours[r["id"]] == r for r in local)
    import hashlib  # a folder's: of its files' `sha256  name` lines, as `sha256sum * | sha256sum` in it

    listing = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in sorted(folder.iterdir()))
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert manifest["run"]["input_folder_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    next((tmp_path / "out").glob("part-*.jsonl")).unlink()  # one file's records lost
    code, _, err = cli(*args, "-i", folder, "-o", tmp_path / "out", "--engine", "ray", "-q")
    assert code == 0 and "4 records written to" in err and "(8 were there already)" in err, err


def test_an_output_named_as_a_file_is_refused_before_anything_is_made(cli, tiny_ref, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    code, _, err = cli("generate", "--engine", "ray", "-m", tiny_ref[1], "-i", tmp_path / "in.jsonl", "-o",
                       tmp_path / "out.jsonl")
    assert code == 2 and "writes a folder of part files, not one file" in one_error_line(err)
    assert not (tmp_path / "out.jsonl").exists()


def test_serve_replicas_answer_as_one_server_and_replace_a_killed_one(local_ray, tiny_ref):
    """`biogpt serve --replicas 2` (fleet.py) on Ray Serve: greedy answers equal generate's (a
    single server's, tested there), /health and /metrics cover both replicas (labelled, and
    summed), and a killed replica is replaced while the other keeps answering."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray,serve]')")
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import socket
    import time

    import httpx
    from ray import serve

    from biogpt_cli import GenerationOptions, fleet, generate
    from biogpt_cli.limits import Limits
    from biogpt_cli.loading import load_pretrained
    from biogpt_cli.streaming import continuation

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"load": {"path_or_id": str(tiny_ref[1])}, "names": ["tiny"], "api_key": None, "origins": [],
            "hosts": None, "limits": Limits(), "threads": 1}
    stop = fleet.start(spec, 2, 0.5, 0, "127.0.0.1", port, None)
    url = f"http://127.0.0.1:{port}"
    lm, tok = load_pretrained(tiny_ref[1])

    def ask(prompt: str) -> httpx.Response:
        return httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0},
                          timeout=300)

    def replicas() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::biogpt#")]

    try:
        for prompt in ("the cat", "of the", "a b c", "dna and"):
            ids = tok.encode(prompt)
            want = continuation(tok, ids, generate(lm, [ids], GenerationOptions(max_new_tokens=6))[0][0].ids)[0]
            assert ask(prompt).json()["choices"][0]["text"] == want
        deadline = time.time() + 600  # a safety net: replicas post their figures once a second
        while len(httpx.get(url + "/health", timeout=300).json()["replicas"]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len(httpx.get(url + "/health", timeout=300).json()["replicas"]) == 2
        metrics = httpx.get(url + "/metrics", timeout=300).text
        assert metrics.count('biogpt_prompt_tokens_total{replica="') == 2
        assert "\nbiogpt_fleet_prompt_tokens_total " in metrics
        killed = replicas()[0]
        ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True)
        assert all(ask("the cat").status_code == 200 for _ in range(6))
        deadline = time.time() + 120
        while time.time() < deadline:
            states = serve.status().applications[fleet.APP].deployments["BioGptReplica"].replica_states
            if states.get("RUNNING") == 2 and killed not in replicas() and len(replicas()) == 2:
                break
            time.sleep(1)
        assert states.get("RUNNING") == 2 and killed not in replicas() and len(replicas()) == 2
        assert ask("of the").status_code == 200
    finally:
        stop()


def test_sigterm_stops_the_replicas_and_the_ray_they_started(tiny_ref, tmp_path):
    """`serve --replicas` under SIGTERM (what systemd, Docker and Kubernetes send) stops as Ctrl-C
    does: the fleet, then the Ray it started, agents and all (Ray's own handler would end the
    process at once and leave them running under init); exit 143."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray,serve]')")
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, as a user's first run
    server = subprocess.Popen([sys.executable, "-m", "biogpt_cli", "serve", "--replicas", "1", "-m", str(tiny_ref[1]),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              cwd=tmp_path)
    deadline, seen = time.time() + 300, b""
    while b"serving" not in seen:
        assert server.poll() is None and time.time() < deadline, seen.decode(errors="replace")
        seen += server.stderr.readline()
    family = descendants(server.pid)
    assert family, "no Ray processes under the server"
    server.send_signal(signal.SIGTERM)
    assert server.wait(120) == 143
    deadline = time.time() + 30
    while (left := [p for p in family if Path(f"/proc/{p}").exists()]) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [cmdline(p) for p in left]


def test_sigterm_ends_an_engine_ray_run_and_the_ray_it_started(tiny_ref, tmp_path):
    """`--engine ray` under SIGTERM, as under Ctrl-C: the run ends (exit 143), its folder resumable,
    and the Ray it started goes with it, agents and all."""
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"the dog {i}"}) + "\n" for i in range(400)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.Popen([sys.executable, "-m", "biogpt_cli", "generate", "--engine", "ray", "-m", str(tiny_ref[1]),
                            "-n", "200", "-i", str(src), "-o", str(tmp_path / "out"), "-q"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    deadline, manifest = time.time() + 300, tmp_path / "out.manifest.json"
    while not manifest.exists():  # its Ray is up (a manifest is written once connected) and the run under way
        assert run.poll() is None and time.time() < deadline, run.stderr.read().decode(errors="replace")
        time.sleep(0.5)
    family = descendants(run.pid)
    assert any(b"raylet" in cmdline(p) for p in family)
    run.send_signal(signal.SIGTERM)
    assert run.wait(120) == 143, run.stderr.read().decode(errors="replace")
    deadline = time.time() + 30
    while (left := [p for p in family if Path(f"/proc/{p}").exists()]) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [cmdline(p) for p in left]
    assert json.loads(manifest.read_text())["status"] == "interrupted"  # and the folder resumable


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()[:100]
    except OSError:
        return b""
