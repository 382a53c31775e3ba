"""The cost of int8 weights (W8A16) in quality on the golden DiT cases, as ratios to the bf16 floor
(see bench/int8_quality.py for what is compared with what).

    .venv/bin/python bench/bench_int8_quality.py [--golden DIR (default tests/golden)] [--json out.json]
"""
import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--golden", default=os.path.join(os.path.dirname(HERE), "tests", "golden"))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from stepvideo_ms import runtime
    runtime.init("CPU")
    import int8_quality as q

    cpu = q.measure_cpu(a.golden)
    with tempfile.TemporaryDirectory() as tmp:
        sim = q.run_sim_part(a.golden, os.path.join(tmp, "sim.json"))
    rows = q.combine(cpu, sim, a.golden)
    print(q.table(rows))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
