"""The results: markdown (bench/results/<name>.md), raw JSON, and the tps chart."""

import json
import os
import re

from .pgbench import WORKLOADS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ORDER = ["direct", "pgbouncer", "haproxy", "sy-session", "sy-txn", "sy-txn-nodigest", "sy-txn-traced",
         "sy-txn-traced-all", "sy-txn-otlp-down", "sy-txn-otlp-hung", "sy-split"]
SY = ["sy-session", "sy-txn", "sy-split"]
LABEL = {
    "direct": "direct", "pgbouncer": "PgBouncer (txn)", "haproxy": "HAProxy (TCP)",
    "sy-session": "Switchyard session", "sy-txn": "Switchyard txn", "sy-split": "Switchyard txn+split",
    "sy-split1": "Switchyard txn+split (1 node)", "fo-txn": "Switchyard txn", "fo-session": "Switchyard session",
    "sy-txn-nodigest": "Switchyard txn, digests off",
    "sy-txn-traced": "Switchyard txn, traces 1 %",
    "sy-txn-traced-all": "Switchyard txn, traces 100 %",
    "sy-txn-otlp-down": "Switchyard txn, traces 100 %, receiver down",
    "sy-txn-otlp-hung": "Switchyard txn, traces 100 %, receiver hung",
    "pgbouncer-tls": "PgBouncer (txn), TLS", "sy-txn-tls": "Switchyard txn, TLS",
    "sy-split-ryw-off": "Switchyard txn+split, read_your_writes off",
}
# The connect workload's extra systems (--connect-tls), after ORDER in its table.
TLS_KEYS = ["pgbouncer-tls", "sy-txn-tls"]


