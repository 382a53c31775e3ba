"""The rank loop of `run_parallel.py --serve`.

Every HEARTBEAT_S seconds (or as soon as a job is waiting) the ranks meet: first they agree whether
any of them was asked to stop (SIGTERM or SIGINT; under msrun also msrun, their parent, gone), then rank 0
broadcasts the next job or an idle beat. Each job runs on every rank (world.run_job); rank 0 records
its progress step by step. A job that fails is recorded as failed and the next one runs. Rank 0 keeps
the journal of the jobs in the save folder (journal.py): a restart with the same --save_path lists the
finished jobs again, runs the waiting and interrupted ones and continues the ids.
On a stop request the running job is finished, the waiting ones stay in the journal (they run at the
next start), the HTTP server closes and every rank returns. A failure of the world itself (a rank gone,
a collective failing) stops the service with exit status 1, saying so; its jobs stay in the journal.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Optional

HEARTBEAT_S = 1.0
LOG = logging.getLogger("stepvideo_ms.generation.service")


class StopRequest:
    """Set by SIGTERM/SIGINT, or (`watch_parent`: an msrun rank) when the parent, msrun, is gone; checked
    between jobs. A service started without msrun (nohup, a terminal multiplexer, an init system) outlives
    the shell that started it and runs until it is told to stop."""

    def __init__(self, watch_parent: bool):
        self.parent = os.getppid() if watch_parent else None
        self.event = threading.Event()
        self.reason: Optional[str] = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        self.reason = self.reason or signal.Signals(signum).name
        self.event.set()

    def requested(self) -> bool:
        if not self.event.is_set() and self.parent is not None and os.getppid() != self.parent:
            self.reason = f"parent process {self.parent} ended"
            self.event.set()
        return self.event.is_set()


def run_service(args, world_size: int) -> int:
    from ..checks import validate_model
    from ...serving.limits import Limits
    from ...serving.main import is_loopback
    from ...serving.protocol import AUTH_ENV
    from ...serving.server import BoundedWSGIServer, CannotListen
    from ..jobs import Job, defaults_from
    from ..world import GenerationWorld, JobFailed, any_rank, broadcast_json
    from .app import ServiceState, create_app
    from .board import JobBoard, last_id_in
    from .journal import Journal

    token = args.auth_token or os.environ.get(AUTH_ENV) or None
    if not is_loopback(args.host) and not token:
        raise ValueError(f"--host {args.host} is not loopback: give --auth_token (or set {AUTH_ENV}); every "
                         "request must then carry 'Authorization: Bearer TOKEN'")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0 picks a free one)")
    if args.queue_size < 1:
        raise ValueError(f"--queue_size {args.queue_size} must be at least 1")
    from ...formats.output_names import check_save_folder

    save_path = check_save_folder(args.save_path)
    defaults = defaults_from(args)
    task, transformer = validate_model(args, world_size)
    from ...parallel.comm import launched_by_msrun

    stop = StopRequest(watch_parent=launched_by_msrun())
    limits = Limits()
    uploads = os.path.join(save_path, "uploads")
    # rank 0 gives it the journal before serving; ids go on after the journal's and any job file's
    board = JobBoard(args.queue_size, last_id=last_id_in(save_path, uploads))
    state = ServiceState(board, task, limits, token, uploads, {}, defaults,
                         model_name=os.path.basename(os.path.normpath(args.model_dir)),
                         metrics_public=bool(getattr(args, "metrics_public", False)))
    holder = {}

    def bind():  # rank 0, before any weight: a locked save folder or a taken port fails in seconds
        board.journal = Journal(save_path)
        restored = board.restore(task)
        for note in restored["notes"]:
            print(f"[run_parallel] {note}", flush=True)
        print(f"[run_parallel] journal {board.journal.path}: {restored['resumed']} job(s) to run, "
              f"{restored['listed']} finished listed, next id {restored['next']}", flush=True)
        try:
            holder["server"] = BoundedWSGIServer(args.host, args.port, create_app(state), limits.max_connections,
                                                 limits.socket_timeout_s)
        except (OSError, CannotListen) as exc:  # werkzeug's own text and exit replaced by ours
            raise ValueError(f"--serve cannot listen on {args.host}:{args.port} ({exc.strerror}): another program "
                             "may hold it; pick another --port (0 picks a free one)") from None

    world = GenerationWorld.start(args, task, transformer, before_load=bind)
    rank = world.rank
    server = holder.get("server")
    if rank == 0:
        import time
        state.started = time.time()
        state.info.update(world.info, load_s=round(world.load_s, 2))
        import mindspore
        from ... import __version__
        state.metrics.describe(__version__, mindspore.__version__, world.info["device"], task,
                               world.info["parallel"])
        threading.Thread(target=server.serve_forever, name="generation-service-http", daemon=True).start()
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"[run_parallel] service ready: http://{host}:{server.port}/ ({task}, world {world.mesh.world_size}, "
              f"loaded in {world.load_s:.1f} s)" + (" (token required)" if token else ""), flush=True)
    failure = None
    try:
        while not any_rank(world.comm, world.mesh, stop.requested()):
            rec = board.take(HEARTBEAT_S) if rank == 0 else None
            command = broadcast_json(world.comm, {"id": rec.id, "job": rec.job.to_dict()} if rec else {"id": None},
                                     rank)
            if command["id"] is None:
                continue
            job = rec.job if rank == 0 else Job.from_dict(command["job"])
            on_step = (lambda i, n, r=rec: (board.progress(r, i, n), state.metrics.step_done(i, n))) \
                if rank == 0 else None
            on_stage = state.metrics.stage_done if rank == 0 else None
            try:
                out = world.run_job(job, save_path, on_step=on_step, extra={"job_id": command["id"]},
                                    on_stage=on_stage)
                if rank == 0:
                    board.finish(rec, *out)
                    print(f"[run_parallel] {rec.id} done: {out[0]}", flush=True)
            except JobFailed as exc:  # raised on rank 0 only; the world goes on with the next job
                board.fail(rec, str(exc))
                print(f"run_parallel.py: {rec.id} failed: {exc}", file=sys.stderr, flush=True)
    except Exception as exc:  # the world itself failed: a rank gone, a collective failing
        failure = exc
        print(f"run_parallel.py: error: world failure on rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
    finally:
        if rank == 0:
            waiting = board.close()
            server.shutdown()
            server.server_close()
            kept = (f"{waiting} waiting job(s) kept in the journal: they run at the next start with this "
                    f"--save_path")
            if failure is None and stop.reason:
                print(f"[run_parallel] service stopped ({stop.reason}); {kept}", flush=True)
            else:
                running = board.counts()["running"]
                print(f"[run_parallel] service stopped by a failure of the world; {kept}"
                      + (f"; the interrupted job too ({running})" if running else ""), flush=True)
            board.journal.close()
    return 1 if failure is not None else 0
