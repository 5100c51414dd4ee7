"""`biogpt serve --replicas N`: the server's app (server.py) in N Ray Serve replicas behind one
address (the `ray` and `serve` extras), on a local Ray or a cluster's.

Ray Serve's own machinery does the rest: its proxy listens on the address and spreads requests
over the replicas, and its controller replaces a replica that dies. Each replica loads the model
once and batches its own requests as a single server does. `/metrics` and `/health` answer for
the whole deployment: each replica posts its metrics to a small named actor every second, and the
replica a scrape reaches renders every live replica's series (labelled `replica`) and the
deployment's totals (`biogpt_fleet_...`).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .cluster import init_ray
from .errors import BioGptError, missing_extra

HUB, NAMESPACE, APP = "biogpt-serve-hub", "biogpt-serve", "biogpt"
POST_EVERY, STALE = 1.0, 5.0  # seconds: a replica silent for STALE is gone


def ray_serve() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise missing_extra("biogpt serve --replicas", "ray") from None
    return ray, serve


class Hub:
    """The replicas' latest metrics (a Ray actor): what a scrape of any of them renders."""

    def __init__(self) -> None:
        self.posts: dict[str, tuple[float, bytes]] = {}

    def post(self, replica: str, text: bytes) -> None:
        self.posts[replica] = (time.time(), text)

    def live(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """The replicas heard from lately, and the last post of each one gone (whose counts stay
        in the deployment's totals, so that they never go back)."""
        now = time.time()
        return ({r: text for r, (at, text) in self.posts.items() if now - at < STALE},
                {r: text for r, (at, text) in self.posts.items() if now - at >= STALE})


class Fleet:
    """What a replica's /metrics and /health say of the deployment (server.create_app's `fleet`)."""

    def __init__(self, hub: Any, replica: str, own: Callable[[], bytes]) -> None:
        self.hub, self.replica, self.own = hub, replica, own

    async def _posts(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        live, gone = await self.hub.live.remote()
        gone.pop(self.replica, None)
        return {**live, self.replica: self.own()}, gone

    async def metrics(self) -> bytes:
        return combined(*await self._posts())

    async def health(self) -> dict[str, Any]:
        return {"replica": self.replica, "replicas": sorted((await self._posts())[0])}


def combined(live: dict[str, bytes], gone: dict[str, bytes] | None = None) -> bytes:
    """Prometheus text of every live replica's samples, labelled `replica`, then the deployment's
    totals under names of their own (`biogpt_fleet_...`: a `sum()` over the per-replica series
    counts nothing twice). Counters and histograms keep the last counts of replicas that are `gone`,
    so a total never goes back when a replica dies; gauges add up the live ones."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str, list]] = {}
    for alive, posts in ((True, live), (False, gone or {})):
        for replica, text in sorted(posts.items()):
            for fam in text_string_to_metric_families(text.decode()):
                if fam.name.endswith("_created"):  # a creation time sums to nothing
                    continue
                name = fam.name + "_total" if fam.type == "counter" else fam.name
                entry = families.setdefault(name, (fam.type, fam.documentation, []))
                entry[2].extend((s.name, s.labels, s.value, replica, alive) for s in fam.samples
                                if not s.name.endswith("_created"))
    lines, totals = [], []
    for name, (kind, doc, samples) in families.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
        sums: dict[tuple, float] = {}
        for sample, labels, value, replica, alive in samples:
            if alive:
                lines.append(_sample(sample, {**labels, "replica": replica}, value))
            if alive or kind != "gauge":
                key = (sample, tuple(sorted(labels.items())))
                sums[key] = sums.get(key, 0.0) + value
        totals += [f"# HELP {_fleet(name)} {doc} (the deployment's)", f"# TYPE {_fleet(name)} {kind}",
                   *(_sample(_fleet(sample), dict(labels), value) for (sample, labels), value in sums.items())]
    return ("\n".join(lines + totals) + "\n").encode()


def _fleet(name: str) -> str:
    return name.replace("biogpt_", "biogpt_fleet_", 1)


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    def quoted(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    inside = ",".join(f'{k}="{quoted(v)}"' for k, v in labels.items())
    return f"{name}{{{inside}}} {value!r}" if inside else f"{name} {value!r}"


class Replica:
    """One copy of the server: the model, loaded once, and the app over it (built by Ray Serve
    after `__init__`), posting its metrics to the hub."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from .loading import load_pretrained

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.spec = spec
        self.lm, self.tok = load_pretrained(**spec["load"])
        self.id = uuid.uuid4().hex[:8]

    def __serve_build_asgi_app__(self) -> Any:
        import ray

        from .server import create_app

        s, hub = self.spec, ray.get_actor(HUB, namespace=NAMESPACE)
        fleet = Fleet(hub, self.id, lambda: app.state.engine.metrics.text())  # the app's, once it is made
        app = create_app(self.lm, self.tok, s["names"], s["api_key"], s["origins"], s["hosts"], s["limits"], fleet,
                         s.get("task"), s.get("webui", True))

        def post() -> None:
            while True:
                hub.post.remote(self.id, app.state.engine.metrics.text())
                time.sleep(POST_EVERY)
        threading.Thread(target=post, daemon=True).start()
        return app


def start(spec: dict[str, Any], replicas: int, cpus: float, gpus: float, host: str, port: int,
          address: str | None) -> Callable[[], None]:
    """The deployment, up and answering on host:port (its replicas loaded); returns what stops it."""
    import logging

    ray, serve = ray_serve()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its start-up notices: stderr is ours
    started = not ray.is_initialized()
    if started:
        init_ray(ray, address=address or os.environ.get("RAY_ADDRESS") or None, namespace=NAMESPACE,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    hub = ray.remote(num_cpus=0)(Hub).options(name=HUB, namespace=NAMESPACE, get_if_exists=True).remote()
    try:
        serve.start(http_options={"host": host, "port": port})
        deployment = serve.deployment(serve.ingress()(Replica), name="BioGptReplica", num_replicas=replicas,
                                      ray_actor_options={"num_cpus": cpus, "num_gpus": gpus})
        serve.run(deployment.bind(spec), name=APP, route_prefix="/")
    except BaseException as e:  # a replica that cannot start, or Ctrl-C: nothing left running
        _stop(ray, serve, hub, started)
        if not isinstance(e, Exception):
            raise
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise BioGptError(f"the Ray Serve deployment did not start: {last}") from None
    return lambda: _stop(ray, serve, hub, started)


def _stop(ray: Any, serve: Any, hub: Any, started: bool) -> None:
    serve.shutdown()
    ray.kill(hub)
    if started:
        ray.shutdown()
