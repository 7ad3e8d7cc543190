"""Host memory for tools/gpu-check: running heavy processes side by side without letting
the kernel's OOM killer decide which of them dies.

Why. compute-sanitizer racecheck keeps its own records on the host, and three of its
processes side by side drove an H200 machine's 128 GiB to 0 GiB available: the OOM killer
ended gpu_attention, gpu_graphs and gpu_linear mid-test (rc 9, 771cd47), as it had ended
three of eight at b908988. Which binary grew was unknown: nothing recorded a process's
size. `SideBySide` records each run's peak resident size (the whole process group: the
sanitizer and the test under it), starts a process only while the host has room, and when
memory runs low with several running it stops the youngest itself and runs it again later
alone, so the others finish and every binary still gets a whole run.
"""

import os
import signal
import subprocess
import threading
import time

GIB = 2**30
PAGE = os.sysconf("SC_PAGE_SIZE")


def mem_available():
    """MemAvailable from /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def groups_rss(pgids):
    """Resident bytes of every process in each of the process groups `pgids`, from one
    pass over /proc: {pgid: bytes}, 0 for a group with no process left."""
    totals = dict.fromkeys(pgids, 0)
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return totals
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            # Fields after the parenthesised command name: state ppid pgrp ...
            pgid = int(stat.rsplit(")", 1)[1].split()[2])
            if pgid not in totals:
                continue
            with open(f"/proc/{pid}/statm") as f:
                totals[pgid] += int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return totals


class Run:
    """One started process group."""

    def __init__(self, proc, alone):
        self.proc = proc
        # Started alone: nothing may start beside it.
        self.alone = alone
        self.started = time.monotonic()
        self.peak_rss = 0
        # (seconds since start, group RSS bytes) every TRACE_SECONDS: how a run's memory
        # grew, for the log (racecheck's grows with the launches of a process).
        self.trace = []
        self.preempted = False
        # Killed while running by itself with MemAvailable under the floor: before the
        # kernel's OOM killer picks a process, which may be the caller's.
        self.exhausted = False


# Seconds between the RSS samples a run's trace keeps.
TRACE_SECONDS = 5


class SideBySide:
    """Runs commands in their own process groups, at most `workers` at once.

    A command starts only while MemAvailable is at least `start_bytes` (or nothing else
    runs). When MemAvailable falls under `floor_bytes` while several run, the youngest is
    killed and flagged preempted; its caller runs it again with `alone=True`, which waits
    until nothing else runs. A command that takes MemAvailable under the floor by itself
    is killed and reported out of memory: it cannot finish on this machine. Every run's
    peak group RSS is recorded by name.
    """

    def __init__(self, workers, start_bytes, floor_bytes):
        self.workers = max(1, workers)
        self.start_bytes = start_bytes
        self.floor_bytes = floor_bytes
        self.cond = threading.Condition()
        self.running = {}  # pgid -> Run
        self.waiting_alone = 0
        self.peaks = {}  # name -> largest peak group RSS in bytes over its runs
        self.traces = {}  # name -> the RSS trace of its last run
        self.preemptions = {}  # name -> times it was stopped for memory
        self.lowest = None
        self.stop = threading.Event()
        self.monitor = threading.Thread(target=self.watch, daemon=True)

    def __enter__(self):
        self.monitor.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.monitor.join(timeout=5)
        return False

    def may_start(self, alone):
        if not self.running:
            return True
        if alone or self.waiting_alone or any(r.alone for r in self.running.values()):
            return False
        if len(self.running) >= self.workers:
            return False
        avail = mem_available()
        return avail is None or avail >= self.start_bytes

    def run(self, name, cmd, out, timeout, env=None, cwd=None, alone=False):
        """Runs cmd with stdout and stderr to the open binary file `out`; kills its group at
        `timeout` seconds after it starts. Returns (exit status, None on timeout,
        'preempted' when stopped to make room, or 'out of memory' when it alone took the
        machine under the floor; seconds it ran)."""
        deadline_wait = time.monotonic() + timeout
        with self.cond:
            if alone:
                self.waiting_alone += 1
            try:
                while not self.may_start(alone):
                    left = deadline_wait - time.monotonic()
                    if left <= 0:
                        return None, 0.0
                    self.cond.wait(timeout=min(1.0, left))
            finally:
                if alone:
                    self.waiting_alone -= 1
            try:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                        env=env, start_new_session=True)
            except OSError as e:
                out.write(f"cannot start: {e}\n".encode())
                return -1, 0.0
            entry = Run(proc, alone)
            self.running[proc.pid] = entry
        left = max(1.0, deadline_wait - time.monotonic())
        try:
            rc = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
            rc = None
        with self.cond:
            del self.running[proc.pid]
            self.peaks[name] = max(self.peaks.get(name, 0), entry.peak_rss)
            self.traces[name] = entry.trace
            if entry.preempted:
                self.preemptions[name] = self.preemptions.get(name, 0) + 1
                rc = "preempted"
            elif entry.exhausted:
                rc = "out of memory"
            self.cond.notify_all()
        return rc, time.monotonic() - entry.started

    def watch(self):
        while not self.stop.wait(1.0):
            avail = mem_available()
            with self.cond:
                now = time.monotonic()
                for pgid, rss in groups_rss(self.running).items():
                    entry = self.running[pgid]
                    entry.peak_rss = max(entry.peak_rss, rss)
                    age = now - entry.started
                    if not entry.trace or age - entry.trace[-1][0] >= TRACE_SECONDS:
                        entry.trace.append((age, rss))
                if avail is None:
                    continue
                if self.lowest is None or avail < self.lowest:
                    self.lowest = avail
                # One kill at a time: until a stopped process is gone its memory is not
                # back, and the survivors would look short of it.
                runs = list(self.running.values())
                if avail >= self.floor_bytes or not runs or \
                        any(e.preempted or e.exhausted for e in runs):
                    continue
                youngest = max(runs, key=lambda e: e.started)
                if len(runs) > 1:
                    youngest.preempted = True
                else:
                    youngest.exhausted = True
                kill_group(youngest.proc.pid)

    def lowest_gib(self):
        return None if self.lowest is None else round(self.lowest / GIB, 1)

    def trace_text(self, name):
        """The RSS trace of `name`'s last run as '5 s 1.2, 10 s 3.4, ...' (GiB), or ''."""
        return ", ".join(f"{t:.0f} s {rss / GIB:.1f}" for t, rss in self.traces.get(name, []))

    def peak_gib(self, name):
        peak = self.peaks.get(name)
        return None if peak is None else round(peak / GIB, 1)


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
