"""GET /metrics of `run_parallel.py --serve`: the service as Prometheus sees it, in the text format written
by prometheus_client (one registry per service, no process-wide state).

    stepvideo_jobs_accepted_total, _completed_total, _failed_total, _cancelled_total   counters
    stepvideo_jobs_waiting                                  gauge (read from the board when scraped)
    stepvideo_job_stage_seconds{stage=encode|denoise|decode|write}   histogram, per job
    stepvideo_denoise_step_seconds                          histogram, per denoising step
    stepvideo_service_info{version, mindspore_version, device, layout, task}

Counters start at 0 with each start of the service (Prometheus' rate() takes resets in its stride).
"""
from __future__ import annotations

import time
from typing import Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "stepvideo"
STAGES = ("encode", "denoise", "decode", "write")
# a tiny test job's stage takes 10 ms; a 544x992x204 job's denoise on 8 cards takes 20 min and more
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 2400, 3600, 7200)
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
ENDS = {"done": "completed", "failed": "failed", "cancelled": "cancelled"}


def layout_of(parallel: dict) -> str:
    """world.info["parallel"] as one label: e.g. 'cfg1-ulysses2-pp1' (+ '-shard_weights', '-offload')."""
    text = f"cfg{parallel.get('cfg_degree', 1)}-ulysses{parallel.get('ulysses_degree', 1)}-pp{parallel.get('pp_degree', 1)}"
    return text + "".join(f"-{flag}" for flag in ("shard_weights", "offload") if parallel.get(flag))


class ServiceMetrics:
    def __init__(self, board):
        self.registry = registry = CollectorRegistry()
        self.jobs = {kind: Counter(f"{PREFIX}_jobs_{kind}", f"Jobs {kind} since the service started",
                                   registry=registry)
                     for kind in ("accepted", "completed", "failed", "cancelled")}
        waiting = Gauge(f"{PREFIX}_jobs_waiting", "Jobs waiting in the queue", registry=registry)
        waiting.set_function(lambda: board.counts()["queued"])
        self.stages = Histogram(f"{PREFIX}_job_stage_seconds", "Seconds of each stage of a job (rank 0's clock)",
                                ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        for stage in STAGES:
            self.stages.labels(stage=stage)  # every stage shows from the start, at 0
        self.steps = Histogram(f"{PREFIX}_denoise_step_seconds", "Seconds of one denoising step",
                               buckets=STEP_BUCKETS, registry=registry)
        self.info = Info(f"{PREFIX}_service", "The service's version, MindSpore version, device and layout",
                         registry=registry)
        self._step_clock: Optional[float] = None
        board.on_event = self.job_event

    def describe(self, version: str, mindspore_version: str, device: str, task: str, parallel: dict) -> None:
        self.info.info({"version": version, "mindspore_version": mindspore_version, "device": device,
                        "task": task, "layout": layout_of(parallel)})

    def job_event(self, kind: str, _rec=None) -> None:
        """JobBoard.on_event: a job accepted or ended."""
        name = "accepted" if kind == "accepted" else ENDS.get(kind)
        if name:
            self.jobs[name].inc()

    def stage_done(self, stage: str, seconds: float) -> None:
        """world.run_job's on_stage (rank 0): a stage of the running job took `seconds`."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        self.stages.labels(stage=stage).observe(seconds)
        if stage == "encode":
            self._step_clock = time.perf_counter()  # the first step starts now

    def step_done(self, step: int, steps: int) -> None:
        """A denoising step of the running job done (rank 0): its seconds since the previous one."""
        now = time.perf_counter()
        if self._step_clock is not None and step >= 1:
            self.steps.observe(now - self._step_clock)
        self._step_clock = now if step < steps else None

    def exposition(self) -> Tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
