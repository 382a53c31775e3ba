"""A loaded generation world: every rank's DiT stage, the mesh and its communicator, and rank 0's
text encoders and VAE (servers or in-process), kept for many videos.

`GenerationWorld.start` pays the load once; `run_job` makes one video and must be called by every
rank with the same Job. It is the one sequence that makes a video, in every mode: a single
`--prompt` run is a one-job run, the batch run reads the same file on every rank, the service
broadcasts each job with `broadcast_json`. A job is a unit of failure: whatever it raises while encoding (rank 0: a caption
server error, an unreadable image, non-finite embeddings), denoising (every rank: a value that slipped
through, non-finite latents) or decoding and writing (rank 0: a VAE server error, a full disk) fails that
job alone (JobFailed), and the world stays usable. Only the world itself failing (a rank gone, a
collective failing or never answered) stops the run.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .jobs import Job

SCHEDULER_DIR = "scheduler"


class PeerFailed(RuntimeError):
    """Rank 0 failed; the other ranks stop instead of waiting for it."""


class JobFailed(RuntimeError):
    """This job could not be made; the world is still fine for the next one."""


class InjectedFault(RuntimeError):
    """Raised inside the denoising loop by STEPVIDEO_INJECT_FAULT (tests of job isolation)."""


FAULT_ENV = "STEPVIDEO_INJECT_FAULT"
AGREE_TIMEOUT_S = 300.0  # a failed rank waits this long for the others after the loop (STEPVIDEO_AGREE_TIMEOUT_S)


def broadcast_json(comm, obj, rank: int):
    """Rank 0's JSON-able object on every rank (the others pass None)."""
    from mindspore import Tensor

    if comm.world_size == 1:
        return obj
    data = None
    if rank == 0:
        raw = np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), np.uint8)
        data = Tensor(raw.astype(np.int32))
    out = comm.broadcast(data).asnumpy().astype(np.uint8)
    return json.loads(out.tobytes().decode("utf-8"))


def all_ok(comm, ok: bool, rank: int) -> bool:
    """Rank 0's verdict on every rank."""
    from mindspore import Tensor

    if comm.world_size == 1:
        return ok
    flag = comm.broadcast(Tensor(np.array([1.0 if ok else 0.0], np.float32)) if rank == 0 else None)
    return float(flag.asnumpy()[0]) == 1.0


def broadcast_conditions(comm, cond, rank: int):
    """Rank 0's Conditions on every rank (the others pass None)."""
    from mindspore import Tensor
    from ..diffusion.pipeline import Conditions

    local = cond.arrays() if rank == 0 else {}
    flags = np.zeros(2, np.float32)
    if rank == 0:
        flags[:] = [cond.condition is not None, -1.0 if cond.motion_score is None else cond.motion_score]
    flags = comm.broadcast(Tensor(flags) if rank == 0 else None).asnumpy()
    has_condition, motion = bool(flags[0]), (None if flags[1] < 0 else float(flags[1]))
    names = ("y", "y_mask", "clip_embedding") + (("condition",) if has_condition else ())
    arrays = {name: comm.broadcast(Tensor(local[name]) if rank == 0 else None).asnumpy() for name in names}
    return Conditions(arrays["y"], arrays["y_mask"], arrays["clip_embedding"], arrays.get("condition"), motion)


