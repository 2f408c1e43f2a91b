"""The verify command's engine: is a quantized checkpoint intact (manifest, headers, GPTQ config against tensors),
can the usual engines run it, and how far is it from its base (perplexity, KL, top-1, generations), with quantkit's
own pure-torch runtime for GPTQ layers."""
