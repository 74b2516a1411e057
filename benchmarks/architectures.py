"""Published architectures of real models, for the benchmarks' workloads.

Each entry is what the model's config.json says, with the parameter count of its
safetensors.
"""

# name: (parameters, layers, attention heads, KV heads, head dim, max context)
MODELS = {
    "qwen2.5-0.5b": (494032768, 24, 14, 2, 64, 32768),
    "llama-3.2-1b": (1235814400, 16, 32, 8, 64, 131072),
    "llama-3.2-3b": (3212749824, 28, 24, 8, 128, 131072),
    "phi-3-mini": (3821079552, 32, 32, 32, 96, 4096),
    "qwen2.5-7b": (7615616512, 28, 28, 4, 128, 32768),
    "mistral-7b": (7248023552, 32, 32, 8, 128, 32768),
    "llama-3-8b": (8030261248, 32, 32, 8, 128, 8192),
    "gemma-2-9b": (9241705984, 42, 16, 8, 256, 8192),
    "qwen2.5-14b": (14770033664, 48, 40, 8, 128, 32768),
    "qwen2.5-32b": (32763876352, 64, 40, 8, 128, 32768),
    "llama-3.1-70b": (70553706496, 80, 64, 8, 128, 131072),
}
