"""Turn EPSANet checkpoints into Hugging Face Hub repos: model.safetensors, config.json, README.md.

    python -m hub_upload --help
"""
