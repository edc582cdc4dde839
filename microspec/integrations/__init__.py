"""microspec inside other frameworks' workflows.

    transformers.py   `microspec_generate`: `model.generate(..., custom_generate=microspec_generate)`
"""
from .transformers import SpecGenerateOutput, microspec_generate

__all__ = ["SpecGenerateOutput", "microspec_generate"]
