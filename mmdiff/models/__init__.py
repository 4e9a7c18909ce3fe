"""mmdiff.models: the backbone (LLaMA/LLaDA layout + KV cache), sizes, adapters, and the unified model.

Importing this package registers the backbone with transformers' Auto classes, so a saved
backbone loads with ``AutoModel.from_pretrained(dir)`` and no ``trust_remote_code``.
"""

from mmdiff.models.backbone import MDiffConfig, MDiffModel, MDiffOutput, register_auto_classes
from mmdiff.models.kv_cache import KVCache
from mmdiff.models.sizes import SIZES, get_size
from mmdiff.models.unified import MMDiffConfig, MMDiffForDiffusion, register_unified_auto_classes

register_auto_classes()
register_unified_auto_classes()

__all__ = ["MDiffConfig", "MDiffModel", "MDiffOutput", "KVCache", "SIZES", "get_size", "register_auto_classes",
           "MMDiffConfig", "MMDiffForDiffusion"]
