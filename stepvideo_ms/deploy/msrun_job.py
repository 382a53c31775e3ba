"""scripts/run_t2v.sh and run_ti2v.sh: one run_parallel.py job under MindSpore's msrun.

What it does, in this order:
1. parses the layout (`--ulysses N --pp M`, any degrees; the card list; `--nnodes`, `--node_rank`,
   `--master_addr`, `--master_port` for several hosts) and the best-practice preset of the task;
2. builds the run_parallel.py arguments and validates them here, once, in this one process, with
   run_parallel.py's own parser and checks (model directory, layout against config.json, sizes,
   image, output folder; on node 0 the servers' /health), so that a mistake ends with status 2 and
   one message before msrun starts a single worker;
3. runs msrun (the one launcher of the world: `--worker_num` = ulysses x pp over all hosts,
   `--local_worker_num` = this host's share) with the project's interpreter first on PATH and
   `python /abs/run_parallel.py ...` as its command, so every worker runs this venv's Python, told
   this host's worker count ($STEPVIDEO_RANKS_PER_HOST: the host memory it plans, parallel/host_memory.py);
4. passes msrun's console through, without its launch echo and MindSpore's
   "Event base dispatch success!" lines, and replaces msrun's own traceback by one line naming
   the worker logs (`--verbose` keeps everything).
The caller's working directory is kept: relative paths mean what the user typed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional

from ..console import PROGRESS_ENV, NoiseFilter, SuggestingParser, live_bars, quiet_environment
from ..parallel.host_memory import RANKS_PER_HOST_ENV
from .msrun_process import MsrunProcess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_PARALLEL = os.path.join(REPO, "run_parallel.py")
DEFAULT_PROMPTS = {"t2v": "一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光", "ti2v": "笑起来"}
PRESETS_OF_TASK = {"t2v": ("t2v", "t2v-turbo"), "ti2v": ("ti2v",)}
MULTI_HOST_PORT = 8118  # msrun's own default; one host picks a free port
MSRUN_FAILURE = "Distributed job exited with exception"
SCHEDULER_FAILED = "Scheduler process"
WORKER_FAILED = "Worker process"


class LaunchError(ValueError):
    """A bad launch argument: exit status 2 with this message."""


class ShortParser(SuggestingParser):
    """An argument error in one line and a pointer to --help, not the whole usage of 40 options."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {self.suggest(message)} ({self.prog} --help lists every option)\n")


def build_parser(task: str) -> argparse.ArgumentParser:
    prog = f"run_{task}.sh"
    p = ShortParser(
        prog=prog, allow_abbrev=False,
        description=f"Step-Video-{task.upper()} with msrun: world = cfg x ulysses x pp workers, over "
        "--nnodes hosts. Every run_parallel.py setting is taken directly (below); arguments after -- go to "
        "run_parallel.py unchanged too.",
        epilog="Two hosts, 16 cards: on each host run the same command with --nnodes 2 --master_addr HOST0 "
               "--ulysses 8 --pp 2 and --node_rank 0 (on HOST0) or 1.")
    p.add_argument("--model_dir", required=True, help="the downloaded model directory")
    p.add_argument("--prompt", default=None, help="the text prompt (required, as run_parallel.py requires it)")
    if task == "ti2v":
        p.add_argument("--first_image_path", required=True, help="the first frame (PNG/JPEG)")
        p.add_argument("--motion_score", type=float, default=None, help="2 steady, 5 default, 10/20 lively")
    p.add_argument("--preset", choices=PRESETS_OF_TASK[task], default=task,
                   help="best-practice steps/cfg/shift (t2v: 50/9/13; t2v-turbo: 15/5/17; ti2v: 50/9/13, motion 5)")
    p.add_argument("--caption_url", default="http://127.0.0.1:5000", help="the caption server")
    p.add_argument("--vae_url", default="http://127.0.0.1:5001", help="the VAE server")
    p.add_argument("--save_path", default=None, help="folder of the MP4 and its JSON (default ./results)")
    p.add_argument("--device", default=None, help="Ascend, CPU or ascend-sim (default: Ascend when present)")
    g = p.add_argument_group("layout")
    g.add_argument("--cfg", type=int, default=None,
                   help="CFG-parallel degree: 2 runs [cond, uncond] on two rank groups (default 1)")
    g.add_argument("--ulysses", type=int, default=None, help="sequence-parallel degree (default 2)")
    g.add_argument("--pp", type=int, default=None, help="pipeline stages (default 2)")
    g.add_argument("--cards", default=None,
                   help="this host's cards, e.g. 0,1,2,3 (ASCEND_RT_VISIBLE_DEVICES; default: the first ones). "
                        "With --cards and none of --cfg/--ulysses/--pp, the world is one worker per card and "
                        "run_parallel.py's planner picks the fastest layout predicted to fit the card size "
                        "(the Ascend card's, or --card_gb after --); --cards 0 runs on one card")
    g.add_argument("--nnodes", type=int, default=1, help="hosts of the job (default 1)")
    g.add_argument("--node_rank", type=int, default=0, help="this host's index, 0 .. nnodes-1")
    g.add_argument("--master_addr", default="127.0.0.1", help="address of host 0 (msrun's scheduler)")
    g.add_argument("--master_port", type=int, default=None,
                   help=f"scheduler port (default: a free port on one host, {MULTI_HOST_PORT} on several)")
    g.add_argument("--log_dir", default="logs/msrun", help="msrun's worker logs (default logs/msrun)")
    p.add_argument("--verbose", action="store_true", help="show msrun's and MindSpore's full output")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="validate and print the command only")
    add_run_parallel_settings(p)
    return p


