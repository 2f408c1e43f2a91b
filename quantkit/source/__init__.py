"""Stage 1, what quantkit reads: a base checkpoint (config.json and safetensors shards, found in a folder or the hub
cache), its empty transformers skeleton, calibration and evaluation text, and GGUF headers. Everything read
here is untrusted input and is checked before use."""
