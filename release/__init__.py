"""What the project hands to users besides the weights: the sampling defaults written into every
model folder, the model cards, DOWNLOAD.md, the single-file formats for other clients, and the
command that packages the trained models.

The engine (mvlm_engine/) knows model folders, manifests, archives and checksums and nothing of
the corpus or the models; the wording here names both.

  release/download.py          DOWNLOAD.md and each client's usage text (transformers, llama-cli, Ollama)
  release/card.py              the Hugging Face model card (README.md), built with huggingface_hub's classes
  release/gguf_conversion.py   a model folder -> one GGUF file (export_gguf.py is its command line)
  release/package.py           python -m release.package: archives, single-file formats, SHA256SUMS, DOWNLOAD.md
"""

# Sampling defaults for generation_config.json: a bare model.generate(ids) or
# pipeline("text-generation") samples with these; validation's sampled generation and generate.py
# read them back from the folder, so this is their one home. top_k 0 = off (nucleus sampling only).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1,
                       "max_new_tokens": 128}

# The prompt of every usage example (DOWNLOAD.md, model cards, client commands) and validation's
# first prompt: a verse reference the way the corpus writes one.
SAMPLE_PROMPT = "[KJV] John 3:16"

# The model cards' licence unless the owner picks another (validate_models.py --card_license): the
# corpus is public domain; the weights' terms are the owner's call.
DEFAULT_CARD_LICENSE = "cc0-1.0"
