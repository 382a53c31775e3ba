"""The old spelling of `python -m stepvideo_ms tiny` (kept working); the code is in tools/tiny.py."""
import sys

if __name__ == "__main__":
    from .tools.tiny import main

    sys.exit(main())
