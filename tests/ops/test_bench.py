"""``collabbus bench``: the quick run measures every phase against real nats-servers and a real bus
process, and its JSON is complete and consistent (no figure here is compared with a speed)."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from ops.bench import (
    CPU_PARTS, REBUILD_OVERHEAD, REBUILD_TAIL, TARGETS, BenchOptions, WebhookReceiver, _percentile, cpu_rows, cpu_seconds,
)

COLLABBUS = [sys.executable, "-m", "ops"]


def figures(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every ``{"value": …, "unit": …}`` in the results, with where it is."""
    found = []
    if isinstance(node, dict):
        if "value" in node:
            found.append((path, node))
        for key, child in node.items():
            found.extend(figures(child, f"{path}.{key}" if path else key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found.extend(figures(child, f"{path}[{index}]"))
    return found


def assert_per_event(phase: dict[str, Any], events: int) -> None:
    """``cpu_per_event`` is each part's ``cpu_seconds`` over the phase's events, in µs."""
    for part, seconds in phase["cpu_seconds"].items():
        assert seconds["unit"] == "s" and seconds["value"] >= 0, part
        per_event = phase["cpu_per_event"][part]
        assert per_event["unit"] == "µs"
        assert per_event["value"] == pytest.approx(seconds["value"] / events * 1e6, abs=0.006 / events * 1e6 + 0.1), part


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """One quick run of the whole bench: (the JSON printed, the JSON written)."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLABBUS_")}
    done = subprocess.run([*COLLABBUS, "bench", "--quick", "--json", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout), json.loads(out.read_text())


@pytest.mark.timeout(480)
def test_quick_run_measures_every_phase_in_both_configurations(quick_run: tuple[dict[str, Any], dict[str, Any]]) -> None:
    printed, written = quick_run
    assert printed == written
    results = written
    assert results["options"]["quick"] is True
    events = results["options"]["events"]

    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["memory"]["value"] > 0 and machine["cpu"]
    assert machine["python"].startswith("3.") and "nats-server" in machine["nats_server"]
    assert machine["disk"]["filesystem"] and machine["disk"]["size"]["value"] > 0

    assert set(results["configurations"]) == {"sync_always", "sync_default"}
    for name, section in results["configurations"].items():
        raw = section["raw"]
        assert raw["status"] == "ok", (name, raw)
        assert raw["events"] == raw["published"] == raw["acked"] == events
        for key in ("bus_nats", "bus_http"):
            bus = section[key]
            assert bus["status"] == "ok", (name, key, bus)
            assert bus["events"] == bus["offered"] == bus["accepted"] == bus["committed"] == events
            assert bus["rejected"] == 0 and bus["last_seq"] >= events
            assert bus["throughput"]["value"] > 0 and bus["rss_peak"]["value"] >= bus["rss"]["value"] > 0
            # every offered event is logged once, and the workflows log what they derive from them
            assert bus["logged"] >= events and bus["logged_per_event"]["value"] == round(bus["logged"] / events, 3)
            # where the CPU went: the bus, its gatekeepers (none on one core), nats-server and the bench
            assert set(bus["cpu_seconds"]) == set(bus["cpu_per_event"]) == {"bus", "gatekeepers", "nats_server", "bench"}
            assert bus["cpu_seconds"]["bus"]["value"] > 0, (name, key, bus["cpu_seconds"])
            assert_per_event(bus, events)
        assert set(raw["cpu_seconds"]) == {"nats_server", "bench"} and raw["cpu_seconds"]["bench"]["value"] > 0
        assert_per_event(raw, events)
        # ratios are of the rounded throughputs, to three decimals
        assert math.isclose(section["ratio"]["value"], section["bus_nats"]["throughput"]["value"] / raw["throughput"]["value"], abs_tol=1e-3)
        assert math.isclose(section["ratio_http"]["value"], section["bus_http"]["throughput"]["value"] / raw["throughput"]["value"], abs_tol=1e-3)

    latency = results["configurations"]["sync_always"]["latency"]
    assert latency["status"] == "ok", latency
    assert latency["events"] == latency["committed"] == 500 and latency["rejected"] == 0
    # a fifth of a second's worth offered first at the same rate, not measured
    assert latency["warmup_events"] == 100 and results["options"]["latency_warmup"] == {"value": 0.2, "unit": "s"}
    assert 0 < latency["p50"]["value"] <= latency["p99"]["value"] <= latency["max"]["value"]
    assert 0 < latency["logged_p50"]["value"] <= latency["logged_p99"]["value"] <= latency["max"]["value"]
    assert latency["p50"]["unit"] == "ms" and latency["poll_interval"]["value"] > 0
    assert latency["cpu_seconds"]["bus"]["value"] > 0
    assert_per_event(latency, 500)
    # nats-py alone at the same rate on the same server, before the bus: the floor under the figures above
    raw_latency = latency["raw"]
    assert raw_latency["events"] == raw_latency["received"] == 500
    assert 0 < raw_latency["p50"]["value"] <= raw_latency["p99"]["value"] <= raw_latency["max"]["value"]
    assert 0 < raw_latency["ack_p50"]["value"] <= raw_latency["ack_p99"]["value"]

    hooks = results["configurations"]["sync_always"]["webhooks"]
    assert hooks["status"] == "ok", hooks
    assert hooks["endpoints"] == 20 and hooks["accepted"] == hooks["events"] == 20
    assert hooks["delivered"] == hooks["expected"] == 20 * 20
    assert hooks["signatures_verified"] == hooks["delivered"] + hooks["duplicates"] and hooks["signatures_invalid"] == 0
    assert hooks["throughput"]["value"] > 0

    rebuild = results["configurations"]["sync_default"]["rebuild"]
    assert rebuild["status"] == "ok", rebuild
    assert rebuild["live"]["published"] == rebuild["events"] == 1000
    # the log also holds the operator and the events the workflows derived
    assert rebuild["replayed"] > rebuild["events"] and rebuild["failures"] == 0
    assert rebuild["live"]["applied"] >= rebuild["events"] and rebuild["live"]["rss"]["value"] > 0
    assert rebuild["throughput"]["value"] > 0 and rebuild["measured_by"] == "collabbus rebuild --json"

    # the bus processes' peaks; the rebuild's own process is reported apart
    peaks = [node["value"] for path, node in figures(results["configurations"]) if path.split(".")[-1] == "rss_peak"]
    assert len(peaks) == 7 and results["bus_rss_peak"]["value"] == max(peaks)
    assert rebuild["process_rss_peak"]["value"] > 0
    assert "reader_rss_peak" in rebuild  # (a quick rebuild may end before the bench looks at its reader)
    assert len(rebuild["lanes_rss_peak"]) <= len(rebuild["lanes"] or [None]) - 1  # the other lanes' processes, when seen
    assert all(lane["value"] > 0 and lane["unit"] == "MB" for lane in rebuild["lanes_rss_peak"])

    for path, node in figures(results):
        assert isinstance(node.get("unit"), str) and node["unit"], path
    assert [target["target"] for target in results["targets"]] == [target[0] for target in TARGETS]
    for target in results["targets"]:
        bound = target["bound"]
        assert isinstance(target["met"], bool), target
        if target["note"] is None:
            value = target["measured"]["value"]
            holds = value >= bound["value"] if bound["op"] == ">=" else value <= bound["value"]
            assert target["met"] == holds, target
        else:
            assert target["met"] is False, target
    # the quick run's log holds 1,000 events, not the 100,000 the memory target names
    assert "not 100,000" in results["targets"][-1]["note"]


def test_the_table_says_where_the_cores_went(quick_run: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Beside the figures, a person reads each phase's CPU an event, part by part, and their sum."""
    from ops.cli import _render_bench

    results = quick_run[0]
    table = list(cpu_rows(results))
    assert [(configuration, phase) for configuration, phase, _, _ in table] == [
        (configuration, phase) for configuration in ("sync_always", "sync_default")
        for phase in ("raw nats-py", "bus over NATS", "bus over HTTP", "latency at the fixed rate")
        if phase != "latency at the fixed rate" or configuration == "sync_always"
    ]
    for configuration, phase, parts, together in table:
        key = {"raw nats-py": "raw", "bus over NATS": "bus_nats", "bus over HTTP": "bus_http"}.get(phase, "latency")
        measured = results["configurations"][configuration][key]["cpu_per_event"]
        assert parts == [measured[part]["value"] if part in measured else None for part in CPU_PARTS]
        assert (parts[0] is None) == (key == "raw") and together == pytest.approx(sum(value or 0 for value in parts))
    _render_bench(results, tmp_path / "results.json")
    printed = capsys.readouterr().out
    assert "where the cores went" in printed and "nats-server" in printed
    raw_always = table[0]
    assert f"{raw_always[3]:,.0f}" in printed  # the sum of nats-server's and the bench's CPU for raw nats-py


def test_unknown_phase_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run([*COLLABBUS, "bench", "--only", "raw,speed", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    message = " ".join(done.stderr.replace("│", " ").split())
    assert "'speed': choose from raw, bus, http, latency, webhooks, rebuild" in message
    assert not (tmp_path / "r.json").exists()


def test_receiver_checks_signatures_as_standard_webhooks_makes_them() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    receiver = WebhookReceiver()
    receiver.add_secret(3, secret)
    body = '{"id":"e-1","type":"project.registered"}'
    stamp = datetime.now(timezone.utc)
    signature = Webhook(secret).sign("e-1", stamp, body)
    headers = {"webhook-id": "e-1", "webhook-timestamp": str(int(stamp.timestamp())), "webhook-signature": f"v1,bogus {signature}"}
    assert receiver.check("3", headers, body.encode())
    assert not receiver.check("3", headers, body.encode() + b" ")
    assert not receiver.check("4", headers, body.encode())
    assert not receiver.check("3", {**headers, "webhook-id": "e-2"}, body.encode())


def test_percentiles_are_nearest_rank_and_never_hide_an_uncommitted_event() -> None:
    values = [float(v) for v in range(1, 101)]
    assert _percentile(values, 0.5) == 50.0 and _percentile(values, 0.99) == 99.0 and _percentile(values, 1.0) == 100.0
    assert _percentile(values[:99] + [math.inf], 0.99) == 99.0
    assert _percentile(values[:98] + [math.inf, math.inf], 0.99) is None
    assert _percentile([], 0.5) is None


def test_the_rebuild_phase_gets_what_the_runs_time_limit_leaves() -> None:
    options = BenchOptions()
    wanted = options.fill_budget + options.live_budget + options.rebuild_budget
    roomy = options.within(wanted + REBUILD_OVERHEAD + 100)  # time enough: the budgets stay
    assert roomy.fill_budget == options.fill_budget
    assert roomy.fitted(options.live_budget, options.rebuild_budget) == options.live_budget
    half = options.within(wanted / 2 + REBUILD_OVERHEAD)
    assert half.fill_budget == pytest.approx(options.fill_budget / 2)
    assert half.budget == options.budget and half.total_budget == options.total_budget  # other phases are not touched
    # What is left when the live apply starts is shared between it and the rebuild, in proportion.
    live = half.fitted(options.live_budget, options.rebuild_budget)
    assert half.phase_ends is not None
    left = half.phase_ends - time.perf_counter() - REBUILD_TAIL
    assert live == pytest.approx(left * options.live_budget / (options.live_budget + options.rebuild_budget), rel=0.01)
    late = options.within(-30.0)  # already past the limit: a tenth of each, so the phase still measures
    assert late.fill_budget == pytest.approx(options.fill_budget / 10)
    assert late.fitted(options.rebuild_budget) == pytest.approx(options.rebuild_budget / 10)
    assert BenchOptions().fitted(options.live_budget) == options.live_budget  # no limit set: the budget as asked
    assert options.total_budget < 300  # the issue: a run finishes in under five minutes


def test_cpu_seconds_are_a_process_s_own_all_threads_counted() -> None:
    burn = "import threading, time\ndef spin():\n    end = time.thread_time() + 0.2\n    while time.thread_time() < end: pass\n" \
           "threads = [threading.Thread(target=spin) for _ in range(2)]\n[t.start() for t in threads]\n[t.join() for t in threads]\n" \
           "print('done', flush=True)\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        used = cpu_seconds(child.pid)
        assert used is not None and 0.35 <= used < 5  # two threads of ~0.2 s each, and the start
        assert cpu_seconds(os.getpid()) == pytest.approx(time.process_time(), abs=0.05)
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds(child.pid) is None  # gone
