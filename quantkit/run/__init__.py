"""The quantize command's engine: the ordered steps from a base checkpoint to a published quantized one (source ->
calibrate -> solve -> write, one decoder layer at a time), resume after a kill, and the bitsandbytes methods."""
