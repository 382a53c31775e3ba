"""Load once, generate many: 3 videos from 3 separate `run_parallel.py --prompt` runs (each pays the
start-up and the load) against the same 3 as jobs of one `run_parallel.py --serve` (one load).

    python bench/bench_load_once.py --model_dir MODEL [--frames 17 --height 48 --width 80 --steps 3]

One process (world 1) with the encoders and the VAE in-process (`--caption_url local --vae_url local`).
Prints, and writes as JSON with --out: per separate run its wall time and its recorded load/encode/
denoise/decode times; for the service its start-up to ready (load included), its load time and each
job's submit-to-done time. Machine load changes the figures: compare within one run of this script.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red house under the sun", "a blue boat on a lake", "a lighthouse at dusk"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=80)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the figures here (JSON)")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench_load_once_")
    env = {**os.environ, "GLOG_v": "3"}
    common = ["--model_dir", a.model_dir, "--caption_url", "local", "--vae_url", "local", "--no_progress"]
    sizes = {"num_frames": a.frames, "height": a.height, "width": a.width, "infer_steps": a.steps}
    flags = [x for k, v in sizes.items() for x in (f"--{k}", str(v))]

    separate = []
    for i, prompt in enumerate(PROMPTS):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "run_parallel.py", *common, *flags, "--prompt", prompt, "--seed", str(i),
                        "--save_path", os.path.join(work, "separate"), "--output_file_name", f"v{i}"],
                       cwd=REPO, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        with open(os.path.join(work, "separate", f"v{i}.json")) as fh:
            timings = json.load(fh)["timings"]
        separate.append({"wall_s": round(wall, 2), **{k: round(v, 2) for k, v in timings.items()}})
        print(f"separate run {i}: {wall:.1f} s wall, {timings}", flush=True)

    log = open(os.path.join(work, "service.out"), "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "run_parallel.py", "--serve", "--port", "0", *common,
                             "--save_path", os.path.join(work, "service")], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        url = None
        while url is None:
            if proc.poll() is not None:
                raise SystemExit("the service exited:\n" + open(log.name).read()[-3000:])
            m = re.search(r"service ready: (http://\S+/)", open(log.name).read())
            url = m.group(1) if m else None
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        load_s = requests.get(url + "health", timeout=10).json()["load_s"]
        jobs = []
        for i, prompt in enumerate(PROMPTS):
            t1 = time.perf_counter()
            job_id = requests.post(url + "jobs", json=dict(sizes, prompt=prompt, seed=i), timeout=10).json()["id"]
            while requests.get(f"{url}jobs/{job_id}", timeout=10).json()["state"] not in ("done", "failed"):
                time.sleep(0.05)
            jobs.append(round(time.perf_counter() - t1, 2))
            print(f"service job {i}: {jobs[-1]:.1f} s submit to done", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    result = {"sizes": sizes, "separate_runs": separate, "separate_total_s": round(sum(r["wall_s"] for r in separate), 2),
              "service": {"start_to_ready_s": round(ready_s, 2), "load_s": load_s, "jobs_s": jobs,
                          "total_s": round(ready_s + sum(jobs), 2)}}
    print(json.dumps(result, indent=1))
    if a.out:
        sys.path.insert(0, REPO)
        from stepvideo_ms.formats.atomic import write_json
        write_json(a.out, result)


if __name__ == "__main__":
    main()
