"""``linewatch soak``: is memory flat over a long run with websocket clients coming and going?

The issue's memory floor ("RSS growth < 5 % after warm-up over a 10-minute run, also
with a websocket client that connects and disconnects every second") as one
reproducible command:

1. the given (or embedded default) config is loaded and validated here, then written
   to a temporary directory with the store moved there (``sqlite:///<tmp>/soak.db``),
   so the run never touches the user's ``linewatch.db``;
2. ``linewatch serve`` runs as a real subprocess on a free port
   (``sys.executable -m service.cli serve``) and is waited for on ``/readyz``;
3. one steady websocket client reads ``/api/v1/ws/frames`` for the whole run
   (messages, capture -> client latency ``time.time() - capture_ts`` after the
   warm-up, the ``dropped`` counts the server reports), a churn client connects,
   reads about one second and disconnects, again and again;
4. the server's RSS (with any children) is sampled every ``sample_every`` seconds;
   the baseline is the median of the first samples after the warm-up, the growth is
   ``(last - baseline) / baseline``, the slope a least-squares fit in MB/hour;
5. ``/api/v1/cameras`` is read at the start and the end, ``/metrics`` at the end;
6. the server is stopped with SIGTERM and must exit (0) within ``stop_timeout`` s;
   whatever happens, the subprocess is killed if it is still running.

The pure helpers (:func:`rss_summary`, :func:`percentile`, :func:`latency_summary`,
:func:`camera_deltas`, :func:`metric_totals`) are unit-tested on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from service.errors import LineWatchError

RSS_FLOOR_PCT = 5.0  # issue 3: RSS growth < 5 % after warm-up
BASELINE_SAMPLES = 3  # the baseline is the median of this many samples after warm-up
LOG_TAIL_LINES = 6


class SoakError(LineWatchError):
    """The soak run could not start, or the server failed during it."""


# --- pure helpers ------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max of per-message latencies in ms (``None`` when there are none)."""
    if not latencies_ms:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(percentile(latencies_ms, 50), 2),
        "p99": round(percentile(latencies_ms, 99), 2),
        "max": round(max(latencies_ms), 2),
    }


