"""Stage 4, what quantkit writes: solver results packed into the GPTQ tensor format, safetensors shards with their
index, the model card and manifest, and the atomic publication of a finished directory into the hub cache."""
