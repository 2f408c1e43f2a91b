"""quantkit: GPTQ quantization of Hugging Face causal LMs, one decoder layer in memory at a time.

    import quantkit
    result = quantkit.quantize("path/to/model", quantkit.QuantSpec(bits=4, group_size=64))
    print(result.repo_id, result.path)
"""
__version__ = "0.1.0"

from .config import CalibSpec, QuantSpec  # noqa: E402  (light: no torch model code)


def quantize(model, spec=None, calib=None, **kwargs):
    """Quantize MODEL and publish it; see quantkit.pipeline.quantize for the parameters."""
    from .pipeline import quantize as _quantize

    return _quantize(model, spec or QuantSpec(), calib or CalibSpec(), **kwargs)


__all__ = ["CalibSpec", "QuantSpec", "quantize", "__version__"]
