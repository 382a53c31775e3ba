"""The old spelling of `python -m stepvideo_ms describe` (kept working); the code is in tools/describe.py."""
import sys

if __name__ == "__main__":
    from .tools.describe import main

    sys.exit(main())
