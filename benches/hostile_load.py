#!/usr/bin/env python3
"""Hostile-client load against a searcher it starts itself on loopback (issue 18).

Two attacks, each bounded in time and run against 127.0.0.1 only:

  slow-upload  N connections each declare a large body, send most of it at once, then
               trickle one byte every few seconds (the run that took the old server from
               257 MB to 2.7 GB). The server's resident memory is sampled all along.
  abort-flood  K clients send whole searches and hang up without reading the answer. The
               server's /metrics then say how many searches ran and how many were skipped.

A normal client searches a real photo twice a second through both, so the numbers say
whether shoppers still get answers. Standard library only.

    python3 benches/hostile_load.py --searcher target/release/searcher --db DB \\
        --photo demo/catalog/images/X.jpg [--connections 200] [--seconds 75]
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http(port, request, read=True, timeout=30):
    """Sends `request` bytes; returns (status, seconds) or (None, seconds) on failure."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(request)
        await writer.drain()
        if not read:
            writer.transport.abort()
            return None, time.monotonic() - started
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await asyncio.wait_for(reader.readexactly(length), timeout)
        writer.close()
        return int(head.split(b" ")[1]), time.monotonic() - started
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        return None, time.monotonic() - started


def search_request(photo):
    return (f"POST /v1/search?k=5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(photo)}\r\nConnection: close\r\n\r\n").encode() + photo


async def shopper(port, photo, stop, results):
    """A normal client: one search every 0.5 s until `stop` is set."""
    while not stop.is_set():
        status, seconds = await http(port, search_request(photo))
        results.append((status, seconds))
        await asyncio.sleep(0.5)


async def sampler(pid, stop, samples):
    while not stop.is_set():
        samples.append((time.monotonic(), rss_mb(pid)))
        await asyncio.sleep(0.5)


async def slow_upload(port, declared, prefix, every, seconds, outcomes):
    """Declares `declared` bytes, sends `prefix` at once, then one byte every `every` s."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        outcomes.append(f"connect failed: {e.__class__.__name__}")
        return
    started = time.monotonic()
    try:
        writer.write(f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {declared}\r\n\r\n".encode())
        writer.write(b"\xff" * prefix)
        await writer.drain()
        read = asyncio.ensure_future(reader.readuntil(b"\r\n"))
        while time.monotonic() - started < seconds and not read.done():
            await asyncio.wait([read], timeout=every)
            if not read.done():
                writer.write(b"\xff")
                await writer.drain()
        if read.done() and not read.exception():
            outcomes.append(f"{read.result().split(b' ')[1].decode()} after {time.monotonic() - started:.0f} s")
        else:
            read.cancel()
            outcomes.append(f"still open at {time.monotonic() - started:.0f} s" if not read.done() else "closed without an answer")
    except (OSError, asyncio.IncompleteReadError) as e:
        outcomes.append(f"cut off ({e.__class__.__name__}) after {time.monotonic() - started:.0f} s")
    finally:
        writer.transport.abort()


async def metrics(port):
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    text = (await reader.read()).decode()
    writer.close()
    values = {}
    for line in text.splitlines():
        if line.startswith("shoplens_") and " " in line:
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def summarise_shopper(results):
    ok = [s for s, _ in results if s == 200]
    latencies = sorted(t for s, t in results if s == 200)
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
    return {"searches": len(results), "ok": len(ok), "p50_ms": round(p50, 1),
            "statuses": {str(k): sum(1 for s, _ in results if s == k) for k in sorted({s for s, _ in results}, key=str)}}


async def run_slow_upload(args, port, pid, photo):
    stop = asyncio.Event()
    samples, shopper_results, outcomes = [], [], []
    tasks = [asyncio.ensure_future(sampler(pid, stop, samples)), asyncio.ensure_future(shopper(port, photo, stop, shopper_results))]
    await asyncio.sleep(2)
    baseline = rss_mb(pid)
    attack_started = time.monotonic()
    attackers = [asyncio.ensure_future(slow_upload(port, args.declared, args.prefix, args.every, args.seconds, outcomes)) for _ in range(args.connections)]
    await asyncio.gather(*attackers)
    attack_seconds = time.monotonic() - attack_started
    await asyncio.sleep(10)
    after = rss_mb(pid)
    stop.set()
    await asyncio.gather(*tasks)
    peak = max(r for t, r in samples if t >= attack_started)
    grouped = {}
    for o in outcomes:
        key = o.split(" after ")[0]
        grouped[key] = grouped.get(key, 0) + 1
    return {"attack": "slow-upload", "connections": args.connections, "declared_bytes": args.declared, "sent_at_once": args.prefix,
            "trickle_every_s": args.every, "attack_seconds": round(attack_seconds, 1), "rss_mb": {"before": round(baseline), "peak": round(peak), "10_s_after": round(after)},
            "attackers_got": grouped, "shopper": summarise_shopper(shopper_results)}


async def run_abort_flood(args, port, pid, photo):
    before = await metrics(port)
    stop = asyncio.Event()
    shopper_results = []
    shop = asyncio.ensure_future(shopper(port, photo, stop, shopper_results))
    sent = 0

    async def aborter():
        nonlocal sent
        while not stop.is_set():
            await http(port, search_request(photo), read=False)
            sent += 1
            await asyncio.sleep(0.05)

    flooders = [asyncio.ensure_future(aborter()) for _ in range(args.flooders)]
    await asyncio.sleep(args.flood_seconds)
    stop.set()
    await asyncio.gather(shop, *flooders)
    await asyncio.sleep(5)
    after = await metrics(port)
    delta = lambda key: int(after.get(key, 0) - before.get(key, 0))
    return {"attack": "abort-flood", "flooders": args.flooders, "seconds": args.flood_seconds, "abandoned_requests_sent": sent,
            "searches_run": delta('shoplens_search_stage_duration_seconds_count{stage="detect"}'),
            "searches_skipped_client_gone": delta("shoplens_search_abandoned_total"),
            "answered_499": delta('shoplens_http_requests_total{route="/v1/search",status="499"}'),
            "answered_503_busy": delta('shoplens_http_requests_total{route="/v1/search",status="503"}'),
            "shopper": summarise_shopper(shopper_results)}


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--searcher", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--photo", required=True)
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--declared", type=int, default=20 << 20, help="Content-Length each slow upload declares")
    p.add_argument("--prefix", type=int, default=19 << 20, help="bytes each slow upload sends at once")
    p.add_argument("--every", type=float, default=4.5, help="seconds between the trickled bytes")
    p.add_argument("--seconds", type=float, default=75, help="how long a slow upload keeps trickling")
    p.add_argument("--flooders", type=int, default=20)
    p.add_argument("--flood-seconds", type=float, default=30)
    p.add_argument("--attack", choices=["slow-upload", "abort-flood", "both"], default="both")
    p.add_argument("--out", help="append the JSON results to this file")
    args = p.parse_args()
    photo = open(args.photo, "rb").read()
    port = free_port()
    server = subprocess.Popen([args.searcher, "--db", args.db, "--bind", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            status, _ = await http(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=2)
            if status == 200:
                break
            await asyncio.sleep(0.5)
        else:
            sys.exit("the searcher never became ready")
        results = []
        if args.attack in ("slow-upload", "both"):
            results.append(await run_slow_upload(args, port, server.pid, photo))
            print(json.dumps(results[-1], indent=1), flush=True)
        if args.attack in ("abort-flood", "both"):
            results.append(await run_abort_flood(args, port, server.pid, photo))
            print(json.dumps(results[-1], indent=1), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