def least_squares_slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Slope of the least-squares line through ``(x, y)`` points; ``None`` if undefined."""
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0.0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx


def rss_summary(
    samples: Sequence[tuple[float, float]],
    warmup_s: float,
    baseline_samples: int = BASELINE_SAMPLES,
) -> dict[str, Any]:
    """Baseline, end, max, growth and slope from ``(t_s, rss_mb)`` samples.

    The baseline is the median of the first ``baseline_samples`` samples taken at or
    after ``warmup_s``; ``growth_pct`` compares the last sample with it; ``slope`` is
    the least-squares slope of the post-warm-up samples in MB/hour; ``max_mb`` is the
    maximum over the whole run (warm-up included).
    """
    if baseline_samples < 1:
        raise ValueError("baseline_samples must be >= 1")
    after = [(t, mb) for t, mb in samples if t >= warmup_s]
    if not after:
        raise SoakError(
            f"no RSS sample at or after the warm-up ({warmup_s:g} s): run longer than the "
            "warm-up, or sample more often"
        )
    baseline = statistics.median(mb for _, mb in after[:baseline_samples])
    end = after[-1][1]
    slope = least_squares_slope(after)
    growth = (end - baseline) / baseline * 100.0 if baseline > 0 else float("nan")
    max_after = max(mb for _, mb in after)
    return {
        "baseline_mb": round(baseline, 2),
        "end_mb": round(end, 2),
        "max_mb": round(max(mb for _, mb in samples), 2),
        "growth_pct": round(growth, 3),
        "max_growth_pct": round((max_after - baseline) / baseline * 100.0, 3)
        if baseline > 0
        else float("nan"),
        "slope_mb_per_hour": None if slope is None else round(slope * 3600.0, 3),
        "samples_after_warmup": len(after),
    }


def camera_deltas(
    start: Sequence[Mapping[str, Any]], end: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """Per camera: frames captured, processed and dropped, and reconnects, over the run.

    ``start`` and ``end`` are ``GET /api/v1/cameras`` bodies; a camera only in ``end``
    counts from zero.
    """
    before = {str(c["id"]): c for c in start}
    out: dict[str, dict[str, int]] = {}
    for cam in end:
        cid = str(cam["id"])
        first = before.get(cid, {})
        out[cid] = {
            key: int(cam.get(key, 0)) - int(first.get(key, 0))
            for key in ("frames_captured", "frames_processed", "frames_dropped", "reconnects")
        }
    return out


def metric_totals(text: str) -> dict[str, float]:
    """LineWatch counters (``linewatch_*_total``) and a few gauges, summed over labels.

    Also ``linewatch_websocket_clients`` (clients still connected) and
    ``process_resident_memory_bytes`` when the server exports them.
    """
    from prometheus_client.parser import text_string_to_metric_families

    wanted_gauges = {"linewatch_websocket_clients", "process_resident_memory_bytes"}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            counter = name.startswith("linewatch_") and name.endswith("_total")
            if counter or name in wanted_gauges:
                totals[name] = totals.get(name, 0.0) + float(sample.value)
    return dict(sorted(totals.items()))


# --- the websocket clients -----------------------------------------------------------


@dataclass
class WsStats:
    """What the two websocket clients saw."""

    messages: int = 0
    frame_messages: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    dropped: int = 0
    steady_connects: int = 0
    steady_errors: list[str] = field(default_factory=list)
    churn_connects: int = 0
    churn_messages: int = 0
    churn_dropped: int = 0
    churn_errors: list[str] = field(default_factory=list)
    latency_from: float = 0.0  # time.monotonic() from which latencies are kept (warm-up end)

    def record(self, raw: str | bytes) -> None:
        """Count a steady-client message: ``dropped``, and the latency of frame messages
        (capture -> client, ``time.time() - capture_ts``) once the warm-up is over."""
        message = json.loads(raw)
        self.messages += 1
        self.dropped += int(message.get("dropped", 0) or 0)
        capture_ts = message.get("capture_ts")
        if message.get("type") == "frame" and isinstance(capture_ts, (int, float)):
            self.frame_messages += 1
            if time.monotonic() >= self.latency_from:
                self.latencies_ms.append((time.time() - float(capture_ts)) * 1000.0)


def _ws_errors() -> tuple[type[BaseException], ...]:
    from websockets.exceptions import InvalidHandshake, WebSocketException

    return (OSError, TimeoutError, WebSocketException, InvalidHandshake)


async def _steady_client(
    url: str, headers: Mapping[str, str], stats: WsStats, stop: asyncio.Event
) -> None:
    """Read frame messages until ``stop``; reconnect (and count it) if the server drops us."""
    from websockets.asyncio.client import connect

    errors = _ws_errors()
    while not stop.is_set():
        try:
            async with connect(url, proxy=None, additional_headers=dict(headers),
                               open_timeout=10, max_size=None) as ws:
                stats.steady_connects += 1
                while not stop.is_set():
                    try:
                        raw = await asyncio.wait_for(ws.recv(), 0.5)
                    except TimeoutError:
                        continue
                    stats.record(raw)
        except errors as exc:
            if stop.is_set():
                return
            stats.steady_errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)


async def _churn_client(
    url: str, headers: Mapping[str, str], stats: WsStats, stop: asyncio.Event, period: float
) -> None:
    """Connect, read for ``period`` seconds, disconnect; again until ``stop``."""
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    errors = _ws_errors()
    while not stop.is_set():
        deadline = loop.time() + period
        try:
            async with connect(url, proxy=None, additional_headers=dict(headers),
                               open_timeout=10, max_size=None) as ws:
                stats.churn_connects += 1
                while (remaining := deadline - loop.time()) > 0 and not stop.is_set():
                    try:
                        raw = await asyncio.wait_for(ws.recv(), remaining)
                    except TimeoutError:
                        break
                    stats.churn_messages += 1
                    stats.churn_dropped += int(json.loads(raw).get("dropped", 0) or 0)
        except errors as exc:
            if stop.is_set():
                return
            stats.churn_errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(period)


# --- the server subprocess -----------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


class ServerProcess:
    """``linewatch serve`` as a subprocess; :meth:`close` always leaves it stopped."""

    def __init__(self, config_path: Path, host: str, port: int, log_path: Path) -> None:
        self.host, self.port, self.log_path = host, port, log_path
        self.base = f"http://{host}:{port}"
        self.ws_base = f"ws://{host}:{port}"
        self._log: IO[bytes] = log_path.open("wb")
        # the config file already has the environment's LINEWATCH_* overrides applied
        # (and its store moved): applying them again would undo the move
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
        command = [sys.executable, "-m", "service.cli", "serve", "--config", str(config_path),
                   "--host", host, "--port", str(port)]
        try:
            self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=env)
        except OSError as exc:
            self._log.close()
            raise SoakError(f"could not start linewatch serve ({' '.join(command)}): {exc}") \
                from exc
        self.pid = self.proc.pid

    def failure(self, what: str) -> SoakError:
        return SoakError(f"{what}; its output ends: {_tail(self.log_path)}")

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise self.failure(f"linewatch serve exited with status {code} during the run")

    def wait_ready(self, headers: Mapping[str, str], timeout: float) -> float:
        """Poll ``/readyz`` until 200; returns the seconds it took."""
        import httpx

        t0 = time.monotonic()
        deadline = t0 + timeout
        with httpx.Client(base_url=self.base, headers=dict(headers), timeout=2.0,
                          trust_env=False) as http:
            while time.monotonic() < deadline:
                code = self.proc.poll()
                if code is not None:
                    raise self.failure(
                        f"linewatch serve exited with status {code} before it was ready"
                    )
                try:
                    if http.get("/readyz").status_code == 200:
                        return time.monotonic() - t0
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        raise self.failure(f"linewatch serve was not ready on {self.base}/readyz after "
                           f"{timeout:g} s")

    def rss_mb(self) -> float:
        """Resident memory of the server and its children, MB (2**20 bytes)."""
        import psutil

        try:
            proc = psutil.Process(self.pid)
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue  # a child that just ended has no memory left to count
        except psutil.NoSuchProcess:
            raise self.failure("linewatch serve is gone") from None
        return total / 2**20

    def stop(self, timeout: float) -> tuple[int, bool]:
        """SIGTERM, wait ``timeout`` s, else SIGKILL; returns (exit code, exited in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return int(self.proc.returncode), False
        return int(self.proc.returncode), True

    def close(self) -> None:
        """Kill the server if it still runs (after an error) and close its log."""
        if self.proc.poll() is None:
            self.proc.kill()
            # SIGKILL cannot be refused; if the kernel is slow to reap it, do not hang here
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()


# --- the run ----------------------------------------------------------------------------


def _auth_headers(config: Any) -> dict[str, str]:
    """A bearer token from the config when auth is on (an admin one if there is one)."""
    auth = config.api.auth
    if not auth.enabled or not auth.tokens:
        return {}
    token = next((t for t in auth.tokens if t.scope == "admin"), auth.tokens[0])
    return {"Authorization": f"Bearer {token.token}"}


def write_soak_config(config_path: Path | None, directory: Path) -> tuple[Path, Any]:
    """Validate the config (env overrides applied) and write it with the store in ``directory``."""
    import yaml

    from service.config import load_config

    config = load_config(config_path)
    data = config.model_dump(mode="json", by_alias=True)  # model paths come out absolute
    data["store"]["url"] = f"sqlite:///{(directory / 'soak.db').resolve()}"
    path = directory / "soak-config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path, config


async def _measure(
    server: ServerProcess,
    headers: Mapping[str, str],
    *,
    seconds: float,
    warmup: float,
    sample_every: float,
    churn_period: float,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    import httpx

    stats = WsStats(latency_from=time.monotonic() + warmup)
    stop = asyncio.Event()
    url = f"{server.ws_base}/api/v1/ws/frames"
    async with httpx.AsyncClient(base_url=server.base, headers=dict(headers), timeout=10.0,
                                 trust_env=False) as http:
        cams_start = (await http.get("/api/v1/cameras")).raise_for_status().json()
        steady = asyncio.create_task(_steady_client(url, headers, stats, stop))
        churn = asyncio.create_task(_churn_client(url, headers, stats, stop, churn_period))
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        targets = [k * sample_every for k in range(int(seconds // sample_every) + 1)
                   if k * sample_every < seconds] + [seconds]
        try:
            for target in targets:
                delay = t0 + target - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                server.check_alive()
                for task in (steady, churn):
                    if task.done():
                        task.result()  # a client that died unexpectedly raises here
                t = time.monotonic() - t0
                mb = server.rss_mb()
                samples.append((round(t, 2), round(mb, 2)))
                if progress is not None:
                    progress(f"t={t:6.1f} s  rss={mb:7.1f} MB  ws messages={stats.messages}  "
                             f"churn connects={stats.churn_connects}")
        finally:
            stop.set()
            await asyncio.gather(steady, churn, return_exceptions=True)
        server.check_alive()
        cams_end = (await http.get("/api/v1/cameras")).raise_for_status().json()
        metrics_text = (await http.get("/metrics")).raise_for_status().text
    return {
        "samples": samples,
        "stats": stats,
        "cameras_start": cams_start,
        "cameras_end": cams_end,
        "metrics": metric_totals(metrics_text),
        "elapsed": time.monotonic() - t0,
    }


def run_soak(
    config: Path | None = None,
    *,
    seconds: float = 600.0,
    warmup: float = 60.0,
    sample_every: float = 10.0,
    port: int = 0,
    ready_timeout: float = 180.0,
    stop_timeout: float = 15.0,
    churn_period: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``linewatch serve`` under two websocket clients and report its memory over time."""
    from service.bench import machine_info

    if seconds <= 0 or sample_every <= 0 or churn_period <= 0:
        raise SoakError("--seconds, --sample-every and the churn period must be positive")
    if not 0 <= warmup < seconds:
        raise SoakError(f"--warmup ({warmup:g} s) must be >= 0 and shorter than --seconds "
                        f"({seconds:g} s)")
    with tempfile.TemporaryDirectory(prefix="linewatch-soak-") as tmp:
        directory = Path(tmp)
        config_path, cfg = write_soak_config(config, directory)
        headers = _auth_headers(cfg)
        host = "127.0.0.1"
        port = port or free_port(host)
        server = ServerProcess(config_path, host, port, directory / "serve.log")
        try:
            ready_s = server.wait_ready(headers, ready_timeout)
            if progress is not None:
                progress(f"linewatch serve (pid {server.pid}) ready on {server.base} "
                         f"after {ready_s:.1f} s")
            measured = asyncio.run(_measure(
                server, headers, seconds=seconds, warmup=warmup, sample_every=sample_every,
                churn_period=churn_period, progress=progress,
            ))
            exit_code, in_time = server.stop(stop_timeout)
            log_tail = _tail(server.log_path)
            log_text = server.log_path.read_text(errors="replace")
        finally:
            server.close()
    stats: WsStats = measured["stats"]
    rss = rss_summary(measured["samples"], warmup)
    latency = latency_summary(stats.latencies_ms)
    deltas = camera_deltas(measured["cameras_start"], measured["cameras_end"])
    growth = rss["growth_pct"]
    return {
        "seconds": round(measured["elapsed"], 1),
        "warmup_s": warmup,
        "sample_every_s": sample_every,
        "config": str(config) if config is not None else "<embedded default>",
        "rss_mb_baseline": rss["baseline_mb"],
        "rss_mb_end": rss["end_mb"],
        "rss_mb_max": rss["max_mb"],
        "rss_growth_pct": growth,
        "rss_max_growth_pct": rss["max_growth_pct"],
        "rss_slope_mb_per_hour": rss["slope_mb_per_hour"],
        "rss_floor_pct": RSS_FLOOR_PCT,
        "rss_flat": bool(growth < RSS_FLOOR_PCT),
        "samples": [[t, mb] for t, mb in measured["samples"]],
        "ws_messages": stats.messages,
        "ws_frame_messages": stats.frame_messages,
        "ws_latency_ms_p50": latency["p50"],
        "ws_latency_ms_p99": latency["p99"],
        "ws_latency_ms_max": latency["max"],
        "ws_latency_samples": len(stats.latencies_ms),
        "ws_dropped": stats.dropped,
        "ws_reconnects": max(0, stats.steady_connects - 1),
        "ws_errors": stats.steady_errors[:5],
        "churn_connects": stats.churn_connects,
        "churn_messages": stats.churn_messages,
        "churn_dropped": stats.churn_dropped,
        "churn_errors": len(stats.churn_errors),
        "churn_error_examples": stats.churn_errors[:3],
        "frames_captured": {cid: d["frames_captured"] for cid, d in deltas.items()},
        "frames_processed": {cid: d["frames_processed"] for cid, d in deltas.items()},
        "frames_dropped": {cid: d["frames_dropped"] for cid, d in deltas.items()},
        "camera_reconnects": {cid: d["reconnects"] for cid, d in deltas.items()},
        "metrics": measured["metrics"],
        "server_ready_s": round(ready_s, 1),
        "server_exit_code": exit_code,
        "server_stopped_in_time": in_time,
        "server_log_traceback": "Traceback" in log_text,
        "server_log_tail": log_tail,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine_info(),
    }


def render_summary(result: Mapping[str, Any]) -> str:
    """A readable summary of :func:`run_soak`'s result."""
    cams = ", ".join(
        f"{cid} {n} captured / {result['frames_dropped'].get(cid, 0)} dropped"
        for cid, n in result["frames_captured"].items()
    )
    verdict = "flat" if result["rss_flat"] else "NOT flat"
    slope = result["rss_slope_mb_per_hour"]
    lines = [
        f"soak: {result['seconds']:g} s ({result['warmup_s']:g} s warm-up), "
        f"config {result['config']}, {result['date']}",
        f"RSS: baseline {result['rss_mb_baseline']:.1f} MB -> end {result['rss_mb_end']:.1f} MB "
        f"({result['rss_growth_pct']:+.2f} %, {verdict}: floor < {result['rss_floor_pct']:g} %), "
        f"max {result['rss_mb_max']:.1f} MB, slope "
        + (f"{slope:+.2f} MB/h" if slope is not None else "n/a"),
        f"websocket: {result['ws_messages']} messages, capture -> client (after warm-up) p50 "
        f"{result['ws_latency_ms_p50']} ms, p99 {result['ws_latency_ms_p99']} ms, "
        f"{result['ws_dropped']} dropped, {result['ws_reconnects']} reconnects",
        f"churn: {result['churn_connects']} connects, {result['churn_messages']} messages, "
        f"{result['churn_errors']} errors",
        f"cameras: {cams}",
        f"server: exit code {result['server_exit_code']}"
        + ("" if result["server_stopped_in_time"] else " (killed: SIGTERM was not enough)")
        + (", traceback in its log" if result["server_log_traceback"] else ""),
        "samples (t s, RSS MB): "
        + ", ".join(f"{t:g}: {mb:.1f}" for t, mb in result["samples"]),
    ]
    return "\n".join(lines)
