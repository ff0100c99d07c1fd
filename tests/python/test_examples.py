"""The examples in clients/python/examples run against a `dhsa serve` and check themselves (each
exits non-zero when the service's result differs from local dense attention where it must not)."""

import os
import subprocess
import sys

EXAMPLES = os.environ.get("DHSA_EXAMPLES", "")


def run_example(name, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([env.get("PYTHONPATH", ""), EXAMPLES])
    p = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, f"{name} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_replace_attention_with_dense_policy_equals_local(server):
    out = run_example("replace_attention.py", "--target", server.target, "--tokens", 700,
                      "--policy", "dense")
    assert "density 100.00% of causal pairs" in out


def test_replace_attention_with_dhsa_reports_the_difference(server):
    out = run_example("replace_attention.py", "--target", server.target, "--tokens", 900,
                      "--budget", 512, "--dtype", "float16")
    assert "layer output: max |difference|" in out


def test_chunked_prefill_then_decode_equals_local_within_the_budget(server):
    out = run_example("chunked_prefill_decode.py", "--target", server.target, "--layers", 2,
                      "--prompt", 700, "--chunk", 256, "--generate", 6)
    assert "stored per layer: [705, 705] tokens" in out
    assert "greedy choice agrees at 6 of 6 steps" in out
