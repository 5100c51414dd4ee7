"""Batch commands on a Ray cluster (`--engine ray`, the `ray` extra; the core never imports this).

The driver reads the JSONL input first, with the local command's own record reader (`line` and
`id` kept, every record checked, a bad one named by file and line before any work), and cuts it
into shards: byte ranges of at most `rows_per_batch` records not yet done. Ray hands the shards to
an actor pool that loads the model once per worker; each worker reads its ranges with the same
reader and runs the same plan (plans.py) as a local run, so the records are the ones the local
run writes. Each shard is written as one part file, `part-<hash of its ids>.jsonl`, under a
temporary name and renamed when complete: a killed worker leaves no partial file, Ray redoes its
shard under the same name, and a re-run of the same command skips the ids already in part files.
The folder's run manifest (`FOLDER.manifest.json`, as beside a local output file) keeps a re-run
with other settings from mixing its records in, and keeps a sampled run's seed for the re-run that
finishes it. A record the plan cannot build (a prompt too long) becomes a record with an `error`
field; a model that cannot load fails the run before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BioGptError, InputError, missing_extra
from .files import write_text
from .inputs import Prompt, open_input, parse_record, read_records, record_format
from .jsonl import dumps, lines
from .output import check_manifest, manifest_path, manifested

PART = "part-*.jsonl"


def ray_module() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise missing_extra("--engine ray", "ray") from None
    return ray


INPUTS = ("*.jsonl", "*.xml", "*.xml.gz", "*.json", "*.pubtator", "*.PubTator")


def input_files(path: str) -> list[Path]:
    """A JSONL or literature file, or a folder of them (a baseline's `.xml.gz` files, say)."""
    p = Path(path)
    files = sorted({f for pattern in INPUTS for f in p.glob(pattern)}) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise InputError(f"{path}: no input: a JSONL or literature file, or a folder of them ({', '.join(INPUTS)})")
    return files


@dataclass(frozen=True)
class Reading:
    """How the records are read: the command's text field (JSONL), and a literature file's format
    (`auto`: by content and name), text (`--text`) and section labels."""

    text_field: tuple[str, ...] | None = None
    input_format: str = "auto"
    which: str = "all"
    labels: bool = False

    def literature(self, f: Path) -> str | None:
        """`f`'s literature format, or None for JSONL."""
        with open_input(str(f)) as data:
            fmt = record_format(data, f.name, self.input_format)
        return None if fmt in ("text", "jsonl") else fmt

    def documents(self, f: Path, fmt: str) -> Iterator[Prompt]:
        with open_input(str(f)) as data:
            yield from read_records(data, str(f), fmt, "strict", self.text_field, self.which, self.labels)


def scan(files: list[Path], reading: Reading, check: Callable[[Prompt], Any] | None,
         done: set[Any], rows: int) -> tuple[list[dict[str, Any]], int, dict[str, str]]:
    """Read every record as the local run does (`parse_record`, then `check` on it), with an `id`
    that Ray joins output to input by. Returns the shards of the records not in `done` (at most
    `rows` each, contiguous in one file; a literature file's documents are one shard: work is
    split by file), the record count and the sha256 of each file's bytes, by name."""
    seen: dict[Any, str] = {}
    digests: dict[str, str] = {}
    shards: list[dict[str, Any]] = []
    total = 0
    for f in files:
        digest = hashlib.sha256()
        fmt = reading.literature(f)
        if fmt is not None:
            total += _scan_documents(f, fmt, reading, check, done, seen, digest, shards)
            digests[f.name] = digest.hexdigest()
            continue
        shard, end = None, 0
        with open(f, "rb") as data:
            for n, raw in enumerate(data, 1):
                digest.update(raw)
                start, end = end, end + len(raw)
                p = _record(f, n, raw, reading.text_field, seen, check)
                if p is None:
                    continue
                total += 1
                if p.id in done:
                    shard = None
                elif shard is None or shard["records"] == rows:
                    shard = {"path": str(f), "first_line": n, "start": start, "end": end, "records": 1,
                             "format": "", "skip": "[]"}
                    shards.append(shard)
                else:
                    shard["end"], shard["records"] = end, shard["records"] + 1
        digests[f.name] = digest.hexdigest()
    return shards, total, digests


def input_digest(path: str, digests: dict[str, str]) -> dict[str, str]:
    """What a manifest records of the input: a file's sha256 (of its bytes, as `sha256sum` and a
    local run's manifest give it), or a folder's (of its files' `sha256  name` lines, sorted by
    name, as `sha256sum * | sha256sum` gives it in the folder)."""
    if not Path(path).is_dir():
        return {"input_sha256": next(iter(digests.values()))}
    lines = "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))
    return {"input_folder_sha256": hashlib.sha256(lines.encode()).hexdigest()}


def _scan_documents(f: Path, fmt: str, reading: Reading, check: Callable[[Prompt], Any] | None, done: set[Any],
                    seen: dict[Any, str], digest: Any, shards: list[dict[str, Any]]) -> int:
    """A literature file's documents, checked; its shard (the documents not done) added. Their count."""
    count, skip = 0, []
    for p in reading.documents(f, fmt):
        if seen.setdefault(p.id, f.name) != f.name:
            raise InputError(f"{f}: id {p.id} is repeated (first in {seen[p.id]}); ids join output to input")
        _check(check, p, f"{f}: id {p.id}")
        count += 1
        if p.id in done:
            skip.append(p.id)
    with open(f, "rb") as data:
        for chunk in iter(lambda: data.read(1 << 20), b""):
            digest.update(chunk)
    if count > len(skip):  # the same columns as a JSONL shard's (Ray makes a table of them)
        shards.append({"path": str(f), "first_line": 0, "start": 0, "end": 0, "records": count - len(skip),
                       "format": fmt, "skip": json.dumps(skip)})
    return count


def _record(f: Path, n: int, raw: bytes, text_field: tuple[str, ...] | None, seen: dict[Any, str],
            check: Callable[[Prompt], Any] | None) -> Prompt | None:
    """Line `n` of `f` as a checked record with an id; None for a blank line."""
    try:
        text = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise InputError(f"{f}: line {n}: invalid UTF-8") from None
    if not text.strip():
        return None
    try:
        p = parse_record(n, text, str(f), text_field, seen, f"{f.name} line {n}")
    except InputError as e:
        raise InputError(f'{e}; --engine ray reads JSONL records, each with an "id"') from None
    if p.id is None:
        raise InputError(f'{f}: line {n}: --engine ray needs a string or integer "id" in every record')
    _check(check, p, f"{f}: line {n}")
    return p


def _check(check: Callable[[Prompt], Any] | None, p: Prompt, where: str) -> None:
    """`check` on a record (a task's fields), its error naming where the record is."""
    if check is not None:
        try:
            check(p)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None


def read_shard(shard: dict[str, Any], reading: Reading) -> list[Prompt]:
    """The records of a shard, read as `scan` read them (a worker's side)."""
    if shard.get("format"):
        skip = set(json.loads(shard["skip"]))
        return [p for p in reading.documents(Path(shard["path"]), shard["format"]) if p.id not in skip]
    with open(shard["path"], "rb") as f:
        f.seek(shard["start"])
        data = f.read(shard["end"] - shard["start"])
    items = []
    for n, raw in enumerate(data.split(b"\n"), shard["first_line"]):
        p = _record(Path(shard["path"]), n, raw, reading.text_field, {}, None)
        if p is not None:
            items.append(p)
    return items


def done_ids(output: Path) -> set[Any]:
    """Ids whose records are already committed in part files of `output`."""
    done = set()
    for part in output.glob(PART):
        for _, line in lines(part.read_text(encoding="utf-8")):
            done.add(json.loads(line)["id"])
    return done


class Worker:
    """One actor: loads the model once, then turns shards of the input into part files."""

    def __init__(self, command: str, settings: dict[str, Any], load: dict[str, Any], output: str,
                 batch_size: int | None, threads: int, reading: dict[str, Any] | None = None) -> None:
        import torch

        from .loading import load_pretrained
        from .plans import PLANS, TEXT_FIELDS

        torch.set_num_threads(threads)
        self.command, self.output, self.batch_size = command, Path(output), batch_size
        self.reading = Reading(**reading) if reading else Reading(TEXT_FIELDS.get(command))
        self.lm, self.tok = load_pretrained(**load)
        self.settings = settings
        self.plan = PLANS[command](self.lm, self.tok, settings, lambda m: None) if command in PLANS else None

    def records(self, items: list[Prompt]) -> list[str]:
        """The JSONL lines of `items`, in order: the local run's records (an item the plan cannot
        build gets an error record instead)."""
        from .plans import generated_records

        if self.plan is not None:
            return [line for lines in generated_records(self.lm, self.tok, self.plan, items, self.batch_size)
                    for line in lines]
        return [line for lines in self._forward(items) for line in lines]

    def _forward(self, items: list[Any]) -> list[list[str]]:
        """`score` or `embed` records: the batch at once, or one at a time when a text in it is bad,
        so that it becomes an error record and the others are still done."""
        from .plans import FORWARD, error_record

        def lines(group: list[Any]) -> list[list[str]]:
            records = FORWARD[self.command](self.lm, self.tok, group, self.batch_size or 8, self.settings,
                                            lambda m: None)
            return [[dumps(r)] for r in records]

        try:
            return lines(items) if items else []
        except BioGptError:
            out = []
            for p in items:
                try:
                    out.extend(lines([p]))
                except BioGptError as e:
                    out.append([error_record(p, str(e))])
            return out

    def __call__(self, batch: Any) -> Any:
        import pyarrow

        counts = []
        for shard in batch.to_pylist():
            items = read_shard(shard, self.reading)
            name = hashlib.sha256(json.dumps([p.id for p in items]).encode()).hexdigest()[:20]
            write_text(self.output / f"part-{name}.jsonl", "".join(self.records(items)))  # whole, or not at all
            counts.append(len(items))
        return pyarrow.table({"done": counts})


def _quiet(ray: Any) -> None:
    """Ray's own progress logs and notices stay in its log files: stderr is ours (one line on
    failure, a progress bar on a terminal)."""
    import logging

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the C++ core's notices (it says so once, at init)
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def run(command: str, settings: dict[str, Any], load: dict[str, Any], input: str, output: str, *,
        address: str | None, workers: int, cpus_per_worker: float, gpus_per_worker: float, batch_size: int | None,
        rows_per_batch: int = 32, progress: Callable[[int, int], None] | None = None, worker: type = Worker,
        force: bool = False, model_files: dict[str, str] | None = None,
        check: Callable[[Prompt], Any] | None = None, reading: Reading | None = None) -> tuple[int, int]:
    """Run `command` over the JSONL `input` into part files in the folder `output`; returns
    (records done now, records done before). `progress(done, total)` follows the run. Every record
    is read and checked first (`check`: a task's fields). A folder with parts is finished if its
    manifest names the same run (`model_files`: the model's identity by content), refused
    otherwise; `force` empties it first. A "seed" of None in `settings` is the finished run's, else
    a new one."""
    from .plans import TEXT_FIELDS

    ray = ray_module()
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{output}: --engine ray writes a folder of part files; this is a file")
    if out.exists() and out.resolve() == Path(input).resolve():  # its parts would be read as input next time
        raise InputError(f"{output}: is also the input folder; write the part files to another folder")
    done = set() if force or not out.exists() else done_ids(out)
    reading = reading or Reading(TEXT_FIELDS.get(command))
    shards, total, digests = scan(input_files(input), reading, check, done, rows_per_batch)
    todo = sum(shard["records"] for shard in shards)
    identity = {"command": command, "settings": {k: v for k, v in settings.items() if k != "seed"},
                "reading": {"input_format": reading.input_format, "text": reading.which, "labels": reading.labels},
                "model": {**{k: load[k] for k in ("path_or_id", "revision", "dtype", "quantize", "device")},
                          "model_files": model_files},
                "input": str(Path(input).resolve()), **input_digest(input, digests)}
    if done:
        check_manifest(out, identity)
    started = todo and _connect(ray, address, workers, cpus_per_worker)  # a layout it cannot hold: nothing made
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.tmp"), *(out.glob(PART) if force else ())]:  # .tmp: a worker killed mid-write
        stale.unlink()
    settings = _with_seed(settings, out, bool(done))
    state = {"seed": settings["seed"]} if "seed" in settings else {}
    if todo == 0:
        return 0, len(done)
    try:
        return _run_shards(ray, shards, worker, out, identity, done, state, todo, progress, kwargs={
            "command": command, "settings": settings, "load": load, "output": str(out), "batch_size": batch_size,
            "threads": max(1, int(cpus_per_worker)), "reading": dataclasses.asdict(reading)},
            workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    finally:
        if started:  # a local cluster of this run's own: its helper processes go with it
            ray.shutdown()


def _run_shards(ray: Any, shards: list[dict[str, Any]], worker: type, out: Path, identity: dict[str, Any],
                done: set[Any], state: dict[str, Any], todo: int, progress: Callable[[int, int], None] | None, *,
                kwargs: dict[str, Any], workers: int, cpus_per_worker: float,
                gpus_per_worker: float) -> tuple[int, int]:
    """The shards through an actor pool of `worker`s into part files, under the folder's manifest."""
    with manifested(out, identity, lambda: len(done_ids(out)), fresh=not done, **state):
        ds = ray.data.from_items(shards).map_batches(
            worker, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=workers), batch_size=1,
            batch_format="pyarrow", num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None)
        finished = 0
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                finished += sum(batch.column("done").to_pylist())
                if progress is not None:
                    progress(finished, todo)
        except Exception as e:  # noqa: BLE001 -- Ray wraps worker failures in its own types
            raise failure(e) from None
    return finished, len(done)


def failure(e: BaseException) -> BioGptError:
    """One line for a failed Ray run. An error of ours inside a worker (a model that cannot load
    there, say) is its own message: running again would only fail again. Anything else (a worker
    or node lost, memory) may pass on a second try, which finishes only the remaining ids."""
    ours = re.search(r"biogpt_cli\.errors\.\w+: (.+)", str(e))  # Ray passes the worker's exception on as text
    if ours is not None:
        return BioGptError(f"the Ray run failed in a worker: {ours.group(1).strip()}")
    lines = str(e).strip().splitlines()
    return BioGptError(f"the Ray run failed ({type(e).__name__}: {lines[-1] if lines else ''}); re-run the same "
                       "command to finish the remaining ids")


def init_ray(ray: Any, **options: Any) -> None:
    """`ray.init`, keeping this process's SIGTERM handler: Ray's would end the process at once
    (SIGABRT), before it could stop what it started, and leave Ray's agents running under init."""
    ours = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(**options)
    finally:
        signal.signal(signal.SIGTERM, ours)


def _connect(ray: Any, address: str | None, workers: int, cpus_per_worker: float) -> bool:
    """Join the cluster at `address` (or start a local one), and refuse a layout it cannot hold.
    Whether this started Ray (the caller then shuts it down)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    _quiet(ray)
    started = not ray.is_initialized()
    if started:
        saved = os.dup(2)  # the core's start-up notice goes to Ray's log folder, not our stderr
        try:
            with open(Path(tempfile.gettempdir()) / "biogpt-ray-init.log", "ab") as log:
                os.dup2(log.fileno(), 2)
                init_ray(ray, address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         **({} if address else {"num_cpus": os.cpu_count()}))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    cpus = ray.cluster_resources().get("CPU", 0)
    if workers * cpus_per_worker + 1 > cpus:
        if started:
            ray.shutdown()
        raise InputError(f"{workers} workers x {cpus_per_worker:g} CPUs + 1 for reading the input need more than the "
                         f"cluster's {cpus:g} CPUs (Ray would wait forever): use fewer --workers or less "
                         "--cpus-per-worker")
    return started


def _with_seed(settings: dict[str, Any], out: Path, resuming: bool) -> dict[str, Any]:
    """`settings` with the seed a sampled run draws from: the one given, or when finishing a run
    the one it drew from (so every record of the folder comes from one stream), or a new one."""
    if "seed" not in settings:
        return settings
    recorded = json.loads(manifest_path(out).read_text(encoding="utf-8")).get("seed") if resuming else None
    seed = settings["seed"]
    if resuming and seed is not None and recorded is not None and seed != recorded:
        raise InputError(f"{out}: written with seed {recorded}, not {seed}; finish it with that seed (or none), or "
                         "pass --force to start over")
    if seed is None:
        seed = recorded if recorded is not None else int.from_bytes(os.urandom(4), "little")
    return {**settings, "seed": seed}
