"""`run_parallel.py --prompts_file jobs.jsonl`: one world, many videos.

Every rank reads and checks the whole file before anything loads (so every rank holds the same
job list without a broadcast); bad lines are reported with their line numbers and skipped; if no
line is usable the run stops there (exit 2). Each job writes SAVE_PATH/NAME.mp4 and NAME.json; a
job that fails (whatever it raises while encoding, denoising, decoding or writing) is reported and the
next one runs; only a failure of the world stops the batch, saying so. Rank 0 exits 0 when every line
was made, else 1.
"""
from __future__ import annotations

import os
import sys
import time



def output_name(number: int, job) -> str:
    from ..diffusion.pipeline import safe_stem

    return job.output_file_name or f"line{number:04d}_{safe_stem(job.settings.prompt)}"


def run_batch(args, world_size: int) -> int:
    from .jobs import defaults_from, read_prompts_file
    from .checks import validate_model
    from ..formats.output_names import check_save_folder
    from .world import GenerationWorld, JobFailed

    check_save_folder(args.save_path)
    defaults = defaults_from(args)
    task, transformer = validate_model(args, world_size)
    jobs, errors = read_prompts_file(args.prompts_file, task, defaults)
    for error in errors:  # every rank says it (the rank is known only once the world is joined)
        print(f"run_parallel.py: error: {error}", file=sys.stderr, flush=True)
    if not jobs:
        raise ValueError(f"--prompts_file {args.prompts_file}: no usable line ({len(errors)} bad)")
    print(f"[run_parallel] batch of {len(jobs)} job(s) from {args.prompts_file}"
          + (f", {len(errors)} bad line(s) skipped" if errors else ""), flush=True)
    world = GenerationWorld.start(args, task, transformer)
    say = (lambda text: print(f"[run_parallel] {text}", flush=True)) if world.rank == 0 else (lambda text: None)
    say(f"loaded in {world.load_s:.1f} s")
    failed = 0
    for i, (number, job) in enumerate(jobs, start=1):
        job.output_file_name = output_name(number, job)
        t0 = time.perf_counter()
        try:
            out = world.run_job(job, args.save_path, extra={"prompts_file": {"path": os.path.abspath(args.prompts_file),
                                                                             "line": number}})
        except JobFailed as exc:  # this job alone (raised on rank 0); the next one runs
            failed += 1
            print(f"run_parallel.py: error: {args.prompts_file} line {number}: {exc}", file=sys.stderr, flush=True)
            continue
        except Exception as exc:  # the world itself failed: no later job can run
            print(f"run_parallel.py: error: world failure on rank {world.rank} at {args.prompts_file} line {number}: "
                  f"{type(exc).__name__}: {exc}; {len(jobs) - i} later job(s) not made", file=sys.stderr, flush=True)
            raise
        if out is not None:
            say(f"[{i}/{len(jobs)}] line {number}: {out[0]} ({time.perf_counter() - t0:.1f} s)")
    say(f"batch done: {len(jobs) - failed} written, {failed} failed, {len(errors)} bad line(s)")
    if world.rank != 0:
        return 0  # rank 0 may still be writing; msrun ends every worker as soon as one exits non-zero
    return 0 if not failed and not errors else 1
