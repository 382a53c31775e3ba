"""stepvideo_ms: a MindSpore port of Step-Video-T2V and Step-Video-TI2V.

    from stepvideo_ms import StepVideoPipeline
    pipe = StepVideoPipeline.from_pretrained("models/stepvideo-t2v")
"""

__version__ = "0.1.0"
__all__ = ["StepVideoPipeline", "GenerationSettings"]


def __getattr__(name):  # lazy: `import stepvideo_ms` stays cheap (no MindSpore) for the command lines
    if name == "StepVideoPipeline":
        from .diffusion.pipeline import StepVideoPipeline
        return StepVideoPipeline
    if name == "GenerationSettings":
        from .diffusion.settings import GenerationSettings
        return GenerationSettings
    raise AttributeError(f"module 'stepvideo_ms' has no attribute {name!r}")
