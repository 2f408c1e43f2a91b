"""The smaller commands and their engines: inspect a checkpoint, estimate memory from a config, list and remove
cached models, convert GGUF files into safetensors checkpoints, and write synthetic checkpoints of real shapes."""
