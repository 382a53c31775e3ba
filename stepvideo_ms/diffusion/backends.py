"""The text encoders and the VAE in this process, behind the same methods as the HTTP client
(`caption`, `vae_decode`, `vae_encode`), so the pipeline runs with either; and `open_backends`, the
one place that turns a caption/VAE address (a server URL, or LOCAL for this process) into one."""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

LOCAL = "local"  # --caption_url local / --vae_url local: load the model into this process


class InProcessBackends:
    """`loaders` ("in turn", one card holding everything in turn): {"caption_encoder"/"vae": a function
    loading it}; such a model is loaded for each call and released after it, so that it never sits on
    the card beside the DiT's working set (each video reads its weights again)."""

    def __init__(self, caption_encoder=None, vae=None, progress: bool = True, loaders: Optional[dict] = None):
        self.caption_encoder = caption_encoder
        self.vae = vae
        self.progress = progress
        self.loaders = dict(loaders or {})
        self.loads = 0  # models loaded in turn (tests)

    @classmethod
    def from_model_dir(cls, model_dir: str, llm_dir: str = "step_llm", clip_dir: str = "hunyuan_clip",
                       vae_dir: str = "vae", progress: bool = True, caption: bool = True,
                       vae: bool = True, in_turn: bool = False, vae_tile=None,
                       vae_budget_gb: Optional[float] = None) -> "InProcessBackends":
        """Load the caption encoders and/or the VAE (`caption`, `vae` pick) of a released model directory
        (with `in_turn`, only when each is used, and released after). vae_tile / vae_budget_gb: the VAE
        decodes in spatial tiles, always or when predicted not to fit (`AutoencoderKL.set_decode_tiling`)."""
        from ..models.caption import CaptionEncoder
        from ..models.vae import AutoencoderKL

        loaders = {}
        if caption:
            loaders["caption_encoder"] = lambda: CaptionEncoder.from_model_dir(
                model_dir, llm_dir=llm_dir, clip_dir=clip_dir, progress=progress)
        if vae:
            def load_vae():
                model = AutoencoderKL.from_pretrained(os.path.join(model_dir, vae_dir), progress=progress)
                model.set_decode_tiling(vae_tile, vae_budget_gb)
                return model

            loaders["vae"] = load_vae
        if in_turn:
            return cls(None, None, progress, loaders)
        return cls(*(loaders[k]() if k in loaders else None for k in ("caption_encoder", "vae")), progress)

    def _run(self, name: str, what: str, call):
        model = getattr(self, name)
        if model is not None:
            return call(model)
        if name not in self.loaders:
            raise RuntimeError(f"no {what} loaded in this process")
        model = self.loaders[name]()
        self.loads += 1
        try:
            return call(model)
        finally:
            del model
            _release()

    def caption(self, prompts: Sequence[str]) -> Dict[str, np.ndarray]:
        return self._run("caption_encoder", "caption encoder", lambda enc: enc.encode(list(prompts)))

    def vae_decode(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae", "VAE", lambda vae: vae.decode_numpy(latents, progress=self.progress))

    def vae_encode(self, frames: np.ndarray, seed: int = 0, sample: bool = True) -> np.ndarray:
        if self.vae is None and "vae" in self.loaders:
            return self._run("vae", "VAE", lambda vae: vae.encode_numpy(frames, seed=seed, sample=sample,
                                                                        progress=self.progress))
        if self.vae is None:
            raise RuntimeError("no VAE loaded in this process")
        return self.vae.encode_numpy(frames, seed=seed, sample=sample, progress=self.progress)


def _release() -> None:
    """A model used in turn is garbage now; on Ascend its memory goes back to the device."""
    import gc

    gc.collect()
    from ..runtime import is_ascend, is_simulated

    if is_ascend() and not is_simulated():  # pragma: no cover - needs an NPU
        import mindspore as ms

        ms.runtime.empty_cache()


MODEL_FOLDER = ("transformer/ (config.json and the DiT's safetensors shards), step_llm/, hunyuan_clip/, vae/ "
                "and scheduler/")


def model_folders_in(folder: str, parts: Sequence[str]) -> list:
    """The sub-folders of `folder` that hold every one of `parts` (model folders one level down)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names
            if all(os.path.exists(os.path.join(folder, n, p)) for p in parts)]


def model_folder_problem(model_dir: str, parts: Sequence[str], flag: str = "--model_dir") -> Optional[str]:
    """None when `model_dir` holds every one of `parts` (paths inside a model folder); else a message that
    says what a model folder holds and names the model folders inside `model_dir` when it is one level up."""
    missing = [p for p in parts if not os.path.exists(os.path.join(model_dir, p))]
    if not missing:
        return None
    looked = os.path.join(model_dir, missing[0])
    inside = model_folders_in(model_dir, parts)
    if inside:
        return (f"{flag} {model_dir} is a folder of models, not a model (no {looked}): pass one of "
                + ", ".join(inside))
    return (f"{flag} {model_dir} is not a model folder: no {looked}; a model folder (as downloaded) holds "
            f"{MODEL_FOLDER}")


def is_local(url: Optional[str]) -> bool:
    return url is None or str(url).strip().lower() == LOCAL


def check_local_dirs(model_dir: str, caption_url: Optional[str], vae_url: Optional[str]) -> None:
    """The folders an in-process encoder or VAE will read, checked before any weight is."""
    wanted = ((["step_llm", "hunyuan_clip"] if is_local(caption_url) else []) +
              (["vae"] if is_local(vae_url) else []))
    for sub in wanted:
        if not os.path.isdir(os.path.join(model_dir, sub)):
            raise ValueError(f"{os.path.join(model_dir, sub)} is not a directory: the in-process "
                             f"{'VAE' if sub == 'vae' else 'caption encoder'} needs it (or give a server URL)")


def open_backends(model_dir: str, caption_url: Optional[str], vae_url: Optional[str], token: Optional[str] = None,
                  need_vae: bool = True, progress: bool = True, in_turn: bool = False, vae_tile=None,
                  vae_budget_gb: Optional[float] = None) -> Tuple[object, Optional[object]]:
    """(text encoder, VAE): HTTP clients for server URLs (checked with /health), in-process models for
    None or LOCAL. `need_vae=False` skips the VAE (no decode and no image to encode)."""
    from ..serving.client import RemoteClient

    text = vae = None
    if not is_local(caption_url):
        text = RemoteClient.for_caption(caption_url, token=token)
        text.health()
    if need_vae and not is_local(vae_url):
        vae = RemoteClient.for_vae(vae_url, token=token)
        vae.health()
    if text is None or (need_vae and vae is None):
        local = InProcessBackends.from_model_dir(model_dir, progress=progress, caption=text is None,
                                                 vae=need_vae and vae is None, in_turn=in_turn,
                                                 vae_tile=vae_tile, vae_budget_gb=vae_budget_gb)
        text = text or local
        vae = vae or (local if need_vae else None)
    return text, vae
