"""The old spelling of `python -m stepvideo_ms verify` (kept working); the code is in tools/verify.py."""
import sys

if __name__ == "__main__":
    from .tools.verify import main

    sys.exit(main())
