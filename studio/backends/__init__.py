"""One module per modality: how its models load (named by the registry) and how they generate.

A loader has the signature `load(spec, path, device, dtype) -> model` and is only ever called by the model cache.
Generation code receives the loaded model from `cache.use(...)` and never keeps a reference to it afterwards,
so eviction really frees memory.
"""
