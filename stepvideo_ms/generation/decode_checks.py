"""The in-process VAE's decode, checked before anything loads: --vae_tile / --vae_budget_gb as given, and
the tile an in-process VAE would take for a budget (`tile_chooser`), which checks.fit_local_decode and the
planner's `expected_decode_tile` use for rank 0's card after the DiT."""
from __future__ import annotations

import os


def check_vae_tiling(args, settings) -> None:
    """--vae_tile / --vae_budget_gb: for an in-process VAE only, one of them, and (a budget) predicted to be
    reachable with some tile at this video size, before anything loads."""
    from ..diffusion.backends import is_local

    tile, budget = getattr(args, "vae_tile", None), getattr(args, "vae_budget_gb", None)
    if tile is None and budget is None:
        return
    if not is_local(args.vae_url):
        raise ValueError("--vae_tile/--vae_budget_gb tile the in-process VAE (--vae_url local); a VAE server takes "
                         "them on its own command line (api/call_remote_server.py --vae_tile N / --vae_budget_gb X)")
    if tile is not None and budget is not None:
        raise ValueError("give --vae_tile or --vae_budget_gb, not both")
    if tile is not None and tile < 1:
        raise ValueError(f"--vae_tile {tile} must be >= 1 (latent positions, 16x16 pixels each)")
    if budget is not None:
        if not budget > 0:
            raise ValueError(f"--vae_budget_gb {budget:g} must be positive (GiB)")
        try:
            tile_chooser(args, settings)(budget * 2 ** 30)
        except ValueError as err:
            raise ValueError(f"--vae_budget_gb: {err}") from None


def local_decode_tile_for(args, settings):
    """For an in-process VAE (--vae_url local) that neither --vae_tile nor --vae_budget_gb tiles: its
    `tile_chooser`; None otherwise."""
    from ..diffusion.backends import is_local

    if not is_local(args.vae_url) or args.vae_tile is not None or args.vae_budget_gb is not None:
        return None
    return tile_chooser(args, settings)


def tile_chooser(args, settings):
    """The in-process VAE's choice of tile for a decode budget in bytes (None: untiled; ValueError when none
    fits) at this video's latent size, from --model_dir's vae/ config and the device's dtype."""
    import json

    import mindspore as ms

    from ..models.vae_config import CONFIG_FILE, SPATIAL_COMPRESSION, VAEConfig
    from ..models.vae_tiled import choose_tile
    from ..runtime import dtype_for, pick_device

    cfg_path = os.path.join(args.model_dir, "vae", CONFIG_FILE)
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, "r", encoding="utf-8") as fh:
            cfg = json.load(fh)
    config = VAEConfig.from_dict(cfg)
    rows, cols = settings.height // SPATIAL_COMPRESSION, settings.width // SPATIAL_COMPRESSION
    dtype_bytes = 4 if dtype_for(pick_device(args.device)) == ms.float32 else 2
    return lambda budget_bytes: choose_tile(config, rows, cols, dtype_bytes, budget_bytes)
