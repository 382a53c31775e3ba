"""Step-Video generation: `python run_parallel.py ...` on one device, or under msrun for
ulysses x pp parallelism (`msrun --worker_num=4 ... run_parallel.py --ulysses_degree 2 --pp_degree 2 ...`).
See `python run_parallel.py --help` and the README."""
import sys

from stepvideo_ms.launch import main

if __name__ == "__main__":
    sys.exit(main())
