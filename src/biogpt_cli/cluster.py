"""Batch commands on a Ray cluster (`--engine ray`, the `ray` extra; the core never imports this).

Ray Data reads the JSONL input, an actor pool loads the model once per worker, and each worker
runs the same plan (plans.py) as a local run, so the records are the ones the local run writes.
Each batch is written as one part file, `part-<hash of its ids>.jsonl`, under a temporary name
and renamed when complete: a killed worker leaves no partial file, Ray redoes its batch under the
same name, and a re-run of the same command skips the ids already in part files. The folder's
run manifest (`FOLDER.manifest.json`, as beside a local output file) keeps a re-run with other
settings from mixing its records in, and keeps a sampled run's seed for the re-run that finishes
it. A bad record becomes a record with an `error` field; a model that cannot load fails the run
before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BioGptError, InputError, missing_extra
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


def input_files(path: str) -> list[Path]:
    """A JSONL file, or a folder of them."""
    p = Path(path)
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise InputError(f"{path}: no JSONL input (a .jsonl file or a folder of them)")
    return files


def check_ids(files: list[Path]) -> tuple[int, str]:
    """Every record has an `id`, and no id is repeated (Ray joins output to input by id). Returns
    the record count and, from the same pass, a sha256 of the input (its files' names and bytes)."""
    seen: dict[Any, str] = {}
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0".encode())
        with open(f, "rb") as lines:
            for n, raw in enumerate(lines, 1):
                digest.update(raw)
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as e:
                    raise InputError(f'{f}: line {n}: not JSON ({e}); --engine ray reads JSONL records, each with '
                                     'an "id"') from None
                rid = record.get("id") if isinstance(record, dict) else None
                if rid is None or isinstance(rid, bool) or not isinstance(rid, str | int):
                    raise InputError(f'{f}: line {n}: --engine ray needs a string or integer "id" in every record')
                if rid in seen:
                    raise InputError(f"{f}: line {n}: id {rid!r} is repeated (first at {seen[rid]})")
                seen[rid] = f"{f.name} line {n}"
    return len(seen), digest.hexdigest()


def done_ids(output: Path) -> set[Any]:
    """Ids whose records are already committed in part files of `output`."""
    done = set()
    for part in output.glob(PART):
        for _, line in lines(part.read_text(encoding="utf-8")):
            done.add(json.loads(line)["id"])
    return done


class Worker:
    """One actor: loads the model once, then turns batches of input rows into part files."""

    def __init__(self, command: str, settings: dict[str, Any], load: dict[str, Any], output: str,
                 batch_size: int | None, threads: int) -> None:
        import torch

        from .loading import load_pretrained
        from .plans import PLANS

        torch.set_num_threads(threads)
        self.command, self.output, self.batch_size = command, Path(output), batch_size
        self.lm, self.tok = load_pretrained(**load)
        self.settings = settings
        self.plan = PLANS[command](self.lm, self.tok, settings, lambda m: None) if command in PLANS else None

    def records(self, rows: list[dict[str, Any]]) -> list[str]:
        from .inputs import Prompt
        from .plans import TEXT_FIELDS, error_record, generated_records

        fields = TEXT_FIELDS.get(self.command, ())
        texts = [next((row[f] for f in fields if isinstance(row.get(f), str)), None) for row in rows]
        items = [Prompt(0, text or "", row["id"], {k: v for k, v in row.items() if v is not None})
                 for row, text in zip(rows, texts, strict=True)]
        bad = {i for i, text in enumerate(texts) if fields and text is None}
        good = [p for i, p in enumerate(items) if i not in bad]
        if self.plan is not None:
            lines = iter(generated_records(self.lm, self.tok, self.plan, good, self.batch_size))
        else:
            lines = iter(self._forward(good))
        expected = " or ".join(f'"{f}"' for f in fields)
        return [line for i, p in enumerate(items)
                for line in ([error_record(p, f"expected a string {expected}")] if i in bad else next(lines))]

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

        rows = batch.to_pylist()
        ids = [row["id"] for row in rows]
        name = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:20]
        target = self.output / f"part-{name}.jsonl"
        tmp = self.output / f".part-{name}.{os.getpid()}.tmp"
        tmp.write_text("".join(self.records(rows)), encoding="utf-8")
        os.replace(tmp, target)  # the batch is committed whole, or not at all
        return pyarrow.table({"done": [len(ids)]})


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
        rows_per_batch: int = 32, progress: Callable[[int, int], None] | None = None,
        worker: type = Worker, force: bool = False, model_files: dict[str, str] | None = None) -> tuple[int, int]:
    """Run `command` over the JSONL `input` into part files in the folder `output`; returns
    (records done now, records done before). `progress(done, total)` follows the run. A folder
    with parts is finished if its manifest names the same run (`model_files`: the model folder's
    identity by content), refused otherwise; `force` empties it first. A "seed" of None in `settings` is
    the finished run's, else a new one."""
    ray = ray_module()
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{output}: --engine ray writes a folder of part files; this is a file")
    if out.exists() and out.resolve() == Path(input).resolve():  # its parts would be read as input next time
        raise InputError(f"{output}: is also the input folder; write the part files to another folder")
    files = input_files(input)
    total, input_sha256 = check_ids(files)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(".part-*.tmp"), *(out.glob(PART) if force else ())]:  # .tmp: a worker killed mid-write
        stale.unlink()
    identity = {"command": command, "settings": {k: v for k, v in settings.items() if k != "seed"},
                "model": {**{k: load[k] for k in ("path_or_id", "revision", "dtype", "quantize")},
                          "model_files": model_files},
                "input": str(Path(input).resolve()), "input_sha256": input_sha256}
    done = done_ids(out)
    if done:
        check_manifest(out, identity)
    settings = _with_seed(settings, out, bool(done))
    state = {"seed": settings["seed"]} if "seed" in settings else {}
    todo = total - len(done)
    if todo == 0:
        return 0, len(done)
    with manifested(out, identity, lambda: len(done_ids(out)), fresh=not done, **state):
        _connect(ray, address, workers, cpus_per_worker)
        threads = max(1, int(cpus_per_worker))
        ds = ray.data.read_json([str(f) for f in files])
        if done:
            with warnings.catch_warnings():  # Ray suggests its expressions; a set lookup is what this needs
                warnings.simplefilter("ignore")
                ds = ds.filter(lambda row: row["id"] not in done)
        ds = ds.map_batches(worker, fn_constructor_kwargs={
            "command": command, "settings": settings, "load": load, "output": str(out), "batch_size": batch_size,
            "threads": threads}, compute=ray.data.ActorPoolStrategy(size=workers), batch_size=rows_per_batch,
            batch_format="pyarrow", num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None)
        finished = 0
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                finished += sum(batch.column("done").to_pylist())
                if progress is not None:
                    progress(finished, todo)
        except Exception as e:  # noqa: BLE001 -- Ray wraps worker failures in its own types
            cause = str(e).strip().splitlines()
            raise BioGptError(f"the Ray run failed ({type(e).__name__}: {cause[-1] if cause else ''}); "
                              "re-run the same command to finish the remaining ids") from None
    return finished, len(done)


def _connect(ray: Any, address: str | None, workers: int, cpus_per_worker: float) -> None:
    """Join the cluster at `address` (or start a local one), and refuse a layout it cannot hold."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    _quiet(ray)
    if not ray.is_initialized():
        saved = os.dup(2)  # the core's start-up notice goes to Ray's log folder, not our stderr
        try:
            with open(Path(tempfile.gettempdir()) / "biogpt-ray-init.log", "ab") as log:
                os.dup2(log.fileno(), 2)
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         **({} if address else {"num_cpus": os.cpu_count()}))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    cpus = ray.cluster_resources().get("CPU", 0)
    if workers * cpus_per_worker + 1 > cpus:
        raise InputError(f"{workers} workers x {cpus_per_worker:g} CPUs + 1 for reading the input need more than the "
                         f"cluster's {cpus:g} CPUs (Ray would wait forever): use fewer --workers or less "
                         "--cpus-per-worker")


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
