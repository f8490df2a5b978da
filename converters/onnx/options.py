"""Choices of `packager export onnx`, importable without torch (the CLI reads them for --help
and for argument checks before anything heavy is imported)."""

# routed-expert formulations, see converters/onnx/decoder.py
FORMULATIONS = ("contrib", "sparse", "dense")
DEFAULT_FORMULATION = "contrib"
QUANT_TYPES = ("fp32", "int8", "int4")
# storage of the weights that are not quantized (routers always stay float32)
DTYPES = ("fp32", "fp16")
# families whose decoder converters/onnx/decoder.py can build (converters/onnx/families.py)
SUPPORTED_FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss", "deepseek_v3")
