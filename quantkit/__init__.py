"""quantkit: GPTQ quantization of Hugging Face causal LMs, one decoder layer in memory at a time."""
__version__ = "0.1.0"
