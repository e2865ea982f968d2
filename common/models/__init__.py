"""What a `--model` is, worked out once: where its files are (an HF folder, a GGUF converted into one, or a
random-weight preset), its architecture, and the facts every process needs (context length, EOS ids,
vocabulary size). The launcher (or a service's CLI entry) resolves the model once with
`resolve.resolve_engine_config` and ships the answer to every process in `EngineConfig.resolved`.
"""
