"""Hugging Face interop: ``hf_config`` (config.json <-> model keys), ``mapping`` (tensor names and
layouts), ``safetensors_io`` (streaming reader/writer), ``hf`` (``import_hf`` / ``export_hf``),
``peft`` (LoRA adapters <-> PEFT adapter directories)."""
