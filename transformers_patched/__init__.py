"""Our integration of VidCom2 with transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL (no copied modeling code).

Modules: qwen_arch (which class, loading, random full-size builds), qwen_sequence (shortening a token
sequence with gathered M-RoPE positions), qwen_stages (vision / compress / prefill / decode as separate
calls), qwen_adapter (QwenVideoLLM: videos and questions in, InferenceResult out), qwen_tiny (tiny
checkpoints), families (registration with llava.runtime).
"""
