"""Tests of `tools/gpu-check merge` on results files written here, in this repository's
own history: run by tests/sanitizer_scheduler.rs (`cargo test`), or alone with
`python3 -m unittest gpu_check_merge_test`."""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_CHECK = os.path.join(HERE, "gpu-check")


def load_gpu_check():
    loader = importlib.machinery.SourceFileLoader("gpu_check", GPU_CHECK)
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def git(*args):
    out = subprocess.run(["git", "-C", gpu_check.ROOT, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def commits_touching(paths, limit=200):
    """Recent commits, newest first, each with whether it changed any of `paths`."""
    log = git("log", f"-{limit}", "--format=%H")
    if not log:
        return []
    return [(c, bool(git("diff", "--name-only", f"{c}~1", c, "--", *paths)))
            for c in log.splitlines() if git("rev-parse", "--verify", "-q", f"{c}~1")]


def entry(binary, status):
    return {"binary": binary, "status": status, "errors": 0,
            "hazards_outside_qilin_kernels": 0, "seconds": 1.0, "peak_rss_gib": 1.0}


def part(commit, steps, racecheck):
    return {"schema": 1, "date": "2026-11-27", "gpu": {"name": "NVIDIA H200"},
            "binaries": {"commit": commit}, "steps": steps, "tests": [],
            "sanitizer": {"racecheck": racecheck}, "bench": {}, "elapsed_s": 10}


class MergeTest(unittest.TestCase):
    def test_a_later_run_replaces_the_binaries_it_ran_again(self):
        first = [entry("gpu_attention", "test failure under the sanitizer (rc 9)"),
                 entry("gpu_linear", "clean")]
        second = [entry("gpu_attention::decode_rows_match_the_cpu_twin", "clean"),
                  entry("gpu_attention::prefill_chunks_match_the_cpu_twin", "clean")]
        merged = gpu_check.merge_sanitizer([part("a", [], first), part("a", [], second)])
        self.assertEqual([e["binary"] for e in merged["racecheck"]],
                         ["gpu_linear", "gpu_attention::decode_rows_match_the_cpu_twin",
                          "gpu_attention::prefill_chunks_match_the_cpu_twin"])
        self.assertEqual(gpu_check.sanitizer_verdict(merged["racecheck"])[0], "clean")

    def test_verdicts(self):
        verdict = gpu_check.sanitizer_verdict
        self.assertEqual(verdict([entry("a", "clean"), entry("b", "errors")])[0], "FAIL")
        self.assertEqual(verdict([entry("a", "clean"),
                                  entry("b", "test failure under the sanitizer (rc 9)")])[0],
                         "FAIL")
        self.assertEqual(verdict([entry("a", "clean"),
                                  entry("b", "out of host memory (alone)")]),
                         ("partial", "1 of 2 clean"))
        self.assertEqual(verdict([entry("a", "clean")]), ("clean", "1 of 1 clean"))

    def test_run_verdicts(self):
        def res(**statuses):
            return {"steps": [{"step": n, "status": st} for n, st in statuses.items()]}
        required = dict(tests="pass", e2e_eager="pass", memcheck="clean", racecheck="clean")
        self.assertEqual(gpu_check.verdict(res(**required, kernels="ok"))[0], "pass")
        status, note = gpu_check.verdict(res(**required, optin="FAIL"))
        self.assertEqual(status, "pass")
        self.assertIn("opt-in switches (off by default) failed: optin", note)
        status, note = gpu_check.verdict(res(**dict(required, racecheck="partial")))
        self.assertEqual(status, "incomplete")
        self.assertIn("racecheck (partial)", note)
        self.assertEqual(gpu_check.verdict(res(tests="pass", memcheck="clean"))[0],
                         "incomplete")
        status, note = gpu_check.verdict(res(**required, decode="timeout"))
        self.assertEqual(status, "FAIL")
        self.assertIn("failed: decode", note)
        status, note = gpu_check.verdict(res(**required, ncu="timeout"))
        self.assertEqual(status, "pass")
        self.assertIn("profiling cut short at its timeout: ncu", note)
        self.assertEqual(gpu_check.verdict(res(**required, ncu="FAIL (rc 1)"))[0], "FAIL")
        status, note = gpu_check.verdict(res(**dict(required, tests="FAIL")))
        self.assertEqual((status, note.startswith("failed: tests")), ("FAIL", True))

    def test_ncu_rows_read_the_stall_metrics(self):
        header = '"ID","Kernel Name","Grid Size","Block Size","Section Name","Metric Name",' \
                 '"Metric Unit","Metric Value"\n'
        def row(section, metric, unit, value):
            return (f'"0","qilin_sample_split_bf16(QilinSampleSplitParams)","(1, 13, 1)",'
                    f'"(256, 1, 1)","{section}","{metric}","{unit}","{value}"\n')
        text = header + row("GPU Speed Of Light Throughput", "Duration", "us", "9.87")
        text += row("Command line profiler metrics", gpu_check.stall_metric("membar"), "", "1,234.5")
        text += row("Command line profiler metrics", gpu_check.stall_metric("barrier"), "", "2.5")
        text += row("Command line profiler metrics", "smsp__something_else", "", "7")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "ncu.csv")
            with open(path, "w") as f:
                f.write("==PROF== a line ncu prints before the table\n" + text)
            rows = gpu_check.ncu_rows(path)
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0]["kernel"], "qilin_sample_split_bf16")
        self.assertEqual(rows[0]["duration"], "9.87 us")
        self.assertEqual(rows[0]["stalls"], {"membar": 1234.5, "barrier": 2.5})
        report = gpu_check.markdown({
            "date": "2026-11-27", "gpu": {}, "binaries": {}, "steps": [], "tests": [],
            "sanitizer": {}, "bench": {}, "ncu": rows})
        self.assertIn("| qilin_sample_split_bf16 | (1, 13, 1) | 9.87 us | membar 1234.5, "
                      "barrier 2.5 |", report)

    def test_ncu_profiles_each_filter_in_its_own_call(self):
        # A stand-in for ncu on PATH: a profiling call writes its report naming the
        # `--only` filter (exit 3 for the filter "broken"); an import prints one launch of
        # a kernel named after it. It checks that each call carries the per-filter launch cap.
        fake = '''#!/usr/bin/env python3
import os, sys
args = sys.argv[1:]
if "--import" in args:
    op = open(args[args.index("--import") + 1]).read()
    print('"ID","Kernel Name","Grid Size","Block Size","Section Name","Metric Name","Metric Unit","Metric Value"')
    print(f'"0","qilin_{op}(P)","(1, 1, 1)","(32, 1, 1)","GPU Speed Of Light Throughput","Duration","us","1.5"')
    sys.exit(0)
assert args[args.index("-c") + 1] == os.environ["EXPECTED_CAP"]
op = args[args.index("--only") + 1]
open(args[args.index("-o") + 1] + ".ncu-rep", "w").write(op)
sys.exit(3 if op == "broken" else 0)
'''
        saved = (gpu_check.NCU_OPS, os.environ["PATH"])
        try:
            for ops, status in [(["attn", "gemm"], "ok"), (["attn", "broken"], "FAIL")]:
                with tempfile.TemporaryDirectory() as d:
                    os.mkdir(os.path.join(d, "bin"))
                    tool = os.path.join(d, "bin", "ncu")
                    with open(tool, "w") as f:
                        f.write(fake)
                    os.chmod(tool, 0o755)
                    os.environ["PATH"] = os.path.join(d, "bin") + os.pathsep + saved[1]
                    gpu_check.NCU_OPS = ops
                    env = {"EXPECTED_CAP": str(gpu_check.NCU_LAUNCHES_PER_OP)}
                    r = gpu_check.Runner(300.0, gpu_check.PROFILES["short"], d, env)
                    results = {}
                    gpu_check.step_ncu(r, "qilin", results)
                self.assertEqual([(row["op"], row["kernel"]) for row in results["ncu"]],
                                 [(op, f"qilin_{op}") for op in ops])
                self.assertEqual(r.steps[-1]["status"], status)
                self.assertIn("2 launches profiled, 2 of 2 filters", r.steps[-1]["note"])
            self.assertIn("failed: 'broken' (rc 3)", r.steps[-1]["note"])
        finally:
            gpu_check.NCU_OPS, os.environ["PATH"] = saved

    def test_steps_before_racecheck_leave_it_its_reserve(self):
        profile = dict(gpu_check.PROFILES["short"])
        budget = 400.0
        with_race = gpu_check.Runner(budget, profile, "/tmp", {}, reserve_racecheck=True)
        without = gpu_check.Runner(budget, profile, "/tmp", {}, reserve_racecheck=False)
        reserve = min(profile["racecheck"], gpu_check.RACECHECK_RESERVE)
        left = budget - gpu_check.REPORT_RESERVE
        self.assertAlmostEqual(with_race.timeout("tests"),
                               min(profile["tests"], left - reserve), delta=1)
        self.assertAlmostEqual(with_race.timeout("racecheck"),
                               min(profile["racecheck"], left), delta=1)
        self.assertAlmostEqual(without.timeout("tests"), min(profile["tests"], left), delta=1)
        starved = gpu_check.Runner(reserve / 2, profile, "/tmp", {}, reserve_racecheck=True)
        self.assertEqual(starved.timeout("kernels"), 0.0)

    def test_a_test_without_cuda_calls_is_clean(self):
        status = gpu_check.sanitizer_status
        # The last attempt's output of gpu_sampling's tolerance check under racecheck
        # (H200, 6b03246), which compute-sanitizer ends with exit status 255.
        log = ("========= COMPUTE-SANITIZER\n\nrunning 1 test\n"
               "test tolerance_check_accepts_the_twin_and_rejects_others ... ok\n\n"
               "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; "
               "finished in 0.19s\n\n========= Error: Target application terminated before "
               "first instrumented API call\n")
        self.assertEqual(status(255, 0, log), "clean (no GPU work)")
        failed = log.replace("1 passed; 0 failed", "0 passed; 1 failed")
        self.assertEqual(status(101, 0, failed), "test failure under the sanitizer (rc 101)")
        self.assertEqual(status(None, 0, log), "timeout (partial)")
        self.assertEqual(gpu_check.sanitizer_verdict(
            [entry("a", "clean"), entry("b", "clean (no GPU work)")]), ("clean", "2 of 2 clean"))

    def merge_files(self, parts):
        with tempfile.TemporaryDirectory() as d:
            paths = []
            for i, p in enumerate(parts):
                paths.append(os.path.join(d, f"part{i}.json"))
                with open(paths[-1], "w") as f:
                    json.dump(p, f)
            proc = subprocess.run(["python3", GPU_CHECK, "merge", *paths],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            merged = None
            written = [f for f in os.listdir(d) if f.endswith(".json") and f not in
                       {os.path.basename(p) for p in paths}]
            if written:
                with open(os.path.join(d, written[0])) as f:
                    merged = json.load(f)
            return proc.returncode, proc.stdout, merged

    def test_commits_that_differ_in_the_code_do_not_merge(self):
        touched = [c for c, t in commits_touching(gpu_check.MERGE_CODE_PATHS) if t]
        if not touched:
            self.skipTest("no history here (a shallow clone)")
        c = touched[0]
        rc, out, _ = self.merge_files([part(f"{c}~1", [], []), part(c, [], [])])
        self.assertNotEqual(rc, 0)
        self.assertIn("differ in the code under test", out)

    def test_commits_that_differ_outside_the_code_merge(self):
        untouched = [c for c, t in commits_touching(gpu_check.MERGE_CODE_PATHS) if not t]
        if not untouched:
            self.skipTest("no history here (a shallow clone)")
        c = untouched[0]
        steps = lambda status: [{"step": "racecheck", "status": status, "seconds": 100.0,
                                 "timeout": 300, "note": ""}]
        rc, out, merged = self.merge_files([
            part(f"{c}~1", steps("FAIL"), [entry("gpu_graphs", "timeout (partial)"),
                                           entry("gpu_norm", "clean")]),
            part(c, steps("clean"), [entry("gpu_graphs::graph_replays", "clean")])])
        self.assertEqual(rc, 0, out)
        self.assertEqual(merged["binaries"]["merged_commits"], [f"{c}~1", c])
        racecheck = [s for s in merged["steps"] if s["step"] == "racecheck"]
        self.assertEqual(len(racecheck), 1)
        self.assertEqual(racecheck[0]["status"], "clean")
        self.assertEqual(racecheck[0]["seconds"], 200.0)
        self.assertEqual(sorted(e["binary"] for e in merged["sanitizer"]["racecheck"]),
                         ["gpu_graphs::graph_replays", "gpu_norm"])


if __name__ == "__main__":
    unittest.main()