def f(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def cell_ok(r):
    return r is not None and r.get("status") == "ok" and r.get("tps") is not None


def index(cases):
    return {(r["workload"], r["protocol"], r["clients"], r["system"]): r for r in cases}


def met(ok):
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


# ---- targets -------------------------------------------------------------------------

NOT_MEASURED = "not measured in this run"
MATRIX_PROTOS = ["simple", "extended"]


def configured_wait(split_extra):
    """causal_wait_ms set through --split-extra (sy-split's own value), else 0."""
    m = re.search(r"causal_wait_ms\s*=\s*(\d+)", split_extra or "")
    return int(m.group(1)) if m else 0


def nm(why):
    return f"{NOT_MEASURED}: {why}"


def cpu_txn(r):
    """(total, user, kernel) proxy CPU µs per transaction of a case (connection set-up of
    its clients included), None without the figures; user/kernel None without the split."""
    if not cell_ok(r) or r.get("cpu_s") is None or not r.get("txns"):
        return None
    n = r["txns"]
    if r.get("user_s") is None:
        return r["cpu_s"] / n * 1e6, None, None
    return r["cpu_s"] / n * 1e6, r["user_s"] / n * 1e6, r["sys_s"] / n * 1e6


def fmt_cpu(c):
    tot, u, k = c
    return f"{tot:,.1f} µs" + (f" ({u:,.2f} user + {k:,.1f} kernel)" if u is not None else "")


def why_not(name, r):
    return f"{name} {r.get('status')}: {short(r)[:120]}"


def targets(res):
    """[(target, figure, verdict)]: issue 25's targets from what the run measured (a target
    the run did not measure says so, with the option that measures it), then failover."""
    out = []
    cases = res.get("cases", [])
    idx = index(cases)
    a = res.get("args", {})
    measured = lambda w, c, p: any(r["workload"] == w and r["clients"] == c and r["protocol"] == p for r in cases)
    protos = MATRIX_PROTOS + (["prepared"] if measured("select", 16, "prepared") else [])

    # 1. CPU per transaction, select-only, 16 clients.
    for p in protos:
        sy, pb = idx.get(("select", p, 16, "sy-txn")), idx.get(("select", p, 16, "pgbouncer"))
        t = f"1. CPU per transaction (user + kernel), select-only, 16 clients, -M {p}: Switchyard txn ≤ 1.0× PgBouncer's"
        tu = f"1. CPU per transaction, select-only, 16 clients, -M {p}: Switchyard txn's user-space part ≤ 1.2 µs"
        if sy is None:
            why = nm(f"no select-only case at 16 clients -M {p} on sy-txn "
                     f"(`--workloads select --clients 16 --protocols {p} --systems pgbouncer,sy-txn`)")
            out += [(t, "–", why), (tu, "–", why)]
        else:
            cs, cp = cpu_txn(sy), cpu_txn(pb)
            if cs is None:
                out.append((t, why_not("Switchyard", sy), met(False) if not cell_ok(sy) else nm("no CPU figure")))
            elif pb is None:
                out.append((t, f"Switchyard {fmt_cpu(cs)}", nm("PgBouncer not in --systems")))
            elif cp is None:
                out.append((t, f"Switchyard {fmt_cpu(cs)}; {why_not('PgBouncer', pb)}",
                            "no ratio: PgBouncer did not run the case"))
            else:
                out.append((t, f"{cs[0] / cp[0]:.2f}× (Switchyard {fmt_cpu(cs)} vs PgBouncer {fmt_cpu(cp)})",
                            met(cs[0] <= cp[0])))
            if cs is None:
                out.append((tu, "–", met(False) if not cell_ok(sy) else nm("no CPU figure")))
            elif cs[1] is None:
                out.append((tu, f"{cs[0]:,.1f} µs in all", nm("this run's figures have no user/kernel split")))
            else:
                out.append((tu, f"{cs[1]:,.2f} µs user (+ {cs[2]:,.1f} µs kernel)", met(cs[1] <= 1.2)))
    for p in protos:
        ss, hp = idx.get(("select", p, 16, "sy-session")), idx.get(("select", p, 16, "haproxy"))
        t = (f"1. CPU per transaction, select-only, 16 clients, -M {p}, session mode: Switchyard session against "
             "HAProxy (tcp) (published; issue 25 sets no limit)")
        if ss is None or hp is None:
            out.append((t, "–", nm("needs sy-session and haproxy at 16 clients "
                                   f"(`--workloads select --clients 16 --protocols {p} --systems haproxy,sy-session`)")))
            continue
        cs, ch = cpu_txn(ss), cpu_txn(hp)
        if cs is None or ch is None:
            out.append((t, "; ".join(why_not(n, r) for n, r, c in (("Switchyard", ss, cs), ("HAProxy", hp, ch))
                                     if c is None), "no ratio"))
        else:
            out.append((t, f"{cs[0] / ch[0]:.2f}× (Switchyard session {fmt_cpu(cs)} vs HAProxy {fmt_cpu(ch)})",
                        f"published ({'≤' if cs[0] <= ch[0] else '>'} 1.0× HAProxy's)"))

    # 2. Throughput against PgBouncer (txn) and HAProxy (session), 16 and 1000 clients.
    for key, other, oname, mode in (("sy-txn", "pgbouncer", "PgBouncer", "txn"),
                                    ("sy-session", "haproxy", "HAProxy (tcp)", "session")):
        missing = []
        for w in ("select", "tpcb"):
            for c in (16, 1000):
                for p in MATRIX_PROTOS:
                    sy, o = idx.get((w, p, c, key)), idx.get((w, p, c, other))
                    if sy is None or o is None:
                        missing.append(f"{WORKLOADS[w]['label']} c={c} -M {p}")
                        continue
                    t = f"2. tps, {WORKLOADS[w]['label']}, {c} clients, -M {p}: Switchyard {mode} ≥ 1.0× {oname}"
                    if cell_ok(sy) and cell_ok(o):
                        r = sy["tps"] / o["tps"]
                        out.append((t, f"{r:.2f}× ({sy['tps']:,.0f} vs {o['tps']:,.0f} tps)", met(r >= 1.0)))
                    elif cell_ok(sy):
                        out.append((t, f"Switchyard {sy['tps']:,.0f} tps; {why_not(oname, o)}",
                                    f"no ratio: {oname} cannot run it, Switchyard does"))
                    elif sy.get("status") == "n/a" and o.get("status") == "n/a":
                        out.append((t, f"both n/a: {short(sy).split(';')[0][:120]}",
                                    "no ratio: neither can run it (one server connection per client)"))
                    else:
                        out.append((t, why_not("Switchyard", sy) + ("" if cell_ok(o) else "; " + why_not(oname, o)),
                                    met(False)))
        if missing:
            what = ", ".join(missing) if len(missing) < 8 else \
                "none of the 8 cases (16 and 1000 clients × simple / extended × select-only / TPC-B)"
            out.append((f"2. tps: Switchyard {mode} ≥ 1.0× {oname}, other cases of the matrix", what,
                        nm(f"`--workloads select,tpcb --clients 16,1000 --protocols simple,extended` with "
                           f"{other} and {key} in --systems")))

    # 3. Added latency at 1 client.
    protos1 = MATRIX_PROTOS + (["prepared"] if measured("select", 1, "prepared") else [])
    for p in protos1:
        sy, pb, d = (idx.get(("select", p, 1, k)) for k in ("sy-txn", "pgbouncer", "direct"))
        t = (f"3. added latency, select-only, 1 client, -M {p}: Switchyard txn's p50 and p99 minus direct's "
             "≤ PgBouncer's")
        if sy is None or pb is None or d is None:
            out.append((t, "–", nm("needs select-only at 1 client on direct, pgbouncer and sy-txn "
                                   f"(`--workloads select --clients 1 --protocols {p} --systems direct,pgbouncer,sy-txn`)")))
            continue
        bad = [(n, r) for n, r in (("Switchyard", sy), ("PgBouncer", pb), ("direct", d))
               if not cell_ok(r) or r.get("p50_ms") is None]
        if bad:
            out.append((t, "; ".join(why_not(n, r) for n, r in bad),
                        met(False) if bad[0][0] == "Switchyard" else "no ratio"))
            continue
        add = lambda r, q: (r[q] - d[q]) * 1000
        s50, s99, b50, b99 = add(sy, "p50_ms"), add(sy, "p99_ms"), add(pb, "p50_ms"), add(pb, "p99_ms")
        ok50, ok99 = s50 <= b50, s99 <= b99
        verdict = met(ok50 and ok99)
        if ok50 != ok99:
            verdict += f" ({'p99' if ok50 else 'p50'} above)"
        out.append((t, f"p50 / p99 over direct's ({d['p50_ms'] * 1000:,.0f} / {d['p99_ms'] * 1000:,.0f} µs): "
                       f"Switchyard {s50:+,.0f} / {s99:+,.0f} µs, PgBouncer {b50:+,.0f} / {b99:+,.0f} µs", verdict))

    # 4. Connection rate, plain and TLS.
    out += connect_targets(res)

    # 5. Fresh reads.
    fr = res.get("freshness", [])
    base_wait = configured_wait(a.get("split_extra"))
    for wait, limit in ((0, 5), (100, 10)):
        rows = [r for r in fr if r.get("workload") == "mix" and r.get("causal_wait_ms", base_wait) == wait]
        t = (f"5. read_your_writes on vs off, mix 1 TPC-B : 4 select-only, 16 clients, causal_wait_ms = {wait}: "
             f"≤ {limit} % slower")
        if not rows:
            if a.get("skip_freshness"):
                why = "--skip-freshness"
            elif wait == base_wait:
                why = "the mix workload was not in --freshness-workloads"
            elif "freshness_wait_ms" not in a or wait not in a.get("freshness_wait_ms", []):
                why = f"`--freshness-wait-ms {base_wait},{wait}`"
            else:
                why = "mix was not in --freshness-wait-workloads"
            out.append((t, "–", nm(why)))
            continue
        for r in rows:
            off, on = r["sy-split-ryw-off"], r["sy-split"]
            sd = r.get("slowdown_pct")
            clients = "" if r["clients"] == 16 else f" (at {r['clients']} clients)"
            warn = " ⚠ disturbed run" if off.get("disturbed") or on.get("disturbed") else ""
            n = len(on.get("tps_all", []))
            out.append((t + clients, f"{f(sd)} % ({on['tps_median']:,.0f} vs {off['tps_median']:,.0f} tps, "
                                     + (f"medians of {n} runs each" if n > 1 else "one run each") + f"){warn}",
                        met(sd is not None and sd <= limit) if r["clients"] == 16 else nm("not at 16 clients")))

    # 6. MySQL: bench/mysql.
    out.append(("6. MySQL session relay (sysbench oltp_read_only / oltp_read_write, 16 threads): tps ≥ 1.0× HAProxy "
                "(tcp), CPU per query ≤ HAProxy's", "–", f"{NOT_MEASURED}: measured by `bench/mysql`"))

    # 7. Idle memory.
    idl = {r.get("system"): r for r in res.get("idle", [])}
    t = "7. idle memory ≤ 4 KiB per idle client at 10,000 clients (Switchyard txn)"
    r = idl.get("sy-txn")
    if r is None:
        out.append((t, "–", nm("--skip-idle" if a.get("skip_idle") else "sy-txn not in --idle-systems")))
    elif r.get("per_client_kib") is None:
        out.append((t, esc(r.get("error", "no figure")), nm("the measurement failed")))
    else:
        pb = idl.get("pgbouncer", {}).get("per_client_kib")
        pbq = idl.get("pgbouncer", {}).get("per_client_after_query_kib")
        after = r.get("per_client_after_query_kib")
        fig = (f"{r['per_client_kib']:.2f} KiB/client ({r['connected']:,} of {r['clients']:,} connected)"
               + (f"; PgBouncer {pb:.2f}" if pb is not None else "")
               + (f"; after a query each: {after:.2f}" if after is not None else "")
               + (f" (PgBouncer {pbq:.2f})" if after is not None and pbq is not None else ""))
        if r["clients"] < 10000:
            out.append((t, fig, nm(f"measured at {r['clients']:,} clients (`--idle-clients 10000`)")))
        else:
            out.append((t, fig, met(r["per_client_kib"] <= 4 and r["connected"] == r["clients"])))

    # 8. Pinned scaling.
    pin = res.get("pin") or {}
    t = "8. scaling: tps per proxy core, proxy and PostgreSQL + pgbench on separate CPU sets (issue 25 sets no limit)"
    if pin.get("sy"):
        figs = [f"{x['threads']} thread{'s' if x['threads'] > 1 else ''}: {f(x.get('tps_per_core'), 0)}"
                for x in pin["sy"]]
        pbs = [x.get("tps_per_core") for x in pin.get("pgbouncer", []) if x.get("tps_per_core") is not None]
        if pbs:
            figs.append(f"PgBouncer (1 core): {', '.join(f(x, 0) for x in pbs)}")
        out.append((t, "; ".join(figs), "reported"))
    else:
        out.append((t, "–", nm(pin.get("error") or "`--pin`")))

    fo = res.get("failover", {})
    if fo.get("standby"):
        for key in ("fo-txn", "fo-session"):
            r = fo["standby"].get(key)
            if r:
                b = r.get("back_s")
                out.append((f"standby kill -9: reads back within 1 s ({LABEL[key]}, ro)",
                            f"{f(b, 3)} s, {r['errors']} client errors", met(b is not None and b <= 1.0)))
    if fo.get("primary"):
        h = fo["health"]
        limit = h["interval_ms"] * h["fall"] / 1000 + 1
        for key in ("fo-txn", "fo-session"):
            r = fo["primary"].get(key)
            if r:
                b = r.get("back_s")
                out.append((f"primary kill -9 + promote: writes back within interval×fall+1 s = {limit:g} s ({LABEL[key]}, rw)",
                            f"{f(b, 3)} s, {r['errors']} client errors", met(b is not None and b <= limit)))
    return out


def connect_targets(res):
    """Item 4, the connection rate: Switchyard txn against PgBouncer (txn) under pgbench -C -S,
    per protocol and client count of the connect workload, in plaintext and (--connect-tls)
    over TLS."""
    out = []
    cases = res.get("cases", [])
    idx = index(cases)
    a = res.get("args", {})
    for tls in (False, True):
        sk, pk = ("sy-txn-tls", "pgbouncer-tls") if tls else ("sy-txn", "pgbouncer")
        keys = sorted({(r["protocol"], r["clients"]) for r in cases if r["workload"] == "connect" and r["system"] == sk},
                      key=lambda k: (["simple", "extended", "prepared"].index(k[0]), k[1]))
        if not keys:
            t = (f"4. connection rate (pgbench -C, SCRAM-SHA-256){', TLS' if tls else ''}, 16 connectors: "
                 "Switchyard txn ≥ 1.0× PgBouncer's connections/s, CPU per new connection ≤ 1.0×, "
                 "0 server logins per client login once warm")
            if tls and any(r["workload"] == "connect" for r in cases):
                why = "`--connect-tls`"
            else:
                why = "`--workloads ...,connect` with pgbouncer and sy-txn in --systems" + \
                      (" and `--connect-tls`" if tls else "")
            out.append((t, "–", nm(why)))
            continue
        for proto, c in keys:
            sy, pb = idx.get(("connect", proto, c, sk)), idx.get(("connect", proto, c, pk))
            what = f"4. connect (-C -S){', TLS (sslmode=require)' if tls else ''}, {c} clients, -M {proto}"
            if not cell_ok(sy):
                out.append((f"{what}: Switchyard txn ≥ 1.0× PgBouncer's connections/s",
                            f"Switchyard {sy.get('status')}: {short(sy)}", met(False)))
                continue
            if cell_ok(pb):
                r = sy["tps"] / pb["tps"]
                out.append((f"{what}: Switchyard txn ≥ 1.0× PgBouncer's connections/s",
                            f"{r:.2f}× ({sy['tps']:,.0f} vs {pb['tps']:,.0f}/s)", met(r >= 1.0)))
                x, y = cpu_per_conn(sy), cpu_per_conn(pb)
                if x is not None and y:
                    out.append((f"{what}: Switchyard txn CPU per new connection ≤ 1.0× PgBouncer's",
                                f"{x / y:.2f}× ({x:,.0f} vs {y:,.0f} µs)", met(x <= y)))
            elif pb is not None:
                out.append((f"{what}: Switchyard txn ≥ 1.0× PgBouncer's connections/s",
                            f"PgBouncer {pb.get('status')}: {short(pb)}; Switchyard {sy['tps']:,.0f}/s", "no ratio"))
            else:
                out.append((f"{what}: Switchyard txn ≥ 1.0× PgBouncer's connections/s",
                            f"Switchyard {sy['tps']:,.0f}/s", nm(f"{pk} did not run")))
            if sy.get("server_sessions") is not None:
                # A pool still growing to the run's peak concurrency opens a few connections
                # during the run; a login that needs its own server login shows as ~1.
                out.append((f"{what}: Switchyard txn, server logins per client login 0 once the pool is warm "
                            "(< 0.01: at most pool growth)",
                            f"{sy['server_logins_per_login']:.4f} ({sy['server_sessions']:,} server sessions for "
                            f"{sy['client_logins']:,} client logins)", met(sy["server_logins_per_login"] < 0.01)))
    return out


def cpu_per_conn(r):
    """Proxy CPU µs per connection of a connect case (None without a proxy process): the
    median over the runs with --repeat, else the run's."""
    if r is None or r.get("cpu_s") is None or not r.get("txns"):
        return None
    if r.get("cpu_us_per_conn_median") is not None:
        return r["cpu_us_per_conn_median"]
    return r["cpu_s"] / r["txns"] * 1e6


def short(r):
    if r is None:
        return ""
    if r.get("reason"):
        return r["reason"]
    errs = r.get("errors") or []
    return re.sub(r"\s+", " ", (errs[0] if errs else f"rc={r.get('rc')}").replace("pgbench: error: ", ""))[:200]


# ---- chart ---------------------------------------------------------------------------

def chart(res, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    cases = [r for r in res.get("cases", []) if r["workload"] in ("select", "tpcb")]
    if not cases:
        return "no select-only or TPC-B cases: no chart"
    workloads = [w for w in ("select", "tpcb") if any(r["workload"] == w for r in cases)]
    protos = [p for p in ("simple", "extended", "prepared") if any(r["protocol"] == p for r in cases)]
    clients = sorted({r["clients"] for r in cases})
    idx = index(cases)
    fig, axes = plt.subplots(len(workloads), len(protos), figsize=(5 * len(protos), 4 * len(workloads)),
                             squeeze=False)
    styles = {"direct": ("k", "o"), "pgbouncer": ("tab:orange", "s"), "haproxy": ("tab:gray", "^"),
              "sy-session": ("tab:green", "D"), "sy-txn": ("tab:blue", "o"), "sy-split": ("tab:purple", "v")}
    for i, w in enumerate(workloads):
        for j, p in enumerate(protos):
            ax = axes[i][j]
            for key in ORDER:
                xs, ys = [], []
                for c in clients:
                    r = idx.get((w, p, c, key))
                    if cell_ok(r):
                        xs.append(c)
                        ys.append(r["tps"])
                if xs:
                    col, mk = styles[key]
                    ax.plot(xs, ys, marker=mk, color=col, label=LABEL[key])
            ax.set_xscale("log")
            ax.set_xticks(clients)
            ax.set_xticklabels([str(c) for c in clients])
            ax.set_title(f"{WORKLOADS[w]['label']}, -M {p}")
            ax.set_xlabel("clients")
            ax.set_ylabel("tps")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for row in axes:
        for ax in row:
            h, l = ax.get_legend_handles_labels()
            if len(h) > len(handles):
                handles, labels = h, l
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False)
    m = res.get("machine", {})
    fig.suptitle(f"pgbench tps against clients — {m.get('cores')} cores, {res.get('started')}\n"
                 "a missing point: the system could not run that case (see the tables)")
    fig.tight_layout(rect=(0, 0.03 + 0.03 * ((len(labels) + 2) // 3), 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# ---- markdown ------------------------------------------------------------------------

def write(res, out_dir, name):
    md_path = os.path.join(out_dir, name + ".md")
    png_name = name + "-tps.png"
    with open(os.path.join(out_dir, name + ".json"), "w") as fjs:
        json.dump(res, fjs, indent=1, default=str)
    chart_err = chart(res, os.path.join(out_dir, png_name))
    L = []
    a = res.get("args", {})
    m = res.get("machine", {})
    v = res.get("versions", {})
    L.append(f"# Switchyard benchmark — {res.get('started')}\n")
    if res.get("failed"):
        L.append(f"> **The run did not finish: {res['failed']}.** Figures below are what was measured before that.\n")
    L.append(f"Command: `{res.get('argv')}` — wall time of the whole run: **{res.get('wall_s', 0) / 60:.1f} min**. "
             f"Raw figures: [`{name}.json`]({name}.json).\n")
    L.append("Each pgbench case ran once for "
             f"{a.get('duration')} s" + (f" ({a.get('repeat')} runs, median tps shown)" if a.get("repeat", 1) > 1 else "")
             + f" on a {m.get('cores')}-core machine that also runs PostgreSQL, the proxies and pgbench itself: "
             "differences of ±10 % between neighbouring figures are within the noise of a single short run.\n")

    dist = [r for r in res.get("cases", []) if r.get("disturbed")]
    dist_cl = sum(r[k].get("disturbed", 0) for r in res.get("classify", []) for k in ("sy-txn", "sy-split1"))
    L.append(f"Other load: {res.get('reruns', 0)} runs were repeated because processes other than the bench's "
             f"and PostgreSQL's used more than {a.get('foreign_limit')} CPU s during them (waited "
             f"{res.get('quiet_wait_s', 0)} s in all for quiet); {len(dist) + dist_cl} figures are still from "
             "such a disturbed run and are marked ⚠ (other CPU). Load average at the end: "
             f"{' '.join(res.get('loadavg_end', []))}.\n")

    # Targets
    L.append("## Targets (issue 25)\n")
    L.append("Issue 25's targets, each from what this run measured; a target this run did not measure says so, "
             "with the option that measures it. CPU per transaction is the proxy's utime + stime "
             "(`/proc/<pid>/stat`) over the case divided by its transactions (the clients' connection set-up "
             "included). The failover rows after them are the earlier targets of issue 4.\n")
    L.append("| target | figure | verdict |\n|---|---|---|")
    for t, fig, verdict in targets(res):
        L.append(f"| {t} | {fig} | {verdict} |")
    L.append("")

    # Machine & versions
    L.append("## Machine and versions\n")
    L.append(f"- Machine: {m.get('cores')} cores ({m.get('cpu_model')}), {m.get('mem_gib')} GiB memory, "
             f"Linux {m.get('kernel')}, {m.get('os')}")
    L.append(f"- PostgreSQL: {v.get('postgresql')}; pgbench: {v.get('pgbench')}")
    L.append(f"- PgBouncer: {v.get('pgbouncer')}; HAProxy: {v.get('haproxy')}")
    dirty = " **plus uncommitted changes in the work tree** (" + ", ".join(v.get("switchyard_dirty_files", [])) + ")" \
        if v.get("switchyard_tree_dirty") else ""
    L.append(f"- Switchyard: {v.get('switchyard')}; work tree at git commit `{str(v.get('switchyard_commit'))[:12]}` "
             f"({v.get('switchyard_commit_subject')}, committed {v.get('switchyard_commit_time')}){dirty}; "
             f"release binary `{os.path.relpath(a['binary'], REPO) if a.get('binary', '').startswith(REPO + os.sep) else a.get('binary', 'target/release/switchyard')}` "
             f"built {v.get('switchyard_binary_mtime')}, "
             f"sha256 {v.get('switchyard_binary_sha256_16')}…")
    if v.get("switchyard_binary_older_than_head"):
        L.append(f"  - **The binary is older than that commit**: it was built from the work tree as it was at "
                 f"{v.get('switchyard_binary_mtime')} (newest commit then: `{v.get('switchyard_newest_commit_before_binary')}`), "
                 "so it may contain changes that were not committed yet and lack later ones.")
    L.append(f"  - `SWITCHYARD_THREADS`: {v.get('switchyard_threads')}")
    L.append(f"- Python {v.get('python')}, matplotlib {v.get('matplotlib')}")
    L.append("")

    # Setup
    L.append("## Setup\n")
    L.append(f"- One primary and one streaming standby (`initdb`, `pg_basebackup -R`), on 127.0.0.1, "
             f"`max_connections = {a.get('max_connections')}`, `shared_buffers = 256MB`, `fsync = off` "
             f"(throwaway cluster: the proxies, not the disk, are measured). pgbench scale {a.get('scale')} "
             f"(`pgbench -i -s {a.get('scale')}`).")
    L.append("- Authentication: the bench user logs in with **SCRAM-SHA-256** everywhere (client → proxy and "
             "proxy → server); PgBouncer holds the server's SCRAM secret in its userlist. The idle-memory user "
             "uses `trust` to the proxy.")
    L.append(f"- Pool size {a.get('pool_size')} server connections for Switchyard (per node) and PgBouncer "
             f"(`default_pool_size`). Health checks: interval {a.get('health_interval_ms')} ms, timeout "
             f"{a.get('health_timeout_ms')} ms, rise {a.get('health_rise')}, fall {a.get('health_fall')}.")
    L.append(f"- pgbench: `-n -T {a.get('duration')} -j min({a.get('jobs')}, clients) -l` (per-transaction log); "
             "with 100 clients or more `-T` is lengthened by clients × 5 ms + 1 s, because pgbench's clock starts "
             "before its (SCRAM) connections are made — about 3.8 s for 1000 clients here; "
             "TPC-B and mix runs get `VACUUM pgbench_branches, pgbench_tellers; TRUNCATE pgbench_history` over the "
             "primary's socket before each run (what pgbench does without `-n`). tps is pgbench's figure "
             "without initial connection time; avg/p50/p99 are computed from every transaction in the "
             "per-transaction logs. The order of systems rotates from case to case.")
    if any(r["workload"] == "connect" for r in res.get("cases", [])):
        procs = a.get("connect_procs") or 0
        L.append(f"- Connect workload: `pgbench -C -S` (a new connection, SCRAM-SHA-256 login, one select-only "
                 "transaction and a disconnect per transaction), "
                 + ("one pgbench process per client (`-c 1 -j 1` each, all at once)" if not procs else
                    f"{procs} pgbench process(es) sharing the clients, `-j` = their clients")
                 + f", after a {a.get('connect_warmup')} s warm-up run of the same, not measured. "
                 "See *Connection rate* below.")
    L.append("- Switchyard CPU s: utime+stime delta of the process (`/proc/<pid>/stat`) over the case, which "
             "includes client connection set-up; CPU µs/txn: that divided by the transactions pgbench processed, and in brackets its user-space + kernel parts; peak RSS: `VmHWM` (reset through `clear_refs` before the case) "
             "and `VmRSS` sampled every 50 ms, whichever is larger. The same is shown for PgBouncer and HAProxy. "
             "Each proxy runs for the whole matrix (it is not restarted between cases), so its RSS includes "
             "memory kept from earlier, larger cases (the 1000-client ones).")
    L.append("")
    L.append("| system | what |\n|---|---|")
    for key, s in res.get("systems", {}).items():
        L.append(f"| {LABEL.get(key, key)} (`{key}`) | {s.get('description')} |")
    L.append("")

    cases = res.get("cases", [])
    idx = index(cases)
    if any(r["workload"] in ("select", "tpcb") for r in cases):
        L.append("## Throughput and latency\n")
        if chart_err:
            L.append(f"(No chart: {chart_err}.)\n")
        else:
            L.append(f"![tps against clients]({png_name})\n")
        workloads = [w for w in ("select", "tpcb") if any(r["workload"] == w for r in cases)]
        protos = [p for p in ("simple", "extended", "prepared") if any(r["protocol"] == p for r in cases)]
        for w in workloads:
            for p in protos:
                L.append(f"### {WORKLOADS[w]['label']}, `-M {p}`\n")
                L.append("| clients | system | tps | avg ms | p50 ms | p99 ms | proxy CPU s | proxy CPU µs/txn | proxy peak RSS MiB | case | notes |")
                L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
                for c in sorted({r["clients"] for r in cases if r["workload"] == w and r["protocol"] == p}):
                    for key in ORDER:
                        r = idx.get((w, p, c, key))
                        if r is None:
                            continue
                        if r.get("status") == "n/a" and r.get("tps") is None:
                            L.append(f"| {c} | {LABEL[key]} | n/a | | | | | | | {r.get('case', '')} | {esc(r.get('reason'))} |")
                            continue
                        rss = r.get("peak_rss_kib")
                        notes = []
                        if r.get("status") == "n/a":
                            notes.append("n/a: " + esc(r.get("reason")))
                        elif r.get("status") == "error":
                            if r.get("aborted_clients"):
                                notes.append(f"{r['aborted_clients']} clients aborted")
                            if r.get("failed_txns"):
                                notes.append(f"{r['failed_txns']} failed transactions")
                            if r.get("rc") not in (0, None):
                                notes.append(f"pgbench exit {r.get('rc')}")
                            if r.get("errors"):
                                notes.append("`" + esc(r["errors"][0][:180]) + "`")
                        if r.get("disturbed"):
                            notes.append(f"⚠ other CPU: {r.get('foreign_cpu_s')} s by {esc(r.get('foreign_by'))}")
                        if r.get("measured_s") is not None and r["measured_s"] < 0.75 * a.get("duration", 0):
                            notes.append(f"only {r['measured_s']} s measured after connecting")
                        if r.get("log_problems"):
                            notes.append(f"{r['log_problems']} warnings in the proxy log: "
                                         + "; ".join(f"{esc(k[:200])} ×{n}" for k, n in list(r.get("log_messages", {}).items())[:2]))
                        tps = f(r.get("tps"), 0) if r.get("status") == "ok" else (f(r.get("tps"), 0) + " ⚠" if r.get("tps") is not None else "–")
                        L.append(f"| {c} | {LABEL[key]} | {tps} | {f(r.get('avg_ms'), 2)} | {f(r.get('p50_ms'), 2)} | "
                                 f"{f(r.get('p99_ms'), 2)} | {f(r.get('cpu_s'), 2)} | {us_per_txn(r)} | "
                                 f"{f(rss / 1024, 1) if rss else '–'} | {r.get('case', '')} | {'; '.join(notes)} |")
                L.append("")

        if res.get("trace_metrics"):
            L.append("### Trace export\n")
            L.append("The exporter's counters on the traced systems after the matrix (a receiver down or hung "
                     "must cost dropped spans, counted, not throughput):\n")
            L.append("| system | counters |")
            L.append("|---|---|")
            for key, lines in res["trace_metrics"].items():
                L.append(f"| {LABEL.get(key, key)} | {esc('; '.join(lines))} |")
            L.append("")

        # Ratios
        L.append("## Ratios (tps)\n")
        L.append("Switchyard's tps divided by the direct connection's and by PgBouncer's in the same case; "
                 "`n/a` where the other side could not run the case.\n")
        L.append("| workload | protocol | clients | " + " | ".join(
            f"{LABEL[s]} / direct | {LABEL[s]} / PgBouncer" for s in SY) + " |")
        L.append("|---|---|---:|" + "---:|---:|" * len(SY))
        for w in workloads:
            for p in protos:
                for c in sorted({r["clients"] for r in cases if r["workload"] == w and r["protocol"] == p}):
                    cells = []
                    for s in SY:
                        r = idx.get((w, p, c, s))
                        for other in ("direct", "pgbouncer"):
                            o = idx.get((w, p, c, other))
                            if r is None or o is None:
                                cells.append("")
                            elif cell_ok(r) and cell_ok(o):
                                cells.append(f"{r['tps'] / o['tps']:.2f}×")
                            elif not cell_ok(r):
                                cells.append(f"{r.get('status')}")
                            else:
                                cells.append(f"n/a ({other} {o.get('status')})")
                    L.append(f"| {WORKLOADS[w]['label']} | {p} | {c} | " + " | ".join(cells) + " |")
        L.append("")

    if any(r["workload"] == "connect" for r in cases):
        L.extend(connect_section(res, cases, idx))

    L.extend(pin_section(res))

    # Read-your-writes
    fr = res.get("freshness", [])
    if fr:
        L.append("## Cost of read-your-writes (read_write_split, primary + one standby)\n")
        L.append("The same pgbench run (-M simple) through two Switchyard processes in transaction mode with "
                 "`read_write_split = true`, one with `read_your_writes = \"session\"` (the default) and one with "
                 f"`\"off\"`, alternating, {a.get('freshness_repeat', a.get('classify_repeat'))} runs each; median tps. Each `causal_wait_ms` "
                 "(`--freshness-wait-ms`) is its own \"session\" process against the same \"off\" one. Targets "
                 "(issue 25, the mix at 16 clients): at most 5 % slower with `causal_wait_ms = 0`, 10 % with 100.\n")
        L.append("| workload | clients | causal_wait_ms | off tps (runs) | on tps (runs) | slowdown | off p50/p99 ms | on p50/p99 ms |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        base_wait = configured_wait(a.get("split_extra"))
        for r in fr:
            off, on = r["sy-split-ryw-off"], r["sy-split"]
            warn = " ⚠" if off.get("disturbed") or on.get("disturbed") else ""
            L.append(f"| {WORKLOADS[r['workload']]['label']} | {r['clients']}{warn} | {r.get('causal_wait_ms', base_wait)} | "
                     f"{f(off['tps_median'], 0)} ({', '.join(f(x, 0) for x in off['tps_all'])}) | "
                     f"{f(on['tps_median'], 0)} ({', '.join(f(x, 0) for x in on['tps_all'])}) | {f(r['slowdown_pct'])} % | "
                     f"{f(off['p50_ms'], 2)} / {f(off['p99_ms'], 2)} | {f(on['p50_ms'], 2)} / {f(on['p99_ms'], 2)} |")
        L.append("")

    # Classification
    cl = res.get("classify", [])
    if cl:
        L.append("## Classification cost (read_write_split on one node)\n")
        L.append("The same select-only run through two Switchyard processes in transaction mode with one node "
                 "(the primary), `read_write_split = false` and `= true`, alternating, "
                 f"{a.get('classify_repeat')} runs each; median tps. With one node every read still goes to the "
                 "primary, so the difference is the cost of classifying each statement. Target: at most 5 % slower.\n")
        L.append("| protocol | clients | split off tps (runs) | split on tps (runs) | slowdown | off p50/p99 ms | on p50/p99 ms | off CPU s | on CPU s |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in cl:
            off, on = r["sy-txn"], r["sy-split1"]
            warn = " ⚠" if off.get("disturbed") or on.get("disturbed") else ""
            L.append(f"| {r['protocol']} | {r['clients']}{warn} | {f(off['tps_median'], 0)} ({', '.join(f(x, 0) for x in off['tps_all'])}) | "
                     f"{f(on['tps_median'], 0)} ({', '.join(f(x, 0) for x in on['tps_all'])}) | {f(r['slowdown_pct'])} % | "
                     f"{f(off['p50_ms'], 2)} / {f(off['p99_ms'], 2)} | {f(on['p50_ms'], 2)} / {f(on['p99_ms'], 2)} | "
                     f"{f(off['cpu_s'], 2)} | {f(on['cpu_s'], 2)} |")
        if any(r["sy-txn"].get("disturbed") or r["sy-split1"].get("disturbed") for r in cl):
            L.append("\n⚠: at least one of the runs behind this row was disturbed by other processes' CPU use.")
        errs = [(r["protocol"], r["clients"]) for r in cl if r["sy-txn"]["errors"] or r["sy-split1"]["errors"]]
        if errs:
            L.append(f"\nRuns with pgbench errors: {errs}.")
        L.append("")

    # Idle
    idl = res.get("idle", [])
    if idl:
        L.append("## Memory per idle client\n")
        L.append("Client connections opened with a minimal asyncio client (startup + `trust` authentication of a "
                 "dedicated user, transaction mode), then left idle; the process's VmRSS before and 3 s after "
                 "they are all open, divided by the number connected. Kernel socket buffers are not in RSS. "
                 "Afterwards 100 of them, at random, each run `SELECT 1` to show they are alive; then every "
                 "client runs `SELECT 1` and is left idle again (*after a query*: RSS 3 s later, less RSS before, "
                 "per client: what a client that has worked costs at rest). Then all are "
                 "closed and a second round of as many clients is opened and closed on the same process "
                 "(RSS in round 2 that grows by as much again would mean closed clients' memory is never reused).\n")
        L.append("| system | clients asked | connected | open time s | RSS before MiB | RSS idle MiB | per client KiB | after a query, per client KiB | RSS after close MiB | round 2: RSS idle / after close MiB | sample queries ok | errors |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in idl:
            if r.get("error"):
                L.append(f"| {LABEL.get(r['system'], r['system'])} | | | | | | | | | | {esc(r['error'])} |")
                continue
            errs = "; ".join(f"{esc(k)} ×{n}" for k, n in list(r.get("connect_errors", {}).items())[:3])
            qe = "; ".join(f"{esc(k)} ×{n}" for k, n in list(r.get("sample_errors", {}).items())[:2])
            L.append(f"| {LABEL.get(r['system'], r['system'])} | {r['clients']:,} | {r['connected']:,} | {r['open_s']} | "
                     f"{r['rss_before_kib'] / 1024:.1f} | {r['rss_idle_kib'] / 1024:.1f} | {f(r.get('per_client_kib'), 2)} | "
                     f"{f(r.get('per_client_after_query_kib'), 2)} | {r['rss_after_close_kib'] / 1024:.1f} | {mib(r.get('round2_rss_idle_kib'))} / "
                     f"{mib(r.get('round2_rss_after_close_kib'))} | {r['sample_ok']}/{r['sample_queries']} | {errs} {qe} |")
        L.append("")

    fo = res.get("failover", {})
    if fo:
        h = fo.get("health", {})
        L.append("## Failover\n")
        L.append(f"Two Switchyard processes (transaction mode and session mode) in front of the same primary + "
                 f"standby, health interval {h.get('interval_ms')} ms, timeout {h.get('timeout_ms')} ms, rise "
                 f"{h.get('rise')}, fall {h.get('fall')}. Four client loops per endpoint, each with its own "
                 "connection, a request every ~10 ms, reconnecting after an error (as an application would); "
                 "every failed request or failed connect counts as one client error. Time 0 is the `kill -9` "
                 "(of the postmaster and all its processes). *Back* is the completion of the first successful "
                 "request started after the last error (so from then on every request succeeded); *first "
                 "success* is the first successful request started after time 0.\n")
        for kind, title, what in (("standby", "Standby `kill -9`, reads on the ro endpoint", "SELECT inet_server_port(), pg_is_in_recovery()"),
                                  ("primary", "Primary `kill -9` + `pg_ctl promote` of the standby, writes on the rw endpoint",
                                   "INSERT INTO failover_probe ... RETURNING inet_server_port()")):
            d = fo.get(kind)
            if not d:
                continue
            L.append(f"### {title}\n")
            L.append(f"Request: `{what}`." + (f" `pg_ctl promote` returned {d['marks'].get('promote_done_s')} s after "
                                                f"the kill." if kind == "primary" and d.get("marks") else "") + "\n")
            L.append("| system | back (s) | first success (s) | client errors | last error (s) | longest gap without a success (s) | served by (port: requests) before → after | error messages |")
            L.append("|---|---:|---:|---:|---:|---:|---|---|")
            for key in ("fo-txn", "fo-session"):
                r = d.get(key)
                if not r:
                    continue
                msgs = "; ".join(f"{esc(k[:150])} ×{n}" for k, n in list(r["error_messages"].items())[:4])
                L.append(f"| {LABEL[key]} | {f(r['back_s'], 3)} | {f(r['first_success_s'], 3)} | {r['errors']} | "
                         f"{f(r['last_error_s'], 3)} | {f(r['longest_gap_s'], 3)} | {r['served_by_port_before']} → "
                         f"{r['served_by_port_after']} | {msgs} |")
            ports = d.get("fo-txn") or d.get("fo-session") or {}
            if kind == "standby":
                L.append(f"\nStandby port {ports.get('standby_port')}, primary port {ports.get('primary_port')}.")
            else:
                L.append(f"\nOld primary port {ports.get('old_primary_port')}, new primary (promoted standby) port "
                         f"{ports.get('new_primary_port')}.")
            logs = {k: d[k].get("log_messages") for k in ("fo-txn", "fo-session") if d.get(k, {}).get("log_messages")}
            if logs:
                L.append("\nWarnings in the Switchyard logs during the event:\n")
                for k, msgs in logs.items():
                    for msg, n in msgs.items():
                        L.append(f"- {LABEL[k]}: `{esc(msg[:200])}` ×{n}")
            L.append("")

    # Things that looked wrong
    problems = []
    for r in cases:
        if r["system"].startswith("sy-") and (r.get("status") == "error" or r.get("log_problems")):
            problems.append(f"- case {r.get('case')} ({r['workload']} -M {r['protocol']} c={r['clients']}, {LABEL.get(r['system'], r['system'])}): "
                            f"status {r.get('status')}; " + "; ".join(esc(e[:200]) for e in (r.get("errors") or [])[:2])
                            + ("; proxy log: " + "; ".join(f"`{esc(k[:160])}` ×{n}" for k, n in r.get("log_messages", {}).items())
                               if r.get("log_messages") else ""))
    if problems:
        L.append("## Errors and warnings seen with Switchyard\n")
        L.extend(problems)
        L.append("")

    # Commands
    if cases or cl:
        L.append("## Command line of each case\n")
        L.append("Host 127.0.0.1; the port is the system's endpoint in this run; `--log-prefix` points into the "
                 "run's temp dir. Password via `PGPASSWORD`.\n")
        L.append("<details><summary>all cases</summary>\n")
        L.append("| case | system | command |\n|---:|---|---|")
        for r in sorted(cases, key=lambda r: r.get("case") or 0):
            if r.get("command"):
                L.append(f"| {r.get('case')} | {LABEL.get(r['system'], r['system'])} | `{r['command']}` |")
        for r in cl:
            for key in ("sy-txn", "sy-split1"):
                for case, cmd in zip(r[key]["cases"], r[key]["commands"]):
                    L.append(f"| {case} | {LABEL[key]} | `{cmd}` |")
        L.append("\n</details>\n")

    # Configs
    L.append("## Configurations\n<details><summary>config files</summary>\n")
    for key, s in res.get("systems", {}).items():
        if s.get("config"):
            L.append(f"`{key}`:\n\n```\n{s['config'].strip()}\n```\n")
    for key, text in fo.get("configs", {}).items():
        L.append(f"`{key}` (failover):\n\n```\n{text.strip()}\n```\n")
    for key, text in (res.get("pin") or {}).get("configs", {}).items():
        L.append(f"`{key}` (`--pin`):\n\n```\n{text.strip()}\n```\n")
    L.append("</details>\n")

    with open(md_path, "w") as fo_:
        fo_.write("\n".join(L))
    return md_path


def connect_section(res, cases, idx):
    """The connect workload (pgbench -C -S): connections/s, the whole connect cycle's
    latency, proxy CPU per new connection and server logins per client login."""
    a = res.get("args", {})
    L = ["## Connection rate (`pgbench -C -S`)\n",
         "Each pgbench transaction opens a new connection, logs in with SCRAM-SHA-256, runs the select-only "
         "transaction and disconnects (what Django with `CONN_MAX_AGE = 0` does per request), so pgbench's tps "
         "(\"including reconnection times\", summed over the pgbench processes) is **connections/s**. "
         + ("Each client is its own pgbench process (`-c 1 -j 1`, all started at once): pgbench connects "
            "synchronously, so clients sharing a thread would never log in at the same time, and threads of one "
            "pgbench slow each other's SCRAM proofs down (PBKDF2 through OpenSSL; measured: 4.3–6.8 ms of CPU "
            "per login with 16 threads against 2.9–3.7 ms with 16 processes, swinging from run to run), which "
            "would make the figure the client's. "
            if not a.get("connect_procs") else f"{a.get('connect_procs')} pgbench process(es), `-j` = their clients. ")
         + f"A {a.get('connect_warmup')} s run of the same, not measured, warms the pools first. With `--repeat` "
         "the systems take turns round by round (the order rotated each round) and the median-rate run is shown.\n",
         "- *cycle p50/p99*: the time between two consecutive transaction ends of one client in pgbench's "
         "per-transaction log: disconnect + connect + login + transaction (the first of each client left out); "
         "*avg connect*: pgbench's average connection time; *query p50/p99*: the transaction's own latency after "
         "its login.",
         "- *CPU µs/conn*: the proxy process's utime+stime (`/proc/<pid>/stat`) over the run divided by the "
         "connections (transactions), in brackets user + kernel (with `--repeat`: the median over the runs, "
         "each run's in the notes); *× PgBouncer*: that against PgBouncer's; "
         "*pgbench CPU µs/conn*: pgbench's own CPU (its SCRAM client proof is a PBKDF2 of 4096 rounds per login) "
         "per connection; *busy*: the share of all cores in use during the run (the rest of the CPU is "
         "PostgreSQL's).",
         "- *server logins per client login*: the growth of `pg_stat_database.sessions` of the bench database "
         "on the primary over the run (every backend started for it, by anyone: health checks and the harness "
         "use the `postgres` database) divided by the client logins (transactions + each pgbench process's first "
         "connection, which reads the scale). A direct connection shows what 1 looks like. *warm-up*: the same for the "
         "warm-up run (on a fresh proxy, the cold pool)." + ("\n" if not any(r["system"] in TLS_KEYS for r in cases) else ""),
         "- *TLS* rows (`--connect-tls`): separate PgBouncer and Switchyard processes with a self-signed "
         f"{str(a.get('connect_tls_key', 'ec')).upper()} certificate (PgBouncer `client_tls_sslmode = allow`, "
         "Switchyard `[tls]` with `client_tls = \"allow\"`), pgbench with `PGSSLMODE=require`: a TLS handshake per "
         "connection; their × PgBouncer is against PgBouncer over TLS. libpq's default `channel_binding = prefer` "
         "takes SCRAM-SHA-256-PLUS where the proxy offers it.\n"]
    if not any(r["system"] in TLS_KEYS for r in cases):
        L.pop()
    for p in [x for x in ("simple", "extended", "prepared") if any(r["workload"] == "connect" and r["protocol"] == x for r in cases)]:
        L.append(f"### `-M {p}`\n")
        L.append("| clients | system | connections/s | × PgBouncer | cycle p50 / p99 ms | avg connect ms | query p50 / p99 ms "
                 "| proxy CPU µs/conn | × PgBouncer | server logins per client login | server sessions / client logins "
                 "| warm-up: server logins per login | pgbench CPU µs/conn | busy | case | notes |")
        L.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for c in sorted({r["clients"] for r in cases if r["workload"] == "connect" and r["protocol"] == p}):
            pb = idx.get(("connect", p, c, "pgbouncer"))
            for key in ORDER + ["sy-split1", "sy-split-ryw-off"] + TLS_KEYS:
                r = idx.get(("connect", p, c, key))
                if r is None:
                    continue
                notes = []
                if r.get("status") != "ok":
                    if r.get("aborted_clients"):
                        notes.append(f"{r['aborted_clients']} clients aborted")
                    if r.get("failed_txns"):
                        notes.append(f"{r['failed_txns']} failed transactions")
                    if r.get("rc") not in (0, None):
                        notes.append(f"pgbench exit {r.get('rc')}")
                    if r.get("errors") or r.get("reason"):
                        notes.append("`" + esc((r.get("reason") or r["errors"][0])[:180]) + "`")
                if r.get("disturbed"):
                    notes.append(f"⚠ other CPU: {r.get('foreign_cpu_s')} s by {esc(r.get('foreign_by'))}")
                if r.get("log_problems"):
                    notes.append(f"{r['log_problems']} warnings in the proxy log: "
                                 + "; ".join(f"{esc(k[:200])} ×{n}" for k, n in list(r.get("log_messages", {}).items())[:2]))
                if r.get("repeats"):
                    notes.append("runs (conn/s, proxy / pgbench CPU µs/conn): " + ", ".join(
                        f"{f(x['tps'], 0)} ({f(x['cpu_us_per_conn'], 0)} / {f(x['client_cpu_us_per_conn'], 0)})"
                        for x in r["repeats"]))
                elif r.get("repeats_tps"):
                    notes.append("runs: " + ", ".join(f(x, 0) for x in r["repeats_tps"] if x is not None))
                tps = f(r.get("tps"), 0) if r.get("status") == "ok" else (f(r.get("tps"), 0) + " ⚠" if r.get("tps") is not None else "–")
                # TLS systems against PgBouncer over TLS.
                ref = idx.get(("connect", p, c, "pgbouncer-tls")) if key in TLS_KEYS else pb
                ratio = f"{r['tps'] / ref['tps']:.2f}×" if cell_ok(r) and cell_ok(ref) and key not in ("pgbouncer", "pgbouncer-tls") else ""
                cpu, cpu_pb = cpu_per_conn(r), cpu_per_conn(ref)
                if cpu is None:
                    cpu_s = "–"
                elif r.get("cpu_us_per_conn_median") is not None:
                    cpu_s = f"{cpu:,.0f} ({f(r.get('user_us_median'), 0)} + {f(r.get('sys_us_median'), 0)})"
                else:
                    cpu_s = f"{cpu:,.0f} ({r['user_s'] / r['txns'] * 1e6:,.0f} + {r['sys_s'] / r['txns'] * 1e6:,.0f})"
                cpu_ratio = f"{cpu / cpu_pb:.2f}×" if cpu is not None and cpu_pb and key not in ("pgbouncer", "pgbouncer-tls") else ""
                w = r.get("warmup") or {}
                logins = w.get("client_logins") or ((w.get("txns") or 0) + (a.get("connect_procs") or c))
                wl = f"{w['server_sessions'] / logins:.3f}" if w.get("server_sessions") is not None else "–"
                L.append(f"| {c} | {LABEL.get(key, key)} | {tps} | {ratio} | {f(r.get('cycle_p50_ms'), 2)} / "
                         f"{f(r.get('cycle_p99_ms'), 2)} | {f(r.get('conn_avg_ms'), 2)} | {f(r.get('p50_ms'), 2)} / "
                         f"{f(r.get('p99_ms'), 2)} | {cpu_s} | {cpu_ratio} | {f(r.get('server_logins_per_login'), 3)} | "
                         f"{f(r.get('server_sessions'))} / {f(r.get('client_logins'))} | {wl} | "
                         f"{f(r['client_cpu_s'] / r['txns'] * 1e6, 0) if r.get('client_cpu_s') is not None and r.get('txns') else '–'} | "
                         f"{f(r.get('machine_busy_pct'), 0)} % | {r.get('case', '')} | "
                         f"{'; '.join(notes)} |")
        L.append("")
    return L


def pin_section(res):
    """--pin: tps per proxy core with the proxy and PostgreSQL + pgbench on separate CPU sets."""
    pin = res.get("pin")
    if not pin:
        return []
    L = ["## Scaling on separate CPU sets (`--pin`)\n"]
    if pin.get("error"):
        return L + [f"Not run: {esc(pin['error'])}.\n"]
    w = WORKLOADS[pin["workload"]]["label"]
    L.append(f"PostgreSQL (every process of both nodes, `sched_setaffinity`; backends forked later inherit it) and "
             f"pgbench (`taskset -c {','.join(map(str, pin['rest_cpus']))}`, `-j {pin['jobs']}`) on CPUs "
             f"{','.join(map(str, pin['rest_cpus']))}; the proxy on CPUs {','.join(map(str, pin['proxy_cpus']))} "
             f"({esc(pin.get('note'))}). {w}, `-M {pin['protocol']}`, {pin['clients']} clients, pool size "
             f"{pin['pool_size']} for both proxies. Switchyard in transaction mode is started afresh per worker "
             "count with `SWITCHYARD_THREADS = t` under `taskset -c` the first t CPUs of the proxy set; PgBouncer "
             "(one thread) on the first of them, before and after the Switchyard runs. *tps per core*: tps / the "
             "CPUs the proxy may use; *× PgBouncer per core*: that against the mean of PgBouncer's runs; *proxy busy*: "
             "its CPU time / the run's wall time / those CPUs (near 100 %: the proxy's cores were the limit; well "
             "below: PostgreSQL and pgbench on their set were).\n")
    L.append("| proxy | threads | CPUs | tps | tps per core | × PgBouncer per core | proxy busy | p50 / p99 ms "
             "| CPU µs/txn | OS threads | case | notes |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    pbs = [x["tps_per_core"] for x in pin.get("pgbouncer", []) if x.get("tps_per_core")]
    pb_ref = sum(pbs) / len(pbs) if pbs else None

    def row(name, x, threads):
        notes = []
        if x.get("status") != "ok":
            notes.append(esc(short(x)[:150]))
        if x.get("disturbed"):
            notes.append(f"⚠ other CPU {x.get('foreign_cpu_s')} s")
        if len(x.get("tps_runs") or []) > 1:
            notes.append("runs: " + ", ".join(f(t, 0) for t in x["tps_runs"]))
        if x.get("cpus_allowed") and x["cpus_allowed"] != x.get("proxy_cpus"):
            notes.append(f"Cpus_allowed_list {x['cpus_allowed']}")
        rel = f"{x['tps_per_core'] / pb_ref:.2f}×" if pb_ref and x.get("tps_per_core") and name != "PgBouncer" else ""
        cpu = f"{x['cpu_s'] / x['txns'] * 1e6:,.1f}" if x.get("cpu_s") is not None and x.get("txns") else "–"
        return (f"| {name} | {threads} | {x.get('proxy_cpus')} | {f(x.get('tps'), 0)} | {f(x.get('tps_per_core'), 0)} | "
                f"{rel} | {f(x.get('proxy_busy_pct'), 0)} % | {f(x.get('p50_ms'), 3)} / {f(x.get('p99_ms'), 3)} | {cpu} | "
                f"{x.get('os_threads') or '–'} | {x.get('case', '')} | {'; '.join(notes)} |")

    for x in pin.get("pgbouncer", [])[:1]:
        L.append(row("PgBouncer", x, "1 (before)"))
    for x in pin.get("sy", []):
        L.append(row("Switchyard txn", x, x["threads"]))
    for x in pin.get("pgbouncer", [])[1:]:
        L.append(row("PgBouncer", x, "1 (after)"))
    if pin.get("dropped_threads"):
        L.append(f"\n`--pin-threads` {pin['dropped_threads']} left out: more than the proxy set's CPUs.")
    L.append("")
    cmds = [x.get("command") for x in pin.get("sy", [])[:1] + pin.get("pgbouncer", [])[:1] if x.get("command")]
    if cmds:
        L.append("pgbench: `" + cmds[0] + "`\n")
    return L


def us_per_txn(r):
    """Proxy CPU per transaction (includes the case's connection set-up)."""
    if r.get("cpu_s") is None or not r.get("txns"):
        return "–"
    total = f"{r['cpu_s'] / r['txns'] * 1e6:,.1f}"
    if r.get("user_s") is None:
        return total
    return f"{total} ({r['user_s'] / r['txns'] * 1e6:,.1f} + {r['sys_s'] / r['txns'] * 1e6:,.1f})"


def mib(kib):
    return "–" if kib is None else f"{kib / 1024:.1f}"


def esc(s):
    return str(s or "").replace("|", "\\|").replace("\n", " ")


def write_latest(res, out_dir, name):
    L = [f"# Latest benchmark results\n",
         f"[`{name}.md`]({name}.md) — run {res.get('started')}, {res.get('machine', {}).get('cores')} cores, "
         f"wall time {res.get('wall_s', 0) / 60:.1f} min; chart: [`{name}-tps.png`]({name}-tps.png).\n",
         "| target | figure | verdict |", "|---|---|---|"]
    for t, fig, verdict in targets(res):
        L.append(f"| {t} | {fig} | {verdict} |")
    L.append("")
    with open(os.path.join(out_dir, "LATEST.md"), "w") as fl:
        fl.write("\n".join(L))
