"""Start the Step-Video caption server and/or VAE server (see stepvideo_ms/serving/main.py).

    python api/call_remote_server.py --model_dir DIR --enable_llm True --enable_vae False
    python api/call_remote_server.py --model_dir DIR --enable_llm False --enable_vae True

Tensors travel as safetensors (never pickle); the server listens on 127.0.0.1 by default.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stepvideo_ms.console import quiet_process  # noqa: E402

quiet_process()  # before MindSpore is imported: it reads its log level once

from stepvideo_ms.serving.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
