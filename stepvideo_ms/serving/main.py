"""Command line of the model servers (api/call_remote_server.py is a thin wrapper of `main`).

    python api/call_remote_server.py --model_dir DIR --enable_llm True            # caption, port 5000
    python api/call_remote_server.py --model_dir DIR --enable_vae True            # VAE, port 5001
    python api/call_remote_server.py --model_dir DIR                              # both, port 5000

With neither flag both models load (upstream's behaviour); `--enable_X True/False` picks. Both
in one process share one device, one queue and one port (5000 unless --port): the printed
--caption_url and --vae_url are then the same address. When ready the server prints the exact
arguments to pass to run_parallel.py. It listens on 127.0.0.1 unless --host says otherwise; give
--auth_token (or set STEPVIDEO_AUTH_TOKEN) before listening on other interfaces: every request,
/health included, must then carry `Authorization: Bearer TOKEN` (the client reads the same variable).
Stop it with Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
from typing import List, Optional

from . import protocol
from .limits import MIB, Limits

TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off")


def str2bool(text: str) -> bool:
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    d = Limits()
    p = argparse.ArgumentParser(description="Step-Video caption (Step-1 + HunyuanCLIP) and VAE model server")
    p.add_argument("--model_dir", required=True, help="the downloaded model directory")
    p.add_argument("--enable_llm", type=str2bool, default=None, help="serve /caption-api (True/False)")
    p.add_argument("--enable_vae", type=str2bool, default=None, help="serve /vae-api and /vae-encode-api (True/False)")
    p.add_argument("--llm_dir", default="step_llm", help="Step-1 folder inside model_dir")
    p.add_argument("--clip_dir", default="hunyuan_clip", help="HunyuanCLIP folder inside model_dir")
    p.add_argument("--vae_dir", default="vae", help="VAE folder inside model_dir")
    p.add_argument("--vae_tile", type=int, default=None,
                   help="decode in spatial tiles of N x N latent positions (16N x 16N pixels; same frames, less memory)")
    p.add_argument("--vae_budget_gb", type=float, default=None,
                   help="decode in tiles only when the untiled decode is predicted not to fit this many GiB")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=None,
                   help=f"default {protocol.DEFAULT_CAPTION_PORT} (caption, or both), {protocol.DEFAULT_VAE_PORT} "
                        "(VAE alone); 0 picks a free port")
    p.add_argument("--device", default=None,
                   help="Ascend, CPU or ascend-sim (default: $STEPVIDEO_DEVICE, else Ascend when present)")
    p.add_argument("--device_id", type=int, default=None, help="device index (default $DEVICE_ID or 0)")
    p.add_argument("--auth_token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' on every request (default ${protocol.AUTH_ENV})")
    p.add_argument("--max_body_mb", type=float, default=d.max_body_bytes / MIB, help="request body cap in MiB")
    p.add_argument("--queue_size", type=int, default=d.queue_size, help="requests that may wait for the device")
    p.add_argument("--queue_wait_s", type=float, default=d.queue_wait_s, help="longest wait for the device")
    p.add_argument("--max_connections", type=int, default=d.max_connections, help="concurrent connections")
    p.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--verbose", action="store_true", help="keep MindSpore's warnings (default: errors only)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Which services, which port, which token; every path checked before MindSpore is imported."""
    if args.enable_llm is None and args.enable_vae is None:
        args.enable_llm = args.enable_vae = True
    args.enable_llm, args.enable_vae = bool(args.enable_llm), bool(args.enable_vae)
    if not (args.enable_llm or args.enable_vae):
        raise SystemExit("call_remote_server: nothing to serve: pass --enable_llm True and/or --enable_vae True")
    if not os.path.isdir(args.model_dir):
        raise SystemExit(f"call_remote_server: --model_dir {args.model_dir} is not a directory")
    wanted = ([args.llm_dir, args.clip_dir] if args.enable_llm else []) + ([args.vae_dir] if args.enable_vae else [])
    for sub in wanted:
        if not os.path.isdir(os.path.join(args.model_dir, sub)):
            raise SystemExit(f"call_remote_server: {os.path.join(args.model_dir, sub)} is not a directory "
                             "(check --model_dir and the --llm_dir/--clip_dir/--vae_dir names)")
    if args.vae_tile is not None and args.vae_budget_gb is not None:
        raise SystemExit("call_remote_server: give --vae_tile or --vae_budget_gb, not both")
    if args.vae_tile is not None and args.vae_tile < 1:
        raise SystemExit(f"call_remote_server: --vae_tile {args.vae_tile} must be >= 1 (latent positions)")
    if args.vae_budget_gb is not None and not args.vae_budget_gb > 0:
        raise SystemExit(f"call_remote_server: --vae_budget_gb {args.vae_budget_gb} must be positive")
    if args.port is None:
        args.port = protocol.DEFAULT_CAPTION_PORT if args.enable_llm else protocol.DEFAULT_VAE_PORT
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"call_remote_server: --port {args.port} is not a TCP port")
    args.auth_token = args.auth_token or os.environ.get(protocol.AUTH_ENV) or None
    return args


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(max_body_bytes=int(args.max_body_mb * MIB), queue_size=args.queue_size,
                  queue_wait_s=args.queue_wait_s, max_connections=args.max_connections)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_problem(host: str, port: int) -> Optional[str]:
    """Why `host:port` cannot be listened on now (the OS's words), or None (port 0 always can)."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"{host} does not resolve: {exc}"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_port_free(host: str, port: int, flag: str = "--port", prog: str = "call_remote_server") -> None:
    problem = port_problem(host, port)
    if problem:
        raise SystemExit(f"{prog}: cannot listen on {host}:{port} ({problem}): another server may hold it; "
                         f"pick another {flag}")


def public_url(host: str, port: int) -> str:
    """The URL clients should use: the listening address, or this machine's name for a wildcard."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def ready_lines(args: argparse.Namespace, url: str, runtime_info: dict) -> List[str]:
    names = (["caption (Step-1 + HunyuanCLIP)"] if args.enable_llm else []) + (["vae"] if args.enable_vae else [])
    flags = ([f"--caption_url {url}"] if args.enable_llm else []) + ([f"--vae_url {url}"] if args.enable_vae else [])
    return [f"stepvideo_ms server ready: {', '.join(names)} on {runtime_info['device']}:{runtime_info['device_id']} "
            f"({runtime_info['dtype']}), listening on {url}" + (" (token required)" if args.auth_token else ""),
            "pass to run_parallel.py: " + " ".join(flags)]