def any_rank(comm, mesh, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (a stop request seen by one rank)."""
    from mindspore import Tensor

    if comm.world_size == 1:
        return flag
    mine = Tensor(np.array([1 if flag else 0], np.int32))
    return bool(comm.all_gather(mine, tuple(range(mesh.world_size))).asnumpy().max())


@dataclass
class GenerationWorld:
    args: object
    rt: object
    mesh: object
    comm: object
    model: object
    scheduler: object
    pipe: object
    rank: int
    progress: bool
    load_s: float
    info: Dict[str, object] = field(default_factory=dict)
    shards: object = None  # this rank's block slices with --shard_weights (parallel.load_stage)

    @classmethod
    def start(cls, args, task: str, transformer: str, before_load: Optional[Callable[[], None]] = None,
              need_vae: bool = True, headline: str = "", notes: Sequence[str] = (),
              fit: Sequence[object] = ()) -> "GenerationWorld":
        """Runtime, world, mesh; rank 0 says `notes` and the world line (prefixed by `headline`), runs
        `before_load` (e.g. binds a port) and opens the encoders and (if `need_vae`) the VAE, all before
        the DiT loads; every rank loads its DiT stage. Without --card_gb, the settings in `fit` are checked
        against the card's own memory (when the device reports it) before anything loads."""
        from .. import runtime
        from ..diffusion.backends import open_backends
        from ..diffusion.pipeline import StepVideoPipeline
        from ..diffusion.scheduler import FlowMatchScheduler
        from ..parallel import init_world, load_stage, make_communicator
        from ..parallel.card_memory import CARD_REPORTS, device_memory_gib
        from ..formats.checkpoint import read_config
        from .checks import check_layout_for, fit_local_decode, mesh_from, weights_of

        rt = runtime.init(args.device)
        world_size, rank = init_world()
        card_gb = args.card_gb  # given: validated already; else the card's own, known once initialized
        if card_gb is None and fit:
            card_gb, unchecked = device_memory_gib(rt.device)
            if unchecked and rank == 0:
                print(f"[run_parallel] note: {unchecked}: the settings are not checked against the card's memory; "
                      "pass --card_gb to check them", flush=True)
            for settings in fit if card_gb else ():
                try:
                    check_layout_for(args, settings, transformer, world_size, card_gb, rt.device)
                except ValueError as exc:
                    raise ValueError(f"{CARD_REPORTS.format(gib=card_gb)}: {exc}") from None
        if card_gb and need_vae and fit:
            fit_local_decode(args, fit[0], transformer, world_size, card_gb, rt.device)
        mesh = mesh_from(args, world_size, rank)
        weights = weights_of(args, read_config(transformer), transformer)  # an int8 folder says so unasked
        comm = make_communicator(mesh)
        progress = not args.no_progress and rank == 0
        if rank == 0:
            for note in notes:
                print(f"[run_parallel] {note}", flush=True)
            print(f"[run_parallel] {headline}world {world_size} = "
                  + (f"cfg {mesh.cfg_degree} x " if mesh.cfg_degree > 1 else "")
                  + f"ulysses {mesh.ulysses_degree} x pp {mesh.pp_degree}"
                  + (", sharded weights" if mesh.shard_weights else "")
                  + (f", {weights} weights" if getattr(args, "weights", None) or weights != "full" else "")
                  + (", blocks offloaded to host memory" if mesh.offload else "")
                  + (", sequential CFG" if mesh.sequential_cfg else "")
                  + (f", token-wise parts in chunks of {mesh.chunk_tokens}" if mesh.chunk_tokens else "")
                  + (", local encoders/VAE in turn" if getattr(args, "local_in_turn", False) else "")
                  + f"; device {rt.device}, compute dtype {rt.compute_dtype}", flush=True)
        text = vae = None
        ok = True
        t0 = time.perf_counter()  # the load paid once: encoders and VAE (rank 0) and the DiT stage
        try:
            if rank == 0:
                if before_load is not None:
                    before_load()
                text, vae = open_backends(args.model_dir, args.caption_url, args.vae_url, args.auth_token,
                                          need_vae=need_vae, progress=progress,
                                          in_turn=getattr(args, "local_in_turn", False),
                                          vae_tile=getattr(args, "vae_tile", None),
                                          vae_budget_gb=getattr(args, "vae_budget_gb", None))
        except BaseException:
            ok = False
            all_ok(comm, False, rank)
            raise
        if not all_ok(comm, ok, rank):
            raise PeerFailed("rank 0 failed before loading (see its log); stopping this rank")
        try:
            model, shards = load_stage(transformer, mesh, dtype=rt.compute_dtype, progress=progress,
                                       weights=getattr(args, "weights", None))
        except Exception:  # the others learn it at their agreement below instead of waiting in the first job
            any_rank(comm, mesh, True)
            raise
        if any_rank(comm, mesh, False):  # an all-gather: every rank has its stage, a shared host map's name can go
            raise PeerFailed("another rank failed to load its DiT stage (see its log); stopping this rank")
        if hasattr(shards, "settle"):
            shards.settle()
        load_s = time.perf_counter() - t0
        scheduler = FlowMatchScheduler.from_dir(os.path.join(args.model_dir, SCHEDULER_DIR))
        pipe = StepVideoPipeline(model, scheduler, text_encoder=text, vae=vae, progress=progress)
        info = {"model_dir": os.path.abspath(args.model_dir), "device": rt.device,
                "parallel": {"world_size": world_size, "cfg_degree": mesh.cfg_degree,
                             "shard_weights": mesh.shard_weights, "offload": mesh.offload,
                             "sequential_cfg": mesh.sequential_cfg, "chunk_tokens": mesh.chunk_tokens,
                             "ulysses_degree": mesh.ulysses_degree,
                             "pp_degree": mesh.pp_degree,
                             "stages": [[r.start, r.stop] for r in mesh.partition(model.num_layers)]},
                "weights": model.weights}
        if mesh.offload:
            info["offload"] = {"host_bytes": shards.nbytes(), "host_copy": shards.copy_kind}
        return cls(args, rt, mesh, comm, model, scheduler, pipe, rank, progress, load_s, info, shards)

    @property
    def task(self) -> str:
        return self.pipe.task

    def run_job(self, job: Job, save_path: str, on_step: Optional[Callable[[int, int], None]] = None,
                extra: Optional[dict] = None, on_stage: Optional[Callable[[str, float], None]] = None
                ) -> Optional[Tuple[Optional[str], Optional[str]]]:
        """Make one video on every rank; rank 0 writes it and returns (mp4, json) ((None, None) for a
        `no_video` job), the others None. Raises JobFailed on rank 0 (and returns None elsewhere) when
        the job cannot be made. `on_stage(stage, seconds)` is told on rank 0 as each stage ends (encode,
        denoise, decode, write: the service's metrics)."""
        from mindspore import Tensor
        from ..console import Waiting
        from ..formats.safetensors_io import save_file_atomic
        from ..diffusion.step_cache import CacheSettings, StepCache
        from ..parallel import Conditioning, parallel_denoise

        s = job.settings
        timings: Dict[str, float] = {}
        t_start = t0 = time.perf_counter()
        cond, error = None, None
        if self.rank == 0:
            try:
                cond = self.pipe.encode_conditions(s)
                cond.check_finite()
            except Exception as exc:  # reported for this job; the world goes on
                error = exc
        if not all_ok(self.comm, error is None, self.rank):
            if self.rank == 0:
                raise JobFailed(f"encoding the prompt or image failed: {type(error).__name__}: {error}") from error
            return None
        cond = broadcast_conditions(self.comm, cond, self.rank)
        timings["encode_s"] = time.perf_counter() - t0
        _tell(on_stage, "encode", timings["encode_s"], self.rank)
        t0 = time.perf_counter()
        latents, error = None, None
        cache = StepCache(CacheSettings.of(s))
        try:  # whatever the loop raises fails this job alone, when every rank agrees afterwards
            conditioning = Conditioning(*cond.tensors(self.rt.compute_dtype), cond.motion_score)
            latents = parallel_denoise(self.mesh, self.comm, self.model, Tensor(self.pipe.initial_noise(s)),
                                       conditioning, self.scheduler, s.infer_steps, s.time_shift, s.cfg_scale,
                                       progress=self.progress, shards=self.shards,
                                       on_step=self._step_callback(s, on_step), cache=cache).asnumpy()
            bad = int(latents.size - np.count_nonzero(np.isfinite(latents)))
            if bad:  # the same on every rank: the latents are identical everywhere
                raise FloatingPointError(f"the denoising gave {bad} non-finite latent value(s) (NaN or inf)")
        except Exception as exc:
            error = exc
            if self.rank != 0:
                print(f"run_parallel.py: rank {self.rank}: denoising failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
        if agree_failed(self.comm, self.mesh, error is not None, self.rank):
            if self.rank == 0:
                why = f"{type(error).__name__}: {error}" if error is not None else "another rank failed (see its log)"
                raise JobFailed(f"denoising failed: {why}") from error
            return None
        timings["denoise_s"] = time.perf_counter() - t0
        _tell(on_stage, "denoise", timings["denoise_s"], self.rank)
        from ..parallel.memory import memory_record, release_working_set

        memory = memory_record(self.rt.device)  # rank 0's, after the loop
        release_working_set(self.rt.device)  # the loop's activations and working blocks, before the VAE decodes
        if self.rank != 0:
            return None
        t0 = time.perf_counter()
        try:
            if job.save_latents:
                save_file_atomic({"latents": latents}, job.save_latents)
                print(f"[run_parallel] latents: {job.save_latents}", flush=True)
            if job.no_video:
                return None, None
            from ..diffusion.backends import is_local

            where = "VAE decoding" if is_local(self.args.vae_url) else "VAE server decoding"
            with Waiting(where, live=self.progress):
                frames = self.pipe.decode(latents)
            timings["decode_s"] = time.perf_counter() - t0
            _tell(on_stage, "decode", timings["decode_s"], self.rank)
            timings["job_s"] = time.perf_counter() - t_start
            record = dict(self.info, timings=dict(timings, load_s=self.load_s), memory=memory, cache=cache.record(),
                          **(extra or {}))
            t0 = time.perf_counter()
            out = self.pipe.write_outputs(frames, s, save_path, job.output_file_name, job.name_suffix, record,
                                          overwrite=getattr(self.args, "overwrite", False))
            _tell(on_stage, "write", time.perf_counter() - t0, self.rank)
            return out
        except Exception as exc:
            raise JobFailed(f"decoding or writing failed: {type(exc).__name__}: {exc}") from exc

    def _step_callback(self, s, on_step: Optional[Callable[[int, int], None]]) -> Callable[[int, int], None]:
        """Called by every rank after each step: the injected fault (tests), then rank 0's progress report,
        which may never fail the job nor leave the other ranks waiting."""
        fault_step = injected_fault_step(s.seed, self.rank)

        def step(i: int, n: int) -> None:
            if fault_step is not None and i == fault_step:
                raise InjectedFault(f"injected fault at step {i} of the job with seed {s.seed} ({FAULT_ENV})")
            if on_step is not None and self.rank == 0:
                try:
                    on_step(i, n)
                except Exception as exc:  # pragma: no cover - a progress report is never worth a job
                    print(f"run_parallel.py: warning: progress report failed: {exc}", file=sys.stderr, flush=True)

        return step


def _tell(on_stage: Optional[Callable[[str, float], None]], stage: str, seconds: float, rank: int) -> None:
    """A stage's time to rank 0's listener; a report is never worth a job."""
    if on_stage is not None and rank == 0:
        try:
            on_stage(stage, seconds)
        except Exception as exc:  # pragma: no cover
            print(f"run_parallel.py: warning: stage report failed: {exc}", file=sys.stderr, flush=True)


def injected_fault_step(seed: int, rank: int) -> Optional[int]:
    """STEPVIDEO_INJECT_FAULT=SEED:STEP[:RANK] makes the denoising loop raise after step STEP in the jobs
    whose seed is SEED, on every rank (or on RANK alone: a world failure), for tests; unset in use."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    if int(parts[0]) != seed or (len(parts) > 2 and int(parts[2]) != rank):
        return None
    return int(parts[1]) if len(parts) > 1 else 1


def agree_failed(comm, mesh, failed: bool, rank: int, timeout_s: Optional[float] = None) -> bool:
    """True on every rank when the job failed on any rank. Every rank calls it once after the denoising
    loop, failed or not: a fault raised by every rank alike (a bad value, non-finite latents, an injected
    fault) meets here and fails the job alone. A rank that failed while the others still wait inside a
    collective of the loop cannot meet them: after `timeout_s` it declares the world broken and exits,
    and msrun ends the other ranks (the service's journal keeps the job for the next start)."""
    if comm.world_size == 1:
        return failed
    timer = None
    if failed:
        limit = float(os.environ.get("STEPVIDEO_AGREE_TIMEOUT_S", AGREE_TIMEOUT_S)) if timeout_s is None else timeout_s
        timer = threading.Timer(limit, _world_broken, (rank, limit))
        timer.daemon = True
        timer.start()
    try:
        return any_rank(comm, mesh, failed)
    finally:
        if timer is not None:
            timer.cancel()


def _world_broken(rank: int, limit: float) -> None:  # pragma: no cover - ends the process
    print(f"run_parallel.py: error: world failure: rank {rank} failed inside the denoising loop and the other "
          f"ranks did not meet it within {limit:g} s; stopping this rank (msrun stops the others)",
          file=sys.stderr, flush=True)
    os._exit(1)
