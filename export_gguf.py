#!/usr/bin/env python3
"""Export a trained model folder as one GGUF file that llama.cpp runs.

    python3 export_gguf.py --model_dir models/mvlm_gpt2 --output mvlm_gpt2.gguf [--dtype f32|f16|q8_0|q4_k_m]

Which folders GGUF can express is the model registry's business (model_registry.py: MVLM-GPT2 as
llama.cpp's "gpt2", SIM-ONE with every governance mechanism off and the Llama folders of
export_llama.py as "llama"); a SIM-ONE model with a governance mechanism on (policy gate, memory
tokens) has no llama.cpp equivalent and is refused. The tokenizer goes in as llama.cpp's "gpt2"
BPE with the "gpt-2" pre-tokenizer, so llama.cpp tokenizes as transformers does.

--dtype: f32 keeps every weight in float32; f16 stores 2-D weights in float16; q8_0 stores 2-D
weights whose rows are a whole number of 32-value blocks in Q8_0 and the rest in float16.
Norms, biases and GPT-2's position table always stay float32, as llama.cpp's converter does.
q4_k_m is llama.cpp's own quantizer run on the f32 file (needs llama-cpp-python).

The file is written beside the output under a temporary name and renamed at the end, so a
failed export leaves nothing behind (a killed export's temporary file is removed by the next
one). The pipeline's packaging stage (python -m release.package --formats gguf) writes
`<name>-f16.gguf`, `-q8_0.gguf` and `-q4_k_m.gguf` beside each archive the same way, with a note in DOWNLOAD.md for a model GGUF cannot
express. The conversion itself is release/gguf_conversion.py.

The folder is checked first as one from elsewhere would be (release/trust.py: modelling code other
than this repository's, a foreign auto_map, a symlink out of the folder, sizes past the limits are
refused unless --trust_folder_code is given). A model with a NaN or infinite weight is refused. Errors: one line on stderr, exit status 2
(1 for a full disk or an unwritable folder, 130/143 for SIGINT/SIGTERM).
"""
from __future__ import annotations

import sys
from pathlib import Path

from mvlm_engine.cli import OneLineParser, run_cli
from release.gguf_conversion import DTYPES, export
from release.trust import TRUST_FLAG, TRUST_HELP, vet_folder

PROG = "export_gguf.py"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: export, then print a one-line summary."""
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, type=Path,
                        help="trained model folder (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--output", required=True, type=Path, help="GGUF file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f32", help="storage type of the 2-D weights")
    parser.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    args = parser.parse_args(argv)
    vet_folder(args.model_dir.expanduser(), "--model_dir", args.trust_folder_code)
    print(f"{PROG}: {export(args.model_dir.expanduser(), args.output.expanduser(), args.dtype)}")


if __name__ == "__main__":
    run_cli(PROG, main, sys.argv[1:])
