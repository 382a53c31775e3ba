"""stepvideo_ms: a MindSpore port of Step-Video-T2V and Step-Video-TI2V."""

__version__ = "0.1.0"
