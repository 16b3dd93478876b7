"""Bench the webhook bridge: signed webhooks from wrk at 32 connections, for 10 s.

`python -m intentflow.loadtest.bench_bridge` starts the embedded broker, then runs one
bridge process (uvicorn + uvloop) twice: as a baseline that only verifies the
signature and answers (BRIDGE_PUBLISH=false, no Kafka), and as the full bridge
that publishes and awaits the broker's acknowledgement. The difference is the
cost of durability. Needs `wrk` on the PATH (`make bench-bridge` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from intentflow.devservices.embedded import EmbeddedKafka, free_port
from intentflow.devservices.topics import DEFAULT_PARTITIONS, create_topics
from intentflow.stripekit.events import charge_event, encode, intent_event, new_id
from intentflow.stripekit.signing import stripe_signature

SECRET = "whsec_bench"
BODIES = 2000

# Loads pre-signed requests (one "signature<TAB>body" per line) and cycles through
# them; prints the summary as one JSON line.
LUA = r"""
local requests = {}
local n = 0
local i = 0
init = function(args)
  for line in io.lines(args[1]) do
    local tab = line:find("\t", 1, true)
    local headers = {}
    headers["Stripe-Signature"] = line:sub(1, tab - 1)
    headers["Content-Type"] = "application/json"
    n = n + 1
    requests[n] = wrk.format("POST", "/webhooks/stripe", headers, line:sub(tab + 1))
  end
  i = math.random(n) - 1
end
request = function()
  i = (i % n) + 1
  return requests[i]
end
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"non2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, errors.status, errors.connect + errors.read + errors.write + errors.timeout))
end
"""


@dataclass(frozen=True)
class Result:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    cpu_us_per_request: float | None = None


def write_requests(path: Path, count: int, timestamp: int) -> None:
    """`count` realistic events over count/4 intents, each signed for `timestamp`."""
    lines = []
    intents = [new_id("pi") for _ in range(max(1, count // 4))]
    for n in range(count):
        intent = intents[n % len(intents)]
        if n % 5 == 4:
            body = encode(charge_event(intent, amount=1999))
        else:
            body = encode(intent_event(intent, amount=1999, cart_id=new_id("cart")))
        lines.append(stripe_signature(body, SECRET, timestamp) + "\t" + body.decode())
    path.write_text("\n".join(lines) + "\n")


def start_bridge(
    port: int, bootstrap: str, topic: str, publish: bool, log: Path
) -> subprocess.Popen[bytes]:
    admin_port = free_port()  # its /readyz
    env = {
        **os.environ,
        "STRIPE_WEBHOOK_SECRET": SECRET,
        "STRIPE_LIVEMODE": "false",  # stripekit's events are test-mode events
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "KAFKA_ENABLE_IDEMPOTENCE": "false",
        "BRIDGE_PORT": str(port),
        "BRIDGE_ADMIN_PORT": str(admin_port),
        "BRIDGE_PUBLISH": str(publish).lower(),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "intentflow.producer"], env=env, stderr=out
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bridge exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{admin_port}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("bridge not ready")


def run_wrk(
    port: int, script: Path, data: Path, args: argparse.Namespace, duration_s: int
) -> Result:
    out = subprocess.run(
        ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration_s}s",
         "-s", str(script), f"http://127.0.0.1:{port}", "--", str(data)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    seconds = summary["duration_us"] / 1e6
    return Result(
        requests=summary["requests"],
        rps=summary["requests"] / seconds,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        non2xx=summary["non2xx"],
        socket_errors=summary["socket_errors"],
    )


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process, all its threads (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_one(
    name: str, publish: bool, broker: EmbeddedKafka, topic: str, workdir: Path,
    script: Path, data: Path, args: argparse.Namespace,
) -> Result:  # fmt: skip
    port = free_port()
    process = start_bridge(port, broker.bootstrap_servers, topic, publish, workdir / f"{name}.log")
    try:
        run_wrk(port, script, data, args, duration_s=2)  # warm-up
        cpu_before = cpu_seconds(process.pid)
        result = run_wrk(port, script, data, args, duration_s=args.duration)
        cpu_after = cpu_seconds(process.pid)
        if cpu_before is None or cpu_after is None or not result.requests:
            return result
        cpu_us = (cpu_after - cpu_before) * 1e6 / result.requests
        return dataclasses.replace(result, cpu_us_per_request=cpu_us)
    finally:
        process.terminate()
        process.wait(20)


async def topic_size(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(DEFAULT_PARTITIONS)]
        ends = await consumer.end_offsets(parts)
        return sum(ends.values())
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_bridge", description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk (make bench-bridge does this)")

    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp, EmbeddedKafka() as broker:
        broker.start()
        workdir = Path(tmp)
        script = workdir / "webhooks.lua"
        script.write_text(LUA)
        data = workdir / "requests.tsv"
        write_requests(data, BODIES, int(time.time()))
        topic = f"stripe.events.bench.{new_id('t')}"
        asyncio.run(create_topics(broker.bootstrap_servers, topic))

        baseline = bench_one("verify only", False, broker, topic, workdir, script, data, args)
        full = bench_one("full bridge", True, broker, topic, workdir, script, data, args)
        landed = asyncio.run(topic_size(broker.bootstrap_servers, topic))

    print(
        f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s, {os.cpu_count()} CPUs\n"
    )
    print("| run | requests | req/s | p50 ms | p99 ms | non-2xx | socket errors | CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in (("verify only", baseline), ("full bridge", full)):
        cpu = "" if r.cpu_us_per_request is None else f"{r.cpu_us_per_request:.0f}"
        print(
            f"| {name} | {r.requests} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.non2xx} | {r.socket_errors} | {cpu} |"
        )
    print(f"\nfull / baseline throughput: {full.rps / baseline.rps:.2f}")
    print(f"messages in the topic (warm-up + measured run): {landed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
