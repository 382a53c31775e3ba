"""A loaded generation world: every rank's DiT stage, the mesh and its communicator, and rank 0's
text encoders and VAE (servers or in-process), kept for many videos.

`GenerationWorld.start` pays the load once; `run_job` makes one video and must be called by every
rank with the same Job. It is the one sequence that makes a video, in every mode: a single
`--prompt` run is a one-job run, the batch run reads the same file on every rank, the service
broadcasts each job with `broadcast_json`. A job that fails on rank 0 before the denoising loop (a caption
server error, an unreadable image) is skipped by every rank together, and the world stays usable.
"""
from __future__ import annotations

import json
import os
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
        from ..formats.checkpoint import read_config
        from ..parallel import init_world, load_stage, make_communicator
        from .checks import check_fits, device_memory_gib, mesh_from, world_size_from_env

        rt = runtime.init(args.device)
        card_gb = device_memory_gib(rt.device) if args.card_gb is None else None  # given: validated already
        if card_gb:
            for settings in fit:
                check_fits(card_gb, mesh_from(args, world_size_from_env(), 0), read_config(transformer), settings,
                           rt.device)
        world_size, rank = init_world()
        mesh = mesh_from(args, world_size, rank)
        comm = make_communicator(mesh)
        progress = not args.no_progress and rank == 0
        if rank == 0:
            for note in notes:
                print(f"[run_parallel] {note}", flush=True)
            print(f"[run_parallel] {headline}world {world_size} = "
                  + (f"cfg {mesh.cfg_degree} x " if mesh.cfg_degree > 1 else "")
                  + f"ulysses {mesh.ulysses_degree} x pp {mesh.pp_degree}"
                  + (", sharded weights" if mesh.shard_weights else "")
                  + f"; device {rt.device}, compute dtype {rt.compute_dtype}", flush=True)
        text = vae = None
        ok = True
        t0 = time.perf_counter()  # the load paid once: encoders and VAE (rank 0) and the DiT stage
        try:
            if rank == 0:
                if before_load is not None:
                    before_load()
                text, vae = open_backends(args.model_dir, args.caption_url, args.vae_url, args.auth_token,
                                          need_vae=need_vae, progress=progress)
        except BaseException:
            ok = False
            all_ok(comm, False, rank)
            raise
        if not all_ok(comm, ok, rank):
            raise PeerFailed("rank 0 failed before loading (see its log); stopping this rank")
        model, shards = load_stage(transformer, mesh, dtype=rt.compute_dtype, progress=progress)
        load_s = time.perf_counter() - t0
        scheduler = FlowMatchScheduler.from_dir(os.path.join(args.model_dir, SCHEDULER_DIR))
        pipe = StepVideoPipeline(model, scheduler, text_encoder=text, vae=vae, progress=progress)
        info = {"model_dir": os.path.abspath(args.model_dir), "device": rt.device,
                "parallel": {"world_size": world_size, "cfg_degree": mesh.cfg_degree,
                             "shard_weights": mesh.shard_weights, "ulysses_degree": mesh.ulysses_degree,
                             "pp_degree": mesh.pp_degree,
                             "stages": [[r.start, r.stop] for r in mesh.partition(model.num_layers)]}}
        return cls(args, rt, mesh, comm, model, scheduler, pipe, rank, progress, load_s, info, shards)

    @property
    def task(self) -> str:
        return self.pipe.task

    def run_job(self, job: Job, save_path: str, on_step: Optional[Callable[[int, int], None]] = None,
                extra: Optional[dict] = None) -> Optional[Tuple[Optional[str], Optional[str]]]:
        """Make one video on every rank; rank 0 writes it and returns (mp4, json) ((None, None) for a
        `no_video` job), the others None. Raises JobFailed on rank 0 (and returns None elsewhere) when
        the job cannot be made."""
        from mindspore import Tensor
        from ..console import Waiting
        from ..formats.safetensors_io import save_file_atomic
        from ..parallel import Conditioning, parallel_denoise

        s = job.settings
        timings: Dict[str, float] = {}
        t_start = t0 = time.perf_counter()
        cond, error = None, None
        if self.rank == 0:
            try:
                cond = self.pipe.encode_conditions(s)
            except Exception as exc:  # reported for this job; the world goes on
                error = exc
        if not all_ok(self.comm, error is None, self.rank):
            if self.rank == 0:
                raise JobFailed(f"encoding the prompt or image failed: {type(error).__name__}: {error}") from error
            return None
        cond = broadcast_conditions(self.comm, cond, self.rank)
        timings["encode_s"] = time.perf_counter() - t0
        conditioning = Conditioning(*cond.tensors(self.rt.compute_dtype), cond.motion_score)
        t0 = time.perf_counter()
        latents = parallel_denoise(self.mesh, self.comm, self.model, Tensor(self.pipe.initial_noise(s)), conditioning,
                                   self.scheduler, s.infer_steps, s.time_shift, s.cfg_scale,
                                   progress=self.progress, shards=self.shards,
                                   on_step=on_step if self.rank == 0 else None).asnumpy()
        timings["denoise_s"] = time.perf_counter() - t0
        if self.rank != 0:
            return None
        t0 = time.perf_counter()
        try:
            if job.save_latents:
                save_file_atomic({"latents": latents}, job.save_latents)
                print(f"[run_parallel] latents: {job.save_latents}", flush=True)
            if job.no_video:
                return None, None
            with Waiting("VAE server decoding", live=self.progress):
                frames = self.pipe.decode(latents)
            timings["decode_s"] = time.perf_counter() - t0
            timings["job_s"] = time.perf_counter() - t_start
            record = dict(self.info, timings=dict(timings, load_s=self.load_s), **(extra or {}))
            return self.pipe.write_outputs(frames, s, save_path, job.output_file_name, job.name_suffix, record,
                                           overwrite=getattr(self.args, "overwrite", False))
        except Exception as exc:
            raise JobFailed(f"decoding or writing failed: {type(exc).__name__}: {exc}") from exc
