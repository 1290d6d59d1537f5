"""Turn EPSANet checkpoints into Hugging Face Hub repos: model.safetensors, config.json, README.md.

    python -m timm_epsanet.hub_upload --help    (README.md in this folder)
"""
