"""Optional upload of the merged model and its GGUF files to the Hugging Face hub (`export.push_to_hub`).

Off by default. The token is read only from the HF_TOKEN environment variable, never from params.yaml or a
file in the project, so it cannot be committed or tracked by DVC. `preflight_push` runs before the export-gguf
stage does any work and fails in one sentence, within `model.hub_timeout_s`, when the token is missing, the hub
is switched off (HF_HUB_OFFLINE) or unreachable.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.base_model import hub_reachable
from pipelines.config import ExportConfig
from pipelines.io import StageError

PROBE_TIMEOUT_S = 10.0  # seconds the reachability probe may take (DNS included)


def preflight_push(cfg: ExportConfig, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """The token, once the push is known to be possible; StageError (one sentence) otherwise."""
    from huggingface_hub import constants

    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise StageError("export.push_to_hub is true but the HF_TOKEN environment variable is empty; export a "
                         "write token (HF_TOKEN=hf_...) or set export.push_to_hub: false in params.yaml")
    if constants.HF_HUB_OFFLINE:
        raise StageError("export.push_to_hub is true but HF_HUB_OFFLINE is set; unset it or set "
                         "export.push_to_hub: false in params.yaml")
    if not hub_reachable(constants.ENDPOINT, timeout_s):
        raise StageError(f"export.push_to_hub is true but the Hugging Face hub ({constants.ENDPOINT}) did not answer "
                         f"within {timeout_s:g} s; run the stage again when online, or set export.push_to_hub: false")
    return token


def push(cfg: ExportConfig, folders: list[Path]) -> str:
    """Create `export.hub_repo_id` (private unless hub_private is false) and upload the merged folder at the
    repository root and every further folder under its own name; returns the repository URL."""
    from huggingface_hub import HfApi

    token = preflight_push(cfg)
    api = HfApi(token=token)
    url = api.create_repo(cfg.hub_repo_id, private=cfg.hub_private, exist_ok=True, repo_type="model")
    for i, folder in enumerate(folders):
        api.upload_folder(repo_id=cfg.hub_repo_id, folder_path=str(folder),
                          path_in_repo=None if i == 0 else folder.name, ignore_patterns=[".*"],  # run records
                          commit_message=f"finetune-factory: upload {folder.name}")
    return str(url)
