"""Base models: loading (load.py), family presets and the chat template (families.py), the offline
tiny base (tiny.py) and fine-tuning methods on PEFT (methods.py)."""
