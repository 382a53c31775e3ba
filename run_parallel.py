"""Step-Video generation: `python run_parallel.py ...` on one device, or under msrun for
ulysses x pp parallelism (`msrun --worker_num=4 ... run_parallel.py --ulysses_degree 2 --pp_degree 2 ...`).
See `python run_parallel.py --help` and the README."""
import sys

from stepvideo_ms.console import quiet_process

quiet_process()  # before MindSpore is imported: it reads its log level once

from stepvideo_ms.generation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
