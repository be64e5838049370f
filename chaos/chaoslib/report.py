"""The report: a plain-text table for the terminal (and the test log), the same inside a
Markdown file for chaos/results/. The JSON file holds everything, these the summary."""


def _mib(kib):
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def _table(headers, rows):
    rows = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def render_text(rep):
    chk = rep["check"]
    w = chk["writes"]
    cw, cr = w["chaos_writes"], w["chaos_raw"]
    proxies = chk.get("proxies") or [chk["proxy"]]
    multi = len(proxies) > 1
    out = []
    etcd = rep.get("etcd")
    my = rep.get("engine") == "mariadb"
    out.append(f"== Switchyard chaos run: {'MariaDB, ' if my else ''}seed {rep['seed']}, {rep['duration_s']:.0f}s, "
               f"{('semi-synchronous' if my else 'synchronous') if rep['sync'] else 'asynchronous'} replication, "
               f"{rep.get('failover', 'operator')} failover, "
               + (f"{len(proxies)} Switchyard instances ({len(etcd['members'])} etcd member(s), lease "
                  f"{etcd['lease_s']} s), " if multi and etcd else "")
               + f"network: {rep['network']}"
               f"{'' if rep['netem'] or rep['network'] != 'netns' else ' (no tc netem in this kernel)'}")
    out.append(f"   {rep['when']} on {rep['machine']['host']} ({rep['machine']['cpus']} CPUs, kernel "
               f"{rep['machine']['kernel']}); workdir {rep['workdir']}")
    out.append(f"   faults run: {sum(rep['faults_run'].values())} "
               f"({', '.join(f'{k} x{v}' for k, v in sorted(rep['faults_run'].items()))})")
    if rep.get("faults_skipped"):
        out.append(f"   skipped when due: {', '.join(rep['faults_skipped'])}")
    if rep["faults_not_exercised"]:
        out.append(f"   available, not reached in this run: {', '.join(rep['faults_not_exercised'])}")
    for n in rep["notes"]:
        out.append(f"   note: {n}")
    out.append("")

    lost_w, lost_r = cw["lost"], cr["lost"]
    cats = {}
    for l in (lost_w, lost_r):
        for k, v in l["by_category"].items():
            cats[k] = cats.get(k, 0) + v
    failing_lost = next((v["count"] for v in chk["violations"] if v["check"] == "acknowledged writes lost"), 0)
    order = chk["order"]
    reads = chk["reads"]
    rows = [
        ["writes sent / acknowledged / failed / unknown",
         f"{cw['sent'] + cr['sent']} / {cw['acknowledged'] + cr['acknowledged']} / {cw['failed'] + cr['failed']} / "
         f"{cw['unknown'] + cr['unknown']} (unknown that committed: {cw['unknown_committed'] + cr['unknown_committed']})"],
        ["acknowledged writes lost (failing)", failing_lost],
        ["acknowledged writes lost, by category",
         ", ".join(f"{k} {v}" for k, v in sorted(cats.items())) or "none"],
        ["phantom writes (never sent)", cw["phantoms"] + cr["phantoms"]],
        ["writes reported failed but committed", cw["failed_present"] + cr["failed_present"]],
        ["writes on a node in recovery", _count(chk, "writes taken by a node in recovery")] if not my else
        ["writes on a node not primary (its own state)", w.get("not_primary", 0)],
        ["dual-primary windows (write order)",
         sum(1 for w in order["dual_primary_windows"] if not w.get("across"))],
    ]
    if my:
        rows += [["acknowledged while semi-sync was off on the primary",
                  "-" if w.get("semi_sync_off_acks") is None else w["semi_sync_off_acks"]],
                 ["acknowledged without their GTID (session lost after the COMMIT's OK)",
                  order.get("without_gtid", 0)]]
    co = chk.get("coordination")
    if multi:
        rows += [["dual-primary windows across instances", order.get("across_instance_windows", 0)]]
    if co is not None:
        rows += [["writes off the published primary (epoch seen)", co["off_published"]],
                 ["writes acknowledged while the instance was cut off", co["while_cut_off"]]]
    if not my:
        rows += [["writes to an older timeline than Switchyard had seen", order["older_timeline_writes"]]]
    rows += [
        ["servers both primary (seconds, per the servers)", rep["truth_dual_primary_s"]],
        ["acknowledged by node", ", ".join(f"{k}: {v}" for k, v in sorted(order["acknowledged_by_node"].items()))],
    ]
    if multi:
        rows.append(["acknowledged by instance",
                     ", ".join(f"{k}: {v}" for k, v in sorted(order.get("acknowledged_by_instance", {}).items()))])
    if co is not None:
        for name, ci in sorted(co["instances"].items()):
            rows.append([f"coordination, {name}",
                         f"cut off {ci['cut_off_spans']} time(s), {ci['cut_off_s']} s in all; leaders seen: "
                         f"{' -> '.join(ci['leaders_seen']) or '-'}; last epoch {ci['max_epoch']}"])
        rows.append(["publications (epoch: primary)",
                     ", ".join(f"{ep}: {'/'.join(ns)}" for ep, ns in co["publications"].items()) or "-"])
    for k, r in reads.items():
        if "stale" not in r:
            rows.append([r["what"], f"{r['answered']} of {r['reads']} answered ({r['errors']} errors); served by "
                         + ", ".join(f"{n}: {c}" for n, c in sorted(r["served_by"].items(), key=lambda x: str(x[0])))])
            continue
        rows.append([f"{'misses' if my else 'stale reads'}: {r['what']}",
                     f"{r['stale']} of {r['answered']} answered ({r['errors']} errors; excused, no primary: "
                     f"{r['excused_no_primary']}; missed a lost write: {r['missed_lost_write']})"])
    if my:
        rb = rep.get("rebuilds") or []
        rows.append(["nodes rebuilt by the harness", f"{len(rb)}" + (": " + "; ".join(
            f"{r['node']} from {r['source']} ({r['why'][:60]})" for r in rb[:6]) if rb else "")])
        vd = rep.get("switchyard_verdicts") or []
        if vd:
            counts = {}
            for v in vd:
                counts[v["verdict"][:40]] = counts.get(v["verdict"][:40], 0) + 1
            rows.append(["old primaries back: what became of them",
                         ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))])
    for px in proxies:
        label = f"Switchyard {px['name']}" if multi else "Switchyard"
        incs = px["incarnations"]
        rows += [
            [f"{label} processes (ended by)", ", ".join(f"{i['pid']}: {i['ended_by'] or 'running'}" for i in incs)],
            [f"{label} panics in log", len(px["panics"])],
            [f"{label} FDs idle start -> end (max)",
             f"{(px['idle_start'] or {}).get('fds')} -> {(px['idle_end'] or {}).get('fds')} (max {px.get('max_fds')})"],
            [f"{label} RSS idle start -> end (max)",
             f"{_mib((px['idle_start'] or {}).get('rss_kib'))} -> {_mib((px['idle_end'] or {}).get('rss_kib'))} "
             f"(max {_mib(px.get('max_rss_kib'))})"],
        ]
    out.append(_table(["CHECK", "RESULT"], rows))
    out.append("")

    frows = []
    for i, f in enumerate(chk["faults"], 1):
        wr, rd = f.get("writes", {}), f.get("reads", {})
        det = f.get("detail") or {}
        extra = []
        for k in ("promoted", "promoted_by", "failover_s", "rejoin", "drop_probability", "restarted"):
            if k in det:
                extra.append(f"{k}={det[k]}")
        if det.get("primaries_after") and f["kind"] != "kill_primary_failover":
            extra.append("primary after: " + ",".join(sorted(det["primaries_after"])))
        if multi:
            if det.get("instance"):
                extra.append(f"via {det['instance']}")
            if det.get("instance_role"):
                extra.append(f"({det['instance_role']})")
            for p in proxies:
                d = det.get(p["name"])
                if isinstance(d, dict):
                    extra.append(f"{p['name']} cut off after {d.get('cut_off_after_s', '-')}s, "
                                 f"back {d.get('back_after_heal_s', '-')}s after heal")
            by = f.get("writes_by_instance") or {}
            if by:
                extra.append("w_stall " + "/".join(f"{k} {v['stall_s']}" for k, v in sorted(by.items())))
        if f.get("error"):
            extra.append("FAULT ERROR: " + f["error"][:80])
        frows.append([i, f["at_s"], f["kind"], f["target"], f["hold_s"], f["heal_s"],
                      wr.get("errors"), wr.get("back_s"), wr.get("stall_s"),
                      rd.get("errors"), rd.get("back_s"), rd.get("stall_s"), " ".join(extra)])
    out.append(_table(["#", "at_s", "fault", "target", "hold", "heal_s", "w_err", "w_back", "w_stall",
                       "r_err", "r_back", "r_stall", "notes"], frows))
    out.append("   (seconds from injection. *_err: client errors; *_back: first success after the last error, "
               "- = not before the next fault; *_stall: longest time without any success)")
    out.append("")

    erows = [[r["op"], r["sqlstate"], r["outcome"], r["in_flight"], r["during"], r["outside"], r["on_fault_node"],
              r["sample"][:70]] for r in chk["errors"]["rows"][:25]]
    if erows:
        out.append(_table(["client op", "sqlstate", "outcome", "in_flight", "during_fault", "outside", "names_node",
                           "sample message"], erows))
        out.append("   (in_flight: a fault struck while it ran; during_fault: sent during a fault or its "
                   "recovery; outside: neither)")
        out.append("")

    if rep["load"]:
        lrows = [[k, v["runs"], v["txns"], v["failed"], v["aborted_clients"], v["error_lines"]]
                 for k, v in sorted(rep["load"].items())]
        out.append(_table(["PyMySQL load stream" if my else "pgbench stream", "runs" if not my else "clients",
                           "txns", "failed", "aborted clients", "error lines"], lrows))
        out.append("")

    for px in proxies:
        warns = sorted((px.get("log_warnings") or {}).items(), key=lambda kv: -kv[1])
        if warns:
            out.append(f"Switchyard{' ' + px['name'] if multi else ''} log, warnings and errors: "
                       + "; ".join(f"{n} x {k}" for k, n in warns[:6]))
            out.append("")

    if chk["violations"]:
        out.append("VERDICT: FAIL")
        for v in chk["violations"]:
            out.append(f"  - {v['check']}: {v['count']}")
            det = v.get("detail")
            if isinstance(det, list):
                for d in det[:3]:
                    out.append(f"      {d}")
            elif det:
                out.append(f"      {det}")
    else:
        out.append("VERDICT: PASS (no violation)")
    return "\n".join(out)


def _count(chk, name):
    return next((v["count"] for v in chk["violations"] if v["check"] == name), 0)


def render_markdown(rep, text):
    eng = "MariaDB, " if rep.get("engine") == "mariadb" else ""
    return (f"# Chaos run {rep['when']}: {eng}seed {rep['seed']}, {rep['duration_s']:.0f} s\n\n"
            f"Command: `{rep['command']}`  \n"
            f"Machine: {rep['machine']['host']}, {rep['machine']['cpus']} CPUs, kernel {rep['machine']['kernel']}  \n"
            f"Binary: `{rep['binary']}`\n\n"
            "```\n" + text + "\n```\n\n"
            "Everything else (every fault record, the operator's actions, each violation's "
            "operations) is in the JSON file next to this one.\n")