def fit_decode_to_card(services: dict, device: str, log) -> None:
    """Neither --vae_tile nor --vae_budget_gb: on an Ascend card, the decode gets what the card has left
    once it holds the loaded weights and the runtime reserve (tiles when an untiled decode is predicted
    not to fit: 51.6 GiB for one 544x992 chunk in bf16), so that a video is not lost to an out-of-memory
    error at its very end. On CPU: untiled, as before."""
    from ..parallel.card_memory import left_on_card

    held = sum(service.weight_bytes() for service in services.values())
    budget, why = left_on_card(device, held)
    if budget is None:
        if why:
            log.warning("%s: the VAE decodes untiled; pass --vae_budget_gb or --vae_tile to tile it", why)
        return
    if budget <= 0:
        raise SystemExit(f"call_remote_server: this card's memory is taken by the weights ({held / 2 ** 30:.1f} GiB) "
                         f"and the runtime reserve, leaving nothing for the VAE decode: serve the VAE alone "
                         f"(--enable_llm False) or on a larger card")
    services["vae"].vae.set_decode_tiling(None, budget)
    log.info("VAE decode: in tiles when predicted over %.2f GiB (what this card has left)", budget)


def main(argv: Optional[List[str]] = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    limits = limits_from(args)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("stepvideo_ms.serving")
    if not is_loopback(args.host) and not args.auth_token:
        log.warning("listening on %s without a token: anyone who reaches this port can use the device; "
                    "pass --auth_token or set %s", args.host, protocol.AUTH_ENV)

    check_port_free(args.host, args.port)  # before minutes of model loading, not after
    from .. import runtime
    from .device_queue import DeviceQueue
    from .server import ServerState, make_server
    from .services import CaptionService, VaeService

    rt = runtime.init(args.device, args.device_id)
    runtime_info = {"device": rt.device, "device_id": rt.device_id,
                    "dtype": str(rt.compute_dtype).lower()}
    services = {}
    if args.enable_llm:
        services["caption"] = CaptionService.load(args.model_dir, args.llm_dir, args.clip_dir)
    if args.enable_vae:
        services["vae"] = VaeService.load(os.path.join(args.model_dir, args.vae_dir), tile_size=args.vae_tile,
                                          budget_gb=args.vae_budget_gb)
    if "vae" in services and args.vae_tile is None and args.vae_budget_gb is None:
        fit_decode_to_card(services, rt.device, log)
    queue = DeviceQueue(limits.queue_size, limits.queue_wait_s, name=f"{rt.device}{rt.device_id}")
    state = ServerState(services, queue, limits, args.auth_token, runtime_info)
    server = make_server(state, args.host, args.port)
    url = public_url(args.host, server.port)

    def _stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    for line in ready_lines(args, url, runtime_info):
        print(line, flush=True)
    try:
        server.serve_forever()  # returns on Ctrl-C or SIGTERM
    finally:
        queue.close()
        log.info("server on %s stopped", url)
    return 0
