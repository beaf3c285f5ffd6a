"""The deployment end: the merged model (plain Hugging Face folder) and its GGUF files for llama.cpp / Ollama."""

from assets.stage import stage_asset_def
from pipelines.stages import BY_NAME

merged_model = stage_asset_def(BY_NAME["merge"])
gguf_model = stage_asset_def(BY_NAME["export-gguf"])

EXPORT_ASSETS = [merged_model, gguf_model]
