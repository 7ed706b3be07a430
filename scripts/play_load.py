"""Play under load: per-player frames/s with 1, 2 and 4 players at once, the fifth player's reply, one player's
frame rate while another client floods the server, and the server's memory over one long session. Runs
`procgenie play` in a subprocess on a free loopback port.

Usage: python scripts/play_load.py [--checkpoint RUN] [--seconds 20] [--fps 15] [--flood-seconds 5]
                                   [--long-frames 10000]

Each player is a websocket client that holds the right arrow, as a browser would; a frame's interval is
the time between two frames arriving at that client; model and queue ms are the medians of what the frames'
meta say (servers before the batched hub sent neither). The flood runs in a child process: it sends invalid
and oversized messages as fast as it can, reconnecting whenever the server closes it, while one player plays;
that player's rate is measured before, during, in the first second after, and from then on. RSS is the server
process's VmRSS (/proc) after the long session's 1,000th and last frame (that session asks for frames as fast
as the server makes them: `--fps 1000`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import aiohttp
import numpy as np

KIND_FRAME = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str | None, fps: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "procgenie", "play", "--port", str(port), "--fps", str(fps), "--max-players", "4"]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/stats", timeout=1).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"play did not start:\n{proc.stdout.read()}")
            time.sleep(0.1)
    raise SystemExit("play did not answer within 60 s")


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def player(http, url: str, seconds: float | None = None, frames: int | None = None, on_frame=None, metas=None):
    """Hold right; the arrival times (time.time) of the frames received for `seconds` or until `frames` frames."""
    ws = await http.ws_connect(url + "/ws")
    await ws.send_str(json.dumps({"type": "input", "right": True}))
    times: list[float] = []
    end = None if seconds is None else time.time() + seconds
    try:
        while (end is None or time.time() < end) and (frames is None or len(times) < frames):
            msg = await ws.receive(timeout=30)
            if msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">BI", msg.data[:5])[0] == KIND_FRAME:
                times.append(time.time())
                if metas is not None:
                    n = struct.unpack(">BI", msg.data[:5])[1]
                    metas.append(json.loads(msg.data[5 : 5 + n]))
                if on_frame:
                    on_frame(len(times))
            elif msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("type") == "error":
                raise RuntimeError(json.loads(msg.data)["message"])
            elif msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise RuntimeError(f"connection closed: {msg}")
    finally:
        await ws.close()
    return times


def summary(times: list[float], metas: list[dict] | None = None) -> dict:
    gaps = np.diff(times[5:]) * 1000  # past the first frames (session start)
    if len(gaps) < 2:
        raise SystemExit(f"{len(times)} frames came: too few to measure (a longer --seconds?)")
    out = {
        "frames": len(times),
        "fps": len(gaps) / (gaps.sum() / 1000),
        "interval_ms_p50": float(np.percentile(gaps, 50)),
        "interval_ms_p95": float(np.percentile(gaps, 95)),
    }
    for key in ("model_ms", "queue_ms", "batch"):
        seen = [m[key] for m in (metas or [])[5:] if key in m]
        out[key] = float(np.median(seen)) if seen else None
    return out


async def warm_up(url: str) -> None:
    """One player until its second frame: the server has loaded Procgen's library by then."""
    async with aiohttp.ClientSession() as http:
        await player(http, url, frames=2)


async def crowd(url: str, n: int, seconds: float) -> list[dict]:
    metas = [[] for _ in range(n)]
    async with aiohttp.ClientSession() as http:
        runs = await asyncio.gather(*(player(http, url, seconds, metas=m) for m in metas))
    return [summary(t, m) for t, m in zip(runs, metas)]


def model_line(r: dict) -> str:
    if r["model_ms"] is None:
        return ""
    return f"; model {r['model_ms']:.0f} ms a call for {r['batch']:.0f}, queue {r['queue_ms']:.0f} ms (medians)"


def rate(times: list[float], start: float, end: float) -> float:
    """Frames per second that arrived in [start, end)."""
    return sum(start <= t < end for t in times) / (end - start)


