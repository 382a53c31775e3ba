"""The compatibility matrix: every supported MindSpore x every check, each version in its own venv.

    python bench/compat_matrix.py [--versions 2.7.0,2.10.0] [--root DIR] [--json out.json]

For each version (default: every version in stepvideo_ms/versions.py TESTED) it makes a venv with
`STEPVIDEO_MINDSPORE=V STEPVIDEO_VENV=ROOT/msV bash scripts/setup.sh` (the PyPI wheel, which carries the
Ascend plugin), then runs in that venv:
- `verify` on the golden data (tests/golden), CPU float32: cases passed / found;
- `verify --device ascend-sim` (the bf16 cases under the Ascend simulation);
- what capabilities.py finds (Tensor.pin_memory; the CPU kernels it probes);
- `doctor --device ascend-sim`: exit code and the offload path this version takes;
- run_parallel.py on the tiny T2V model under ascend-sim, in-process encoders and VAE, 2 steps at
  17x48x80, with `--offload` and with `--weights int8`: exit code and a finite video.
Each check is a child process with its own time limit; the matrix is printed at the end (and as JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
from stepvideo_ms import versions  # noqa: E402  (plain data: imports no MindSpore)

CHECK_TIMEOUT = 1200
# what capabilities.py finds in this version (API present, CPU kernels probed)
PROBE = """
from stepvideo_ms import runtime, capabilities as c
runtime.init("CPU")
yes = lambda b: "yes" if b else "no"
print(f"pin_memory {yes(c.capabilities().pinned_host_memory)}, CPU sized split {yes(c.cpu_sized_split())}, "
      f"CPU bf16 elementwise {yes(c.cpu_bf16_elementwise())}, CPU asnumpy views {yes(c.cpu_zero_copy_asnumpy())}, "
      f"CPU empty {yes(c.cpu_empty())}")
"""
RUN = ["--caption_url", "local", "--vae_url", "local", "--prompt", "a red kite over a stormy sea", "--infer_steps", "2",
       "--num_frames", "17", "--height", "48", "--width", "80", "--seed", "3", "--no_progress"]


def sh(cmd, env=None, timeout=CHECK_TIMEOUT, cwd=REPO):
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as exc:
        return -1, f"timed out after {timeout} s\n{exc.stdout or ''}", time.perf_counter() - start


def verify_cell(py, env, device):
    rc, out, _ = sh([py, "-m", "stepvideo_ms", "verify", "--device", device], env)
    found = re.search(r"^(\d+) passed, (\d+) failed$", out, re.M)
    cell = f"{found.group(1)}/{int(found.group(1)) + int(found.group(2))}" if found else "none ran"
    return (cell if rc == 0 else f"{cell} (exit {rc})"), out


def run_cell(py, env, model, out_dir, extra):
    rc, out, took = sh([py, "run_parallel.py", "--model_dir", model, "--save_path", out_dir, *RUN, *extra], env)
    if rc != 0:
        return f"exit {rc}", out
    videos = [f for f in os.listdir(out_dir) if f.endswith(".mp4")]
    return (f"ok ({took:.0f} s)" if videos else "no video"), out


def one_version(version, root):
    venv = os.path.join(root, f"ms{version}")
    env = {**os.environ, "STEPVIDEO_MINDSPORE": version, "STEPVIDEO_VENV": venv, "GLOG_v": "3"}
    rc, out, took = sh(["bash", "scripts/setup.sh"], env, timeout=3600)
    row = {"version": version, "setup": "ok" if rc == 0 else f"exit {rc}", "logs": {"setup": out[-3000:]}}
    if rc != 0:
        return row
    py = os.path.join(venv, "bin", "python")
    row["cpu_verify"], row["logs"]["cpu_verify"] = verify_cell(py, env, "CPU")
    sim = {**env, "STEPVIDEO_DEVICE": "ascend-sim"}
    row["sim_verify"], row["logs"]["sim_verify"] = verify_cell(py, env, "ascend-sim")
    rc, out, _ = sh([py, "-c", PROBE], env)
    row["capabilities"] = out.strip().splitlines()[-1] if rc == 0 and out.strip() else f"exit {rc}"
    rc, out, _ = sh([py, "-m", "stepvideo_ms", "doctor", "--device", "ascend-sim"], env)
    offload = re.search(r"offload\s+(\S+)", out)
    row["doctor"] = f"exit {rc}" + (f", offload {offload.group(1)}" if offload else "")
    row["logs"]["doctor"] = out
    model = os.path.join(root, f"tiny-t2v-{version}")
    rc, out, _ = sh([py, "-m", "stepvideo_ms", "tiny", model, "--task", "t2v", "--force"], env)
    if rc != 0:
        row["sim_offload"] = row["sim_int8"] = f"tiny model: exit {rc}"
        row["logs"]["tiny"] = out[-3000:]
        return row
    for name, extra in (("sim_offload", ["--offload"]), ("sim_int8", ["--weights", "int8"])):
        out_dir = os.path.join(root, f"out-{version}-{name}")
        os.makedirs(out_dir, exist_ok=True)
        row[name], row["logs"][name] = run_cell(py, sim, model, out_dir, extra)
    return row


COLUMNS = [("version", "MindSpore"), ("setup", "setup.sh"), ("cpu_verify", "verify, CPU float32"),
           ("sim_verify", "verify, ascend-sim bf16"), ("capabilities", "capabilities found"),
           ("doctor", "doctor (ascend-sim)"),
           ("sim_offload", "run --offload (ascend-sim)"), ("sim_int8", "run --weights int8 (ascend-sim)")]


def table(rows):
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "-")) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", default=",".join(versions.TESTED))
    p.add_argument("--root", default=os.path.join(REPO, ".venv-compat"), help="where the venvs and outputs go")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.makedirs(a.root, exist_ok=True)
    rows = []
    for version in [v.strip() for v in a.versions.split(",") if v.strip()]:
        if not versions.supported(version):
            sys.exit(f"--versions: {version} is outside the supported range {versions.range_text()}")
        print(f"[compat] MindSpore {version} ...", flush=True)
        row = one_version(version, a.root)
        print(f"[compat] {version}: " + ", ".join(f"{k}={row.get(k, '-')}" for k, _ in COLUMNS[1:]), flush=True)
        rows.append(row)
    print(f"\nMachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d')}\n")
    print(table(rows))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
