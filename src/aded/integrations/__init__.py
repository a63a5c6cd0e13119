"""aded's drafters inside other serving engines (vLLM, SGLang) and shared across replicas.

Nothing here imports an engine or Ray at import time: `aded.integrations.vllm` only reads the
config object vLLM hands it, `shared_state` imports Ray when a Ray transport is built, and
`sglang` only produces arrays in SGLang's documented format. The main environment never needs them.
"""
