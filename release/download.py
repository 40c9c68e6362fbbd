"""DOWNLOAD.md, and what it tells each client: transformers for every archive, llama-cli and an
Ollama Modelfile for a GGUF file (written by release/package.py beside the archives)."""
from __future__ import annotations

import io
from pathlib import Path

from mvlm_engine.fileio import atomic_write_text, read_json_object
from mvlm_engine.packaging import RUN_SUMMARY

from . import SAMPLE_PROMPT


def write_download_md(folder: Path, models: dict[str, dict]) -> Path:
    """DOWNLOAD.md: how to verify and load each packaged model. models: name -> info."""
    out = io.StringIO()
    out.write("# Model downloads\n\nVerify every file listed in SHA256SUMS (the archives and any single-file "
              "formats below), unpack, and load with transformers:\n\n```bash\nsha256sum -c SHA256SUMS\n")
    for name in models:
        out.write(f"tar -xzf {name}.tar.gz\n")
    out.write("```\n")
    for name, info in models.items():
        out.write(download_section(name, info))
    atomic_write_text(folder / "DOWNLOAD.md", out.getvalue())
    return folder / "DOWNLOAD.md"


def download_section(name: str, info: dict) -> str:
    """One model's part of DOWNLOAD.md: the archive, transformers, then each single-file format
    (its usage, or one line saying why this model has none)."""
    remote = ", trust_remote_code=True" if info.get("trust_remote_code") else ""
    text = (f"\n## {name}\n\n{info.get('description', '')}\n\n"
            f"- archive: `{name}.tar.gz` ({info['archive_bytes']:,} bytes)\n"
            f"- files: {', '.join(info['files'])}\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}"{remote})\n'
            f'ids = tokenizer("{SAMPLE_PROMPT}", return_tensors="pt").input_ids\n'
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True, top_p=0.9)[0]))\n"
            "```\n")
    return text + single_files_section(info.get("formats", []))


def single_files_section(formats: list[dict]) -> str:
    """The single-file formats of one model, family by family (all GGUF files are one): each
    written file with its size and contents, then how to run the first of them (the others run
    the same way by their names); then one line per reason for the files that were not written."""
    text = ""
    for family in dict.fromkeys(single.get("family", single["suffix"]) for single in formats):
        written = [s for s in formats if s["file"] and s.get("family", s["suffix"]) == family]
        for single in written:
            text += f"\n- `{single['file']}` ({single['bytes']:,} bytes): {single.get('label', single['suffix'])}"
        if len(written) > 1:
            text += (f"\n\nThe commands below use `{written[0]['file']}`; the other files above run the same "
                     "way, by their names.")
        if written:
            text += f"\n\n{written[0]['usage']}"
    reasons: dict[str, list[str]] = {}
    for single in formats:
        if not single["file"]:
            reasons.setdefault(single["reason"], []).append(f"`{single['suffix']}`")
    for reason, suffixes in reasons.items():
        text += f"\n- no {', '.join(suffixes)} file{'s' if len(suffixes) > 1 else ''}: {reason}\n"
    return text


def describe_model(model_dir: Path, trust_remote_code: bool) -> dict:
    """What DOWNLOAD.md says of a model: its description (recorded in run_summary.json at the end
    of training) and whether transformers needs trust_remote_code."""
    summary = read_json_object(model_dir / RUN_SUMMARY)
    return {"description": summary.get("description") or summary.get("model", model_dir.name),
            "trust_remote_code": trust_remote_code}


# --------------------------------------------------------------------------- GGUF clients

# generation_config.json's sampling settings -> (llama-cli flag, Ollama Modelfile PARAMETER).
CLIENT_SAMPLING = {"temperature": ("--temp", "temperature"), "top_p": ("--top-p", "top_p"),
                   "top_k": ("--top-k", "top_k"), "repetition_penalty": ("--repeat-penalty", "repeat_penalty"),
                   "max_new_tokens": ("-n", "num_predict")}
# general.file_type of a GGUF file (llama.cpp's LlamaFileType) -> how DOWNLOAD.md names its weights.
WEIGHT_TYPES = {0: "float32", 1: "float16", 7: "8-bit (Q8_0)", 15: "4-bit (Q4_K_M)"}


def gguf_usage(output: Path, generation: dict) -> str:
    """DOWNLOAD.md lines for a GGUF file: llama-cli and an Ollama Modelfile, with the folder's
    sampling defaults `generation`, the context set to the model's and the continuation capped to
    half of it."""
    import gguf

    reader = gguf.GGUFReader(str(output))
    arch = reader.get_field("general.architecture").contents()
    n_ctx = int(reader.get_field(f"{arch}.context_length").contents())
    weights = WEIGHT_TYPES.get(int(reader.get_field("general.file_type").contents()), "quantized")
    sampling = dict(generation)
    if not sampling.get("do_sample", True):
        sampling["temperature"] = 0  # greedy in both clients
    if "max_new_tokens" in sampling:
        sampling["max_new_tokens"] = min(int(sampling["max_new_tokens"]), n_ctx // 2)
    pairs = [("-c", "num_ctx", n_ctx)] + [(flag, parameter, sampling[key]) for key, (flag, parameter)
                                         in CLIENT_SAMPLING.items() if key in sampling]
    flags = " ".join(f"{flag} {value}" for flag, _, value in pairs)
    parameters = "".join(f"PARAMETER {parameter} {value}\n" for _, parameter, value in pairs)
    model = output.stem.lower()
    return (f"For llama.cpp and Ollama ({weights} weights, tokenizer inside; plain text completion, no chat "
            "template), with the sampling defaults of generation_config.json:\n\n"
            f'```bash\nllama-cli -m {output.name} -p "{SAMPLE_PROMPT}" {flags}\n```\n\n'
            f"Ollama: save as `Modelfile` beside the file, then `ollama create {model} -f Modelfile` and "
            f'`ollama run {model} "{SAMPLE_PROMPT}"`:\n\n'
            f'```\nFROM ./{output.name}\nTEMPLATE "{{{{ .Prompt }}}}"\n{parameters}```\n\n'
            + gguf_usage_notes(arch, n_ctx))


def gguf_usage_notes(arch: str, n_ctx: int) -> str:
    """What DOWNLOAD.md may say of a GGUF file: what was checked, and the context limit (a learned
    position table, llama.cpp's "gpt2" architecture, ends there)."""
    limit = ("GPT-2's learned positions end there, and llama.cpp (through llama-cpp-python) aborts when prompt "
             "and continuation together go past them" if arch == "gpt2" else
             "beyond it the model runs on positions it never saw in training")
    return (f"The context is {n_ctx} tokens, prompt and continuation together: {limit}. The training "
            "repository's tests run such files through llama-cpp-python (the llama.cpp library) against "
            "transformers, on its tiny test models: the float16 file gives the same token ids and the same "
            "greedy continuation, the 8-bit file a held-out perplexity within 1% of a float32 file's; the "
            "4-bit file's is measured, not bounded. The llama-cli binary and Ollama were not run there. "
            "llama.cpp penalizes repeats over the last 64 tokens by default, transformers over the whole text.\n")
