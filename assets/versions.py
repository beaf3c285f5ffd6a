"""Content hashes and run cards as Dagster sees them: the pure code is pipelines.versions (shared with the
command line, so both doors compute the same versions); this module turns a card into metadata."""

from __future__ import annotations

from typing import Any

import dagster as dg

from pipelines.versions import (  # re-exported: the assets, checks, sensors and tests import them from here
    HASH_CACHE,
    RAW_SUFFIXES,
    HashCache,
    code_version,
    combined_hash,
    content_hash,
    current_version,
    raw_file_hashes,
    raw_file_states,
    stage_card,
    stage_code_version,
    versioned_files,
)

__all__ = ["HASH_CACHE", "RAW_SUFFIXES", "HashCache", "card_metadata", "code_version", "combined_hash",
           "content_hash", "current_version", "raw_file_hashes", "raw_file_states", "stage_card",
           "stage_code_version", "versioned_files"]


def card_metadata(card: dict[str, Any]) -> dict[str, Any]:
    """A stage card (pipelines.versions.stage_card) as materialisation metadata.

    Hashes are flat text entries so the UI lists them side by side per materialisation; the values are one
    JSON entry to read what exactly changed between two runs."""
    metadata: dict[str, Any] = {
        "run_card/params_hash": card["params_hash"],
        "run_card/params": dg.MetadataValue.json(card["params"]),
    }
    for name, version in card["inputs"].items():
        metadata[f"run_card/input/{name}"] = version
    metadata["run_card/libraries"] = dg.MetadataValue.json(card["libraries"])
    return metadata
