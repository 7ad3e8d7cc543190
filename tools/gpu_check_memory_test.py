"""Tests of tools/gpu_check_memory.py with real processes and real memory: run by
tests/sanitizer_scheduler.rs (`cargo test`), or alone with `python3 -m unittest`."""

import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_memory import GIB, SideBySide, mem_available  # noqa: E402

# Writes every byte of `size` GiB (so the pages are resident), then holds them.
HOLD = "import sys, time; b = b'\\x01' * ({size} * 2**30); time.sleep({secs})"


def holder(size, secs):
    return [sys.executable, "-c", HOLD.format(size=size, secs=secs)]


class SideBySideTest(unittest.TestCase):
    def test_low_memory_stops_the_youngest_which_then_runs_alone(self):
        avail = mem_available()
        if avail is None or avail < 8 * GIB:
            self.skipTest("needs /proc/meminfo and 8 GiB available")
        # Two holders of 2 GiB side by side take MemAvailable 4 GiB down: under a floor
        # 3 GiB below where it started, so the younger one is stopped.
        pool = SideBySide(2, 0, avail - 3 * GIB)
        results = {}

        def older():
            with open(os.devnull, "wb") as out:
                results["older"] = pool.run("older", holder(2, 6), out, 60)

        def younger():
            time.sleep(1.0)
            with open(os.devnull, "wb") as out:
                first = pool.run("younger", holder(2, 2), out, 60)
                started = time.monotonic()
                again = pool.run("younger", holder(2, 2), out, 60, alone=True)
                results["younger"] = (first, again, started)

        with pool:
            threads = [threading.Thread(target=f) for f in (older, younger)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        older_rc, older_secs = results["older"]
        (first_rc, _), (again_rc, again_secs), _ = results["younger"]
        self.assertEqual(older_rc, 0, "the older process runs to the end")
        self.assertEqual(first_rc, "preempted", "the younger one is stopped for memory")
        self.assertEqual(again_rc, 0, "and completes when run again alone")
        self.assertGreaterEqual(again_secs, 2.0)
        self.assertEqual(pool.preemptions, {"younger": 1})
        # Each one's peak group size saw its 2 GiB (sampled once a second).
        self.assertGreater(pool.peaks["older"], 1.8 * GIB)
        self.assertGreater(pool.peaks["younger"], 1.8 * GIB)
        # The older one's trace: samples at least 5 s apart, one of them near its 2 GiB (a
        # sample can fall while it allocates or exits, and a loaded machine stretches its
        # run: a CI run's last sample, at 11 s, caught it exiting at 60 MB).
        trace = pool.traces["older"]
        self.assertGreaterEqual(len(trace), 1, trace)
        self.assertTrue(all(b[0] - a[0] >= 5 for a, b in zip(trace, trace[1:])), trace)
        self.assertGreater(max(rss for _, rss in trace), 1.8 * GIB, trace)
        self.assertRegex(pool.trace_text("older"), r"^\d+ s \d+\.\d(, \d+ s \d+\.\d)*$")

    def test_a_run_alone_under_the_floor_is_stopped_out_of_memory(self):
        avail = mem_available()
        if avail is None or avail < 6 * GIB:
            self.skipTest("needs /proc/meminfo and 6 GiB available")
        # One holder of 2 GiB takes MemAvailable under a floor 1 GiB below where it
        # started: with nothing to stop in its place, it is stopped itself.
        pool = SideBySide(2, 0, avail - GIB)
        with pool, open(os.devnull, "wb") as out:
            rc, secs = pool.run("greedy", holder(2, 20), out, 60)
        self.assertEqual(rc, "out of memory")
        self.assertLess(secs, 15, "stopped, not left to sleep out its 20 s")
        self.assertEqual(pool.preemptions, {})
        self.assertGreater(pool.peaks["greedy"], 0.9 * GIB)

    def sleepers(self, runs):
        """Runs (name, alone, delay) sleepers of 1.5 s side by side, each started `delay`
        seconds in: {name: (exit status, started, ended)}."""
        pool = SideBySide(3, 0, 0)
        spans = {}

        def run(name, alone, delay):
            time.sleep(delay)
            with open(os.devnull, "wb") as out:
                rc, secs = pool.run(name, [sys.executable, "-c", "import time; time.sleep(1.5)"],
                                    out, 30, alone=alone)
                spans[name] = (rc, time.monotonic() - secs, time.monotonic())

        with pool:
            threads = [threading.Thread(target=run, args=a) for a in runs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return spans

    def test_alone_waits_until_nothing_else_runs(self):
        spans = self.sleepers([("first", False, 0.0), ("alone", True, 0.3)])
        self.assertEqual((spans["first"][0], spans["alone"][0]), (0, 0))
        # The lone run began only after the first had ended.
        self.assertGreaterEqual(spans["alone"][1], spans["first"][2] - 0.05)

    def test_nothing_starts_beside_a_lone_run(self):
        spans = self.sleepers([("alone", True, 0.0), ("later", False, 0.3)])
        self.assertEqual((spans["alone"][0], spans["later"][0]), (0, 0))
        # The later run began only after the lone one had ended.
        self.assertGreaterEqual(spans["later"][1], spans["alone"][2] - 0.05)

    def test_timeout_kills_the_whole_group(self):
        pool = SideBySide(1, 0, 0)
        # A child of the command that would outlive it if only the parent were killed.
        cmd = ["sh", "-c", "sleep 30 & sleep 30"]
        with pool, open(os.devnull, "wb") as out:
            rc, secs = pool.run("slow", cmd, out, 1.5)
        self.assertIsNone(rc)
        self.assertLess(secs, 10)
        self.assertEqual(pool.running, {})


if __name__ == "__main__":
    unittest.main()