# run_parallel.py's arguments that this script sets itself, under its own name or as they are
WRAPPER_SETS = {"model_dir", "caption_url", "vae_url", "prompt", "first_image_path", "motion_score", "save_path",
                "device", "verbose", "help"}
LAYOUT_NAMES = {"cfg_degree": "--cfg", "ulysses_degree": "--ulysses", "pp_degree": "--pp"}
OTHER_MODES = {"prompts_file", "serve", "host", "port", "queue_size"}  # run_parallel.py itself runs those


def passed_on(parser=None) -> List[argparse.Action]:
    """run_parallel.py's own arguments that these scripts take directly and pass on unchanged."""
    from ..generation import cli

    return [a for a in (parser or cli.build_parser())._actions
            if a.option_strings and a.dest not in WRAPPER_SETS | OTHER_MODES | set(LAYOUT_NAMES)]


def add_run_parallel_settings(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run_parallel.py settings (passed on as given; python run_parallel.py --help)")
    for action in passed_on():
        kwargs = dict(dest=action.dest, default=argparse.SUPPRESS, help=action.help)
        if action.nargs == 0:  # a flag
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=action.type, metavar=action.metavar, choices=action.choices)
        g.add_argument(*action.option_strings, **kwargs)
    for name, ours in LAYOUT_NAMES.items():  # run_parallel.py's spelling of our layout flags: say ours
        p.add_argument(f"--{name}", dest=f"rp_{name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def given_settings(args) -> List[str]:
    """The run_parallel.py arguments given directly, as run_parallel.py arguments."""
    out = []
    for action in passed_on():
        if action.dest == "auth_token" or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        flag = action.option_strings[0]
        out += [flag] if action.nargs == 0 else [flag, str(value)]
    return out


def caller_flags(message: str) -> str:
    """run_parallel.py's layout names in a message, in these scripts' names (--ulysses_degree 2 -> --ulysses 2)."""
    import re

    message = re.sub(r"--(cfg|ulysses|pp)_degree\b", r"--\1", message)
    message = re.sub(r"(?<![-\w])(cfg|ulysses|pp)_degree=", r"--\1 ", message)
    return re.sub(r"(?<![-\w])(cfg|ulysses|pp)_degree\b", r"--\1", message)


def split_extra(argv: List[str]):
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def take_token(extra: List[str]):
    """-> (extra without `--auth_token X`, X or None): the token travels in the environment, never on a
    command line (msrun echoes its command and writes it to its logs)."""
    rest, token, i = [], None, 0
    while i < len(extra):
        item = extra[i]
        if item == "--auth_token":
            if i + 1 >= len(extra):
                raise LaunchError("--auth_token needs a value (or set STEPVIDEO_AUTH_TOKEN)")
            token, i = extra[i + 1], i + 2
            continue
        if item.startswith("--auth_token="):
            token = item.split("=", 1)[1]
        else:
            rest.append(item)
        i += 1
    return rest, token


def layout(args):
    """-> (world, local workers, card list or None), or LaunchError naming the argument. Sets
    args.auto_layout when the world comes from --cards alone (the planner picks the layout)."""
    args.auto_layout = bool(args.cards) and args.cfg is None and args.ulysses is None and args.pp is None
    if args.auto_layout:
        count = len([c for c in args.cards.split(",") if c.strip()])
        args.cfg, args.ulysses, args.pp = 1, count * args.nnodes, 1  # the world size; the degrees are chosen later
    for name, default in (("cfg", 1), ("ulysses", 2), ("pp", 2)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("cfg", "ulysses", "pp", "nnodes"):
        if getattr(args, name) < 1:
            raise LaunchError(f"--{name} {getattr(args, name)}: must be at least 1")
    world = args.cfg * args.ulysses * args.pp
    if world % args.nnodes:
        raise LaunchError(f"--cfg {args.cfg} x --ulysses {args.ulysses} x --pp {args.pp} = {world} workers do not "
                          f"split evenly over --nnodes {args.nnodes}: make the world a multiple of the host count")
    if not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--node_rank {args.node_rank}: must be in 0..{args.nnodes - 1} for --nnodes {args.nnodes}")
    local = world // args.nnodes
    cards = None
    if args.cards:
        cards = [c.strip() for c in args.cards.split(",") if c.strip()]
        if not all(c.isdigit() for c in cards) or len(set(cards)) != len(cards):
            raise LaunchError(f"--cards {args.cards}: give distinct card numbers separated by commas, e.g. 0,1,2,3")
        if len(cards) != local:
            raise LaunchError(f"--cards {args.cards} lists {len(cards)} cards, but this host runs {local} workers "
                              f"(cfg {args.cfg} x ulysses {args.ulysses} x pp {args.pp} / nnodes {args.nnodes})")
    if args.master_port is not None and not 1024 <= args.master_port <= 65535:
        raise LaunchError(f"--master_port {args.master_port}: must be in 1024..65535")
    return world, local, cards


def run_parallel_args(task: str, args, extra: List[str]) -> List[str]:
    from ..diffusion.settings import PRESETS

    if args.prompt is None:  # as run_parallel.py refuses a run without one: no silent demo prompt
        raise LaunchError(f'--prompt is required: give the text of the video, e.g. --prompt '
                          f'"{DEFAULT_PROMPTS[task]}" (upstream\'s example)')
    extra = given_settings(args) + list(extra)
    given = {item.split("=", 1)[0] for item in extra if item.startswith("--")}
    preset = {k: v for k, v in PRESETS[args.preset].items() if f"--{k}" not in given}  # `-- --infer_steps 30` wins
    if task == "ti2v" and args.motion_score is not None:
        preset["motion_score"] = args.motion_score
    degrees = [] if getattr(args, "auto_layout", False) else [
        "--cfg_degree", str(args.cfg), "--ulysses_degree", str(args.ulysses), "--pp_degree", str(args.pp)]
    out = ["--model_dir", os.path.abspath(args.model_dir), "--caption_url", args.caption_url,
           "--vae_url", args.vae_url, *degrees, "--prompt", args.prompt]
    if task == "ti2v":
        out += ["--first_image_path", os.path.abspath(args.first_image_path)]
    for key, value in preset.items():
        out += [f"--{key}", str(value)]
    if args.save_path:
        out += ["--save_path", os.path.abspath(args.save_path)]
    if args.device:
        out += ["--device", args.device]
    if args.verbose:
        out += ["--verbose"]
    return out + list(extra)


def preflight(rp_argv: List[str], world: int, node_rank: int, servers: bool = True, task: Optional[str] = None,
              cards: Optional[List[str]] = None, local: Optional[int] = None):
    """run_parallel.py's own checks, here, once (argparse errors exit 2 by themselves), for this host's
    `local` workers (default: the whole world); -> its arguments.
    A layout left to the planner without --card_gb is chosen for the size of the first card, read by a
    child process that opens it and exits (this launcher never holds a card)."""
    from ..generation import checks, cli
    from ..serving.client import START_HINT, RemoteClient, RemoteServerError

    rp = cli.build_parser().parse_args(rp_argv)
    rp.worker_env = {RANKS_PER_HOST_ENV: str(local or world)}  # what the workers will see
    if cards:
        rp.probe_env = dict(os.environ, ASCEND_RT_VISIBLE_DEVICES=cards[0], DEVICE_ID="0")
    checks.check_outputs(rp)  # first: needs no MindSpore import, so a bad --save_path fails in a second
    found, _ = checks.validate_model(rp, world)
    if task and found != task:
        raise LaunchError(f"--model_dir {rp.model_dir} holds {found.upper()} weights (use_additional_conditions is "
                          f"{str(found == 'ti2v').lower()} in its transformer/config.json): use "
                          f"{os.path.join(REPO, 'scripts', f'run_{found}.sh')} for them")
    checks.validate(rp, world)
    if node_rank != 0 or not servers:  # only rank 0 (on host 0) talks to the servers
        return rp
    from ..diffusion.backends import is_local

    needed = []  # `local`: loaded by rank 0 itself, nothing to reach
    if not is_local(rp.caption_url):
        needed.append(("caption", RemoteClient.for_caption(rp.caption_url, token=rp.auth_token, retries=0)))
    if (rp.first_image_path or not rp.no_video) and not is_local(rp.vae_url):
        needed.append(("VAE", RemoteClient.for_vae(rp.vae_url, token=rp.auth_token, retries=0)))
    for name, client in needed:
        with client:
            try:
                client.health()
            except RemoteServerError as exc:
                hint = START_HINT.replace("MODEL_DIR", shlex.quote(rp.model_dir))
                raise ServerDown(f"the {name} server does not answer: {exc}".replace(START_HINT, hint)
                                 + ("" if START_HINT in str(exc) else f"; {hint}")) from None
    return rp


class ServerDown(LaunchError):
    """A server is not reachable: a pre-launch mistake like any other (exit status 2)."""


def msrun_command(args, world: int, local: int, rp_argv: List[str]) -> List[str]:
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    if not os.path.isfile(msrun):
        raise LaunchError(f"msrun not found beside {sys.executable}: install mindspore there (scripts/setup.sh)")
    port = args.master_port
    if port is None:
        from ..parallel.msrun import free_port

        port = free_port() if args.nnodes == 1 else MULTI_HOST_PORT
    cmd = [msrun, f"--worker_num={world}", f"--local_worker_num={local}", f"--master_addr={args.master_addr}",
           f"--master_port={port}", f"--log_dir={os.path.abspath(args.log_dir)}", "--join=True"]
    if args.nnodes > 1:
        cmd.append(f"--node_rank={args.node_rank}")
    if not args.verbose:
        cmd.append("--tail_worker_log=0")  # rank 0 reports; every rank's log stays in --log_dir
    # msrun runs `python SCRIPT` for any command that is not literally `python`: give it `python`,
    # with this interpreter's bin first on PATH (see job_environment)
    return cmd + ["python", RUN_PARALLEL, *rp_argv]


def job_environment(args, cards: Optional[List[str]], local: Optional[int] = None) -> dict:
    env = dict(os.environ, **({RANKS_PER_HOST_ENV: str(local)} if local else {}))  # this host's workers
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if cards:
        env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(cards)
    # the workers write to log files that msrun shows here: live bars only if this console is a terminal
    env.setdefault(PROGRESS_ENV, "bars" if live_bars(sys.stdout) else "lines")
    return quiet_environment(args.verbose, env)


def is_this_host(addr: str) -> bool:
    import ipaddress
    import socket

    try:
        ip = socket.gethostbyname(addr)
        if ipaddress.ip_address(ip).is_loopback:
            return True
        return ip in socket.gethostbyname_ex(socket.gethostname())[2]
    except (OSError, ValueError):
        return False


def only_second_scheduler_failed(err_text: str) -> bool:
    """On one machine standing in for several hosts, msrun starts a scheduler on every node whose
    --master_addr is local; all but node 0's fail to bind the port that node 0's holds, while the
    workers (joined to node 0's scheduler) succeed. That failure alone is not the job's."""
    return SCHEDULER_FAILED in err_text and WORKER_FAILED not in err_text


def run_filtered(cmd: List[str], env: dict, verbose: bool, log_dir: str, tolerate_scheduler: bool = False) -> int:
    """msrun with its console passed through NoiseFilter; its own traceback becomes one line. msrun and
    its workers end with this process, on success, failure, Ctrl-C or SIGTERM (msrun_process)."""
    out = NoiseFilter(sys.stdout.buffer, enabled=not verbose)

    def echo_stderr(line: bytes) -> None:
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()

    with MsrunProcess(cmd, env) as job:
        rc = job.run(out.feed, echo_stderr if verbose else None)
    out.close()
    text = b"".join(job.stderr_lines).decode("utf-8", errors="replace")
    if rc != 0 and tolerate_scheduler and only_second_scheduler_failed(text):
        print("msrun: this node's workers succeeded; its own scheduler could not start because node 0's holds "
              "the port on this machine (a one-machine simulation of several hosts)", file=sys.stderr, flush=True)
        return 0
    if not verbose:
        if MSRUN_FAILURE in text and "Traceback (most recent call last)" in text:
            text = text[:text.index("Traceback (most recent call last)")]
        if text.strip():
            sys.stderr.write(text)
    if rc == 130:
        print(f"msrun: the job was stopped (Ctrl-C or SIGTERM); every worker's log is in {log_dir}",
              file=sys.stderr, flush=True)
    elif rc != 0:
        print(f"msrun: the job failed (exit {rc}); every worker's log is in {log_dir}", file=sys.stderr, flush=True)
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--task" or argv[1] not in PRESETS_OF_TASK:
        print("msrun_job: the first arguments must be --task t2v|ti2v (use scripts/run_t2v.sh or run_ti2v.sh)",
              file=sys.stderr)
        return 2
    task, argv = argv[1], argv[2:]
    own, extra = split_extra(argv)
    parser = build_parser(task)
    args = parser.parse_args(own)
    for name, ours in LAYOUT_NAMES.items():
        if hasattr(args, f"rp_{name}"):
            parser.error(f"--{name} is run_parallel.py's name: {parser.prog} takes {ours} N (the world is --cfg x "
                         "--ulysses x --pp)")
    if getattr(args, "auth_token", None):
        extra = ["--auth_token", args.auth_token] + extra  # to the environment, below, never a command line
    quiet_environment(args.verbose)  # before MindSpore is imported by the checks
    prog = parser.prog
    try:
        extra, token = take_token(extra)
        if token:
            from ..serving.protocol import AUTH_ENV

            os.environ[AUTH_ENV] = token  # read by the clients here and in every worker
        world, local, cards = layout(args)
        rp_argv = run_parallel_args(task, args, extra)
        rp = preflight(rp_argv, world, args.node_rank, servers=not args.dry_run, task=task, cards=cards, local=local)
        if args.auto_layout and rp.card_gb is not None and "--card_gb" not in rp_argv:
            # the card size the layout was chosen for: every worker chooses the same, and reads no card for it
            rp_argv += ["--card_gb", f"{rp.card_gb:g}"]
        cmd = msrun_command(args, world, local, rp_argv)
    except ValueError as exc:  # LaunchError (a server down too), run_parallel.py's checks, a checkpoint problem
        print(f"{prog}: error: {caller_flags(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # anything unforeseen: one line, no traceback
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    env = job_environment(args, cards, local)
    shown = ((f"ASCEND_RT_VISIBLE_DEVICES={env['ASCEND_RT_VISIBLE_DEVICES']} " if cards else "")
             + f"{RANKS_PER_HOST_ENV}={local} " + shlex.join(cmd))
    if args.dry_run:
        print(shown)
        return 0
    print(f"[{prog}] {shown}", flush=True)
    second_scheduler = args.node_rank > 0 and is_this_host(args.master_addr)
    return run_filtered(cmd, env, args.verbose, os.path.abspath(args.log_dir), tolerate_scheduler=second_scheduler)


if __name__ == "__main__":
    sys.exit(main())
