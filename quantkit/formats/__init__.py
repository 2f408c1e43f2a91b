"""Reading quantized checkpoints back: every format quantkit verifies (GPTQ from any tool, AWQ, compressed-tensors,
bitsandbytes, FP8, GGUF) presented as the unquantized model's tensors, each quantized Linear dequantized in pure
torch when it is read. One module per format holds that format's math and its settings' checks; `view.py` is the
checkpoint view the loaders and the streamed evaluation read from; `registry.py` detects a format from the files."""
