"""Models: which transformers class loads a checkpoint, and the built-in tiny models (Qwen2,
Qwen2.5-VL) made locally for the CPU default and the tests."""
