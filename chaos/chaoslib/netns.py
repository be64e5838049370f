"""The network the run lives in.

`Netns`: one network namespace per PostgreSQL server and one for Switchyard plus the
workload, each with a veth pair whose other end is plugged into a bridge in a hub
namespace of its own. Nothing is created in the host's namespace (the bridge and the
veth ends live in the hub), so the addresses (10.77.0.0/24 by default) cannot clash
with the machine's, and a partition is real: iptables rules inside one member's
namespace drop its packets, TCP stalls and retransmits exactly as across a real
network. Every namespace name starts with `syc<pid>x<rand>-`, so a run's leftovers
(after a SIGKILL of the harness) are recognised by the next run and removed once their
owner pid is gone.

`Loopback`: the fallback when namespaces cannot be created (not root, no `ip netns`):
everything on 127.0.0.1 with its own port, and no network faults.
"""

import os
import random
import re
import signal

from .common import alive, log, run

NS_PREFIX = "syc"
NS_RE = re.compile(rf"^{NS_PREFIX}(\d+)x[0-9a-f]+-")


class Member:
    def __init__(self, name, ns, ip):
        self.name = name
        self.ns = ns
        self.ip = ip


class Netns:
    kind = "netns"

    def __init__(self, subnet="10.77.0"):
        self.run_id = f"{NS_PREFIX}{os.getpid()}x{random.getrandbits(16):04x}"
        self.subnet = subnet
        self.hub = f"{self.run_id}-hub"
        self.members = {}
        self.created = []
        self.netem = False  # probed in setup: this kernel may lack sch_netem

    # ---- setup / teardown -------------------------------------------------------------
    @staticmethod
    def available():
        """(True, '') if namespaces can be made here, else (False, why)."""
        if os.geteuid() != 0:
            return False, "not running as root"
        name = f"{NS_PREFIX}{os.getpid()}x0000-probe"
        p = run(["ip", "netns", "add", name], check=False, timeout=10)
        if p.returncode != 0:
            return False, f"ip netns add failed: {p.stderr.strip()}"
        run(["ip", "netns", "del", name], check=False, timeout=10)
        return True, ""

    def setup(self, names_ips):
        """names_ips: [(member name, last octet)]."""
        self._ns_add(self.hub)
        self._ip(self.hub, "link", "add", "br0", "type", "bridge")
        self._ip(self.hub, "link", "set", "br0", "up")
        for name, octet in names_ips:
            ns = f"{self.run_id}-{name}"
            self._ns_add(ns)
            ip = f"{self.subnet}.{octet}"
            # Both ends are created inside namespaces: the host never sees them.
            self._ip(self.hub, "link", "add", f"v{name}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip(self.hub, "link", "set", f"v{name}", "master", "br0", "up")
            self._ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip(ns, "link", "set", "eth0", "up")
            self._ip(ns, "link", "set", "lo", "up")
            self.members[name] = Member(name, ns, ip)
            # Our own chains, so healing a partition is one flush that cannot touch
            # anything else.
            for chain, hook in (("CHAOS_IN", "INPUT"), ("CHAOS_OUT", "OUTPUT")):
                self.iptables(name, "-N", chain)
                self.iptables(name, "-I", hook, "-j", chain)
        self.netem = self._probe_netem(next(iter(self.members)))
        log(f"network: namespaces {self.run_id}-*, bridge in {self.hub}, "
            + ", ".join(f"{m.name}={m.ip}" for m in self.members.values())
            + ("" if self.netem else "; tc netem is not available in this kernel (loss via iptables, bandwidth via tbf)"))

    def _probe_netem(self, name):
        p = run(self.prefix(name) + ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"],
                check=False, timeout=10)
        if p.returncode == 0:
            run(self.prefix(name) + ["tc", "qdisc", "del", "dev", "eth0", "root"], check=False, timeout=10)
            return True
        return False

    def _ns_add(self, ns):
        run(["ip", "netns", "add", ns], timeout=10)
        self.created.append(ns)

    def _ip(self, ns, *args):
        run(["ip", "-n", ns, *args], timeout=10)

    def teardown(self):
        # Members first (their veth ends vanish with them), the hub last.
        for ns in reversed(self.created):
            remove_namespace(ns)
        self.created = []

    @staticmethod
    def cleanup_leftovers():
        """Remove namespaces of earlier runs whose harness process is gone."""
        p = run(["ip", "netns", "list"], check=False, timeout=10)
        names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
        stale = [n for n in names if NS_RE.match(n) and not alive(int(NS_RE.match(n).group(1)))]
        # hub last, as in teardown
        for n in sorted(stale, key=lambda n: n.endswith("-hub")):
            log(f"removing leftover namespace {n}")
            remove_namespace(n)
        return stale

    # ---- use ------------------------------------------------------------------------
    def prefix(self, name):
        """argv prefix running a command inside member `name`'s namespace."""
        return ["ip", "netns", "exec", self.members[name].ns]

    def ns_of(self, name):
        return self.members[name].ns

    def ip_of(self, name):
        return self.members[name].ip

    def iptables(self, name, *args, check=True):
        return run(self.prefix(name) + ["iptables", "-w", "5", *args], timeout=15, check=check)

    def heal(self, name):
        """Remove every rule and qdisc this harness put in `name`'s namespace."""
        self.iptables(name, "-F", "CHAOS_IN", check=False)
        self.iptables(name, "-F", "CHAOS_OUT", check=False)
        run(self.prefix(name) + ["tc", "qdisc", "del", "dev", "eth0", "root"], check=False, timeout=10)

    def heal_all(self):
        for name in self.members:
            self.heal(name)

    def tc(self, name, *args):
        return run(self.prefix(name) + ["tc", *args], timeout=10)


def remove_namespace(ns):
    """Kill whatever still runs in `ns`, then delete it."""
    p = run(["ip", "netns", "pids", ns], check=False, timeout=10)
    for pid in p.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "del", ns], check=False, timeout=10)


class Loopback:
    """No namespaces: every member on 127.0.0.1, network faults unavailable."""

    kind = "loopback"
    netem = False

    def __init__(self):
        self.members = {}

    def setup(self, names_ips):
        for name, _ in names_ips:
            self.members[name] = Member(name, None, "127.0.0.1")

    def teardown(self):
        pass

    def prefix(self, name):
        return []

    def ns_of(self, name):
        return None

    def ip_of(self, name):
        return "127.0.0.1"

    def heal(self, name):
        pass

    def heal_all(self):
        pass
