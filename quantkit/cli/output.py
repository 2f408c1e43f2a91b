"""What the commands print besides their results: the libraries whose log lines are silenced."""
from __future__ import annotations

import logging

# Libraries that log at import or load time about things that do not concern the user: torchao (pulled in by
# transformers when gptqmodel is installed) about its CUDA-only .so files and enum registrations, the others about
# loading details quantkit reports itself.
NOISY_LOGGERS = ("transformers", "accelerate", "huggingface_hub", "datasets", "gptqmodel", "optimum", "tokenicer",
                 "torchao", "torch.utils._pytree")


def silence_libraries() -> None:
    """Only errors from the libraries in NOISY_LOGGERS."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def silence_model_loading() -> None:
    """silence_libraries, and transformers' own warnings and progress bars while models load (verify reports what
    it loaded itself)."""
    silence_libraries()
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
