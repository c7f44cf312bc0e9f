"""hf_weaknat: a non-autoregressive translator (CTC, or vanilla with length prediction) trained with auxiliary weak AR
decoders, native to transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_weaknat import WeakNATConfig
from .export import export_for_hub, push_export_to_hub, strip_weak_decoders
from .modeling_weaknat import WeakNATForConditionalGeneration, WeakNATModel, WeakNATOutput, WeakNATPreTrainedModel
from .onnx_runtime import ORTWeakNATForConditionalGeneration, export_onnx
from .pipeline_weaknat import WeakNATTranslationPipeline
from .tokenization_weaknat import train_weaknat_tokenizer

__version__ = "0.1.0"

AutoConfig.register("weaknat", WeakNATConfig, exist_ok=True)
AutoModel.register(WeakNATConfig, WeakNATModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(WeakNATConfig, WeakNATForConditionalGeneration, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(
    "weaknat-translation", pipeline_class=WeakNATTranslationPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
)

__all__ = [
    "WeakNATConfig",
    "WeakNATModel",
    "WeakNATForConditionalGeneration",
    "WeakNATOutput",
    "WeakNATPreTrainedModel",
    "WeakNATTranslationPipeline",
    "ORTWeakNATForConditionalGeneration",
    "export_for_hub",
    "export_onnx",
    "push_export_to_hub",
    "strip_weak_decoders",
    "train_weaknat_tokenizer",
]