def flood(url: str, seconds: float, began, report) -> None:
    """Child process: invalid and oversized messages as fast as possible for `seconds`, reconnecting when closed;
    puts (start, end, messages, connections) on `report`."""

    async def go() -> tuple:
        junk = ["{not json", json.dumps({"type": "fly"}), json.dumps({"type": "input", "left": 1}), "x" * 2000]
        sent = conns = 0
        async with aiohttp.ClientSession() as http:
            began.set()
            start = time.time()
            while time.time() < start + seconds:
                try:
                    async with http.ws_connect(url + "/ws") as ws:
                        conns += 1
                        while time.time() < start + seconds and not ws.closed:
                            await ws.send_str(junk[sent % len(junk)] if sent % 500 else "z" * 2_000_000)
                            sent += 1
                except (aiohttp.ClientError, ConnectionError, OSError):
                    await asyncio.sleep(0.01)  # refused (the server is full) or reset: try again
        return start, time.time(), sent, conns

    report.put(asyncio.run(go()))


async def flooded(url: str, seconds: float) -> dict:
    """One player's frame rate before, during and after another client's flood of `seconds`."""
    ctx = multiprocessing.get_context("spawn")
    began, report = ctx.Event(), ctx.Queue()
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(player(http, url, seconds=2 * seconds + 6))
        await asyncio.sleep(seconds + 1)  # its rate before: the last `seconds` of this
        child = ctx.Process(target=flood, args=(url, seconds, began, report))
        child.start()
        times = await task
    start, end, sent, conns = report.get(timeout=60)
    child.join(30)
    return {
        "messages": sent,
        "connections": conns,
        "fps_before": rate(times, start - seconds, start),
        "fps_during": rate(times, start, end),
        "fps_first_second_after": rate(times, end, end + 1),
        "fps_after": rate(times, end + 1, times[-1]),
    }


async def fifth(url: str) -> str:
    async with aiohttp.ClientSession() as http:
        four = [await http.ws_connect(url + "/ws") for _ in range(4)]
        for ws in four:  # each has its session once its first frame comes
            while (await ws.receive(timeout=30)).type != aiohttp.WSMsgType.BINARY:
                pass
        ws5 = await http.ws_connect(url + "/ws")
        reply = await ws5.receive(timeout=30)
        for ws in (*four, ws5):
            await ws.close()
        return reply.data if reply.type == aiohttp.WSMsgType.TEXT else str(reply)


async def long_session(url: str, pid: int, frames: int) -> dict:
    rss = {}

    def note(k: int) -> None:
        if k in (1, 1000, frames) or k % 2000 == 0:
            rss[k] = rss_mb(pid)

    async with aiohttp.ClientSession() as http:
        t = await player(http, url, frames=frames, on_frame=note)
    await asyncio.sleep(1.0)
    rss["after_close"] = rss_mb(pid)
    return {"frames": len(t), "rss_mb": rss, **summary(t)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per crowd size (default 20)")
    p.add_argument("--fps", type=float, default=15.0, help="the server's per-player target (default play's, 15)")
    p.add_argument("--flood-seconds", type=float, default=5.0, help="seconds of the flood (0: skip)")
    p.add_argument("--long-frames", type=int, default=10_000, help="frames of the long session (0: skip)")
    a = p.parse_args()
    out = {}
    proc, url = start_server(a.checkpoint, a.fps)
    try:
        asyncio.run(warm_up(url))
        for n in (1, 2, 4):
            out[f"players_{n}"] = asyncio.run(crowd(url, n, a.seconds))
            per = out[f"players_{n}"]
            print(
                f"{n} player(s): "
                + ", ".join(f"{r['fps']:.1f} fps (p95 interval {r['interval_ms_p95']:.0f} ms)" for r in per)
                + model_line(per[0]),
                flush=True,
            )
        out["fifth_player"] = asyncio.run(fifth(url))
        print(f"fifth player: {out['fifth_player']}", flush=True)
        if a.flood_seconds:
            out["flood"] = f = asyncio.run(flooded(url, a.flood_seconds))
            print(
                f"flood: {f['messages']} messages over {f['connections']} connections; the other player "
                f"{f['fps_before']:.1f} fps before, {f['fps_during']:.1f} during, {f['fps_first_second_after']:.1f} "
                f"in the first second after, {f['fps_after']:.1f} after",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(30)
    if a.long_frames:
        proc, url = start_server(a.checkpoint, 1000)
        try:
            out["long_session"] = r = asyncio.run(long_session(url, proc.pid, a.long_frames))
            print(f"long session: {r['frames']} frames at {r['fps']:.1f} fps; server RSS (MB) by frame: {r['rss_mb']}")
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
