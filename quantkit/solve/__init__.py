"""Stage 3, the math: GPTQ and GPTAQ on one weight matrix and its Hessian, and the uniform grids it rounds to.
Pure functions on tensors: no files, no modules, no models."""
